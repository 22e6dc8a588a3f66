"""Tiny random models and tokenizers, built in memory for tests (no Hub access).

Everything here is small enough to build in well under a second on CPU.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# A few dozen sentences of the kind tests use, so common words get merged into
# single tokens and sequences stay short.
CORPUS = [
    "the film was great", "the film was awful", "the food was great",
    "the food was awful", "the movie was boring and too long",
    "I loved this movie, the acting was wonderful!", "I hated this film.",
    "what a terrible waste of time", "best meal I have ever had",
    "the service was slow but the food was good", "not bad, not great either",
    "would you recommend it? yes, absolutely.", "is it worth watching?",
    "what is the capital of France?", "The capital of France is Paris.",
    "how are you today?", "I am fine, thank you.", "what is 2 + 2? it is 4.",
    "Human: hello, who are you?", "Assistant: I am a helpful assistant.",
    "Human: tell me a joke.", "Assistant: why did the chicken cross the road?",
    "Human: can you help me with my homework?", "Assistant: sure, what is it?",
    "Human: thanks!", "Assistant: you are welcome.",
    "summarize the following text in one sentence:", "translate to French: good morning",
    "once upon a time there was a little cat.", "the quick brown fox jumps over the lazy dog",
    "This product is excellent; I'd buy it again.", "Terrible customer support (never again).",
    "positive", "negative", "neutral", "The answer is: 42",
    "system: you are a helpful assistant.", "the user asks and the assistant answers.",
]

# ChatML; `add_generation_prompt` opens an assistant turn for generation.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer(pad: bool = True, chat_template: bool = False,
                   pad_is_eos: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer trained on CORPUS (~400 tokens).

    pad=False -> no pad token at all; pad_is_eos=True -> pad token is the EOS token.
    chat_template=True -> ChatML template, <|im_start|>/<|im_end|> specials, eos=<|im_end|>.
    """
    # Specials take the first ids (<|endoftext|> is always 0), so ordinary token
    # ids differ between option combinations: don't hard-code them in tests.
    specials = [EOS] + ([PAD] if pad and not pad_is_eos else [])
    specials += [IM_START, IM_END] if chat_template else []
    tok = Tokenizer(models.BPE())
    # Byte-level pre-tokenization + the full 256-byte initial alphabet: any
    # string is encodable (no unk) and decode(encode(x)) == x.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)

    eos = IM_END if chat_template else EOS
    pad_token = eos if pad_is_eos else (PAD if pad else None)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=eos, pad_token=pad_token,
        model_max_length=1_000_000, padding_side="right",
    )
    if chat_template:
        hf.chat_template = CHAT_TEMPLATE
    return hf


def make_sentencepiece_tokenizer(chat_template: bool = False) -> PreTrainedTokenizerFast:
    """A Llama 2-style tokenizer trained on CORPUS: spaces are "\u2581", and every text it encodes (each
    piece between special tokens) starts with one, as SentencePiece's dummy prefix; BOS <s> first."""
    specials = ["<unk>", "<s>", "</s>", PAD] + ([IM_START, IM_END] if chat_template else [])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),  # Llama 2's:
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])  # one space off the whole
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(CORPUS + ["\n?.!,;:'()+"], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>", pad_token=PAD,
                                 eos_token=IM_END if chat_template else "</s>")
    if chat_template:
        hf.chat_template = CHAT_TEMPLATE
    return hf


FAMILIES = ("gpt2", "gptj", "gpt_neox", "opt", "bloom", "llama")

# hidden 32, 2 layers, 4 heads (head_dim 8), 256 positions. Each family spells
# these differently; the extra keys are needed because the defaults assume a
# big model (GPT-J rotary_dim=64 > head_dim, OPT projects embeddings to 768, ...).
_CONFIGS = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=256),
    "gptj": dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, rotary_dim=4),
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=256, rotary_pct=0.5),
    "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,  # opt-350m's layout:
                max_position_embeddings=256, word_embed_proj_dim=16, do_layer_norm_before=False),  # projected
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4),  # ALiBi: no position limit
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256),
    "phi3": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,  # for its LongRoPE
                 num_key_value_heads=4, intermediate_size=64, max_position_embeddings=256),
}


def make_causal_lm(family: str, vocab_size: int, seed: int = 0, **config_kwargs):
    """Tiny randomly initialised causal LM of `family`; deterministic given `seed`.

    config_kwargs override the tiny defaults (e.g. pad_token_id, tie_word_embeddings).
    """
    # Family defaults for special ids point into the real vocabularies (GPT-2's
    # 50256 is out of range and warns; Llama's eos=2 is a random byte here and
    # would stop generation early), so drop them unless given explicitly.
    kwargs = dict(vocab_size=vocab_size, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    kwargs.update(_CONFIGS[family], **config_kwargs)
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def turn_ending_chat_model():
    """(model, tokenizer): Qwen2.5 base's layout (ChatML turns end <|im_end|>, EOS <|endoftext|>), as Gemma's
    <end_of_turn> and Phi-3's <|end|>; a GPT-J whose head bias always picks <|im_end|>, ending every turn."""
    tokenizer = make_tokenizer(chat_template=True)
    tokenizer.eos_token = EOS
    model = make_causal_lm("gptj", len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        model.lm_head.bias[tokenizer.convert_tokens_to_ids(IM_END)] = 100.0
    return model.eval(), tokenizer


def save_tiny(family: str, path, seed: int = 0, config: dict | None = None, **tok_kwargs) -> str:
    """Save a tiny model + matching tokenizer to `path`; returns str(path). `config` overrides its config."""
    tokenizer = make_tokenizer(**tok_kwargs)
    # len(tokenizer) counts added special tokens, so every id fits the embedding (unless `config` says otherwise).
    # Note: OPT/Llama zero (and freeze) the pad_token_id embedding row.
    config = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id, **(config or {})}
    model = make_causal_lm(family, seed=seed, **config)
    path = str(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# a chat template that refuses a system turn, as Gemma's and Mistral's do
STRICT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                   "{{ raise_exception('System role not supported') }}{% endif %}"
                   "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
