"""Pure sampling (no top-k, no nucleus, no penalties): PPO's generation config, and batched sampling with it
from a chat model outside training (the data scripts, eval.py), so what is sampled here is what PPO sees."""
import torch
from transformers import GenerationConfig

from .data import collate_prompts, decode_response, encode_prompt, ensure_pad_token, stop_token_ids
from .models import load_causal_lm, load_tokenizer_of


def load_chat_model(path, dtype=torch.float32):
    """(model in eval mode, tokenizer with a pad token distinct from EOS, which the model's config names), as
    train.py loads a model."""
    tokenizer = load_tokenizer_of(path)
    model = load_causal_lm(path, dtype)
    if ensure_pad_token(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def pure_sampling(tokenizer, temperature, max_new_tokens):
    """PPO's generation config: pure sampling, no top-k, no nucleus, no penalties. It must replace the model's
    own: generate() fills every field a config leaves unset from the model's (e.g. Qwen2.5's
    repetition_penalty 1.05), which would sample from another distribution than the log-probs score. It stops
    at EOS and at the chat template's end of turn (`stop_token_ids`)."""
    return GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=temperature,
                            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=stop_token_ids(tokenizer), bos_token_id=tokenizer.bos_token_id)


@torch.no_grad()
def sample(model, tokenizer, prompts, temperature, max_new_tokens, batch_size=32):
    """One response per prompt (repeat a prompt to get several), in order, by `pure_sampling` (which becomes
    the model's generation config). Each row: {prompt, prompt_ids, response_ids (through the first EOS or end
    of turn), text, ended (True if one came)}."""
    model.generation_config = pure_sampling(tokenizer, temperature, max_new_tokens)
    stops = model.generation_config.eos_token_id
    rows = []
    for i in range(0, len(prompts), batch_size):
        batch = collate_prompts([{"prompt": p, "input_ids": encode_prompt(tokenizer, p)}
                                 for p in prompts[i:i + batch_size]], tokenizer.pad_token_id)
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for prompt, ids, mask, response in zip(batch["prompts"], batch["input_ids"], batch["attention_mask"],
                                               out[:, batch["input_ids"].shape[1]:].tolist()):
            end = next((i for i, token in enumerate(response) if token in stops), None)
            ended = end is not None
            response = response[:end + 1] if ended else response
            prompt_ids = ids[mask.bool()].tolist()
            rows.append({"prompt": prompt, "prompt_ids": prompt_ids, "response_ids": response, "ended": ended,
                         "text": decode_response(tokenizer, prompt_ids, response)})  # as train.py scores it
    return rows


def sample_n(path, prompts, n, temperature, max_new_tokens, seed):
    """The data scripts' samples: n per prompt from the chat model at path, seeded before loading as
    when the data was made; one list of n rows per prompt."""
    torch.manual_seed(seed)
    model, tokenizer = load_chat_model(path)
    rows = sample(model, tokenizer, [p for p in prompts for _ in range(n)], temperature, max_new_tokens)
    return [rows[i * n:(i + 1) * n] for i in range(len(prompts))]
