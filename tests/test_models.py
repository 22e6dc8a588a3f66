"""Policy with value head and reward model on every supported family, against transformers itself."""
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from minrlhf import (Critic, PolicyWithValueHead, collate_pairs, encode_pair, encode_preference, ensure_pad_token,
                     full_pair_scores, load_causal_lm, load_reward_model, logprobs_from_logits, pad, pair_scores,
                     reply_logprobs, response_logprobs, response_positions, reward_scores, sampled_logprobs, score_pairs,
                     score_texts, within_positions)
from tiny import FAMILIES, make_sentencepiece_tokenizer, make_tokenizer, save_tiny


PAIR_ROWS = [{"prompt": "Human: can you help me with my homework?", "chosen": " sure, what is it?", "rejected": " no"},
             {"prompt": "hi", "chosen": " hello", "rejected": " go away, I am busy"}]  # unlike lengths


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    return request.param, save_tiny(request.param, tmp_path_factory.mktemp(request.param))


def test_policy_logits_values_and_left_padding(family_dir):
    _, path = family_dir
    policy = PolicyWithValueHead(load_causal_lm(path)).eval()
    ids = torch.randint(3, 60, (1, 7))
    padded = torch.cat([torch.full((1, 3), 1), ids], 1)  # 3 pad columns on the left
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    with torch.no_grad():
        logits, values = policy(ids, torch.ones_like(ids))
        padded_logits, _ = policy(padded, mask)
        reference = policy.backbone(input_ids=ids).logits
    assert logits.shape == (1, 7, policy.backbone.config.vocab_size) and values.shape == (1, 7)
    assert (values == 0).all()  # zero-initialised value head
    torch.testing.assert_close(logits, reference)
    with torch.no_grad():  # a head that is not zero reads each position's last hidden state, under left padding too
        torch.nn.init.normal_(policy.value_head.weight)
        _, padded_values = policy(padded, mask)
        hidden = policy.backbone(input_ids=ids, output_hidden_states=True).hidden_states[-1]  # (1, 7, H)
        torch.testing.assert_close(padded_values[:, 3:], policy.value_head(hidden).squeeze(-1), atol=1e-4, rtol=1e-4)
    # left padding must not move positions: same log-probs as the unpadded row
    torch.testing.assert_close(logprobs_from_logits(padded_logits[:, 3:-1], ids[:, 1:]),
                               logprobs_from_logits(logits[:, :-1], ids[:, 1:]), atol=1e-4, rtol=1e-4)


def test_generation_logprobs_match_forward(family_dir):
    """The log-probs PPO recomputes equal the sampler's own at its temperature, row by row, under left padding."""
    _, path = family_dir
    policy = PolicyWithValueHead(load_causal_lm(path)).eval()
    ids = torch.tensor([[1, 1, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    torch.manual_seed(0)
    out = policy.backbone.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                                   temperature=0.7, max_new_tokens=6, min_new_tokens=6, output_scores=True,
                                   return_dict_in_generate=True, pad_token_id=1, eos_token_id=None)
    response = out.sequences[:, 5:]
    sampler = logprobs_from_logits(torch.stack(out.scores, 1), response)  # its scores: the logits / 0.7
    full_mask = torch.cat([mask, torch.ones_like(response)], 1)
    with torch.no_grad():
        logits, _ = policy(out.sequences, full_mask, response_positions(out.sequences, 5))  # (B, R, V)
        frozen = response_logprobs(policy.backbone, out.sequences, full_mask, 5, 0.7)  # as the reference model's
    torch.testing.assert_close(logprobs_from_logits(logits / 0.7, response), sampler, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(frozen, sampler, atol=1e-4, rtol=1e-4)


def test_bf16_logits_are_divided_by_the_temperature_in_float32():
    """As generate() scales them: bf16 logits / 0.7 in bf16 would round them again (up to ~0.05 in log-prob)."""
    torch.manual_seed(0)
    logits, response = (8 * torch.randn(2, 5, 50)).bfloat16(), torch.randint(0, 50, (2, 5))
    scaled, logprobs = sampled_logprobs(logits, response, 0.7)
    assert scaled.dtype == torch.float32
    torch.testing.assert_close(logprobs, logprobs_from_logits(logits.float() / 0.7, response), rtol=0, atol=0)


@pytest.mark.parametrize("family, dropouts", [("gpt2", ("resid_pdrop", "embd_pdrop", "attn_pdrop")),
                                              ("opt", ("dropout", "attention_dropout", "layerdrop"))])
def test_dropout_is_disabled(tmp_path, family, dropouts):
    """Every random drop is off, OPT's layerdrop (whole layers skipped in training) too."""
    path = save_tiny(family, tmp_path, config=dict.fromkeys(dropouts, 0.5))
    model = load_causal_lm(path)
    ids = torch.randint(0, 50, (2, 8))
    plain = model.eval()(ids).logits
    model.train()
    for seed in range(5):  # at 0.5 each, some of five seeded forwards would drop units or skip a layer
        torch.manual_seed(seed)
        torch.testing.assert_close(model(ids).logits, plain)


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_reward_model_parity_with_transformers(family_dir, tmp_path, pad_is_eos, monkeypatch):
    """What minrlhf scores, plain AutoModelForSequenceClassification scores after a save, with right
    padding and with a tokenizer whose pad token was its EOS; and the score is read at the EOS. The new head
    is drawn with std 1/sqrt(H + 1), H the width of what it reads (OPT-350m's: word_embed_proj_dim)."""
    family, path = family_dir
    tokenizer = make_tokenizer(pad_is_eos=pad_is_eos)
    added = ensure_pad_token(tokenizer)  # pad == eos == bos and no unk: a new pad token is added
    assert added == pad_is_eos and tokenizer.pad_token_id != tokenizer.eos_token_id
    draws, normal = [], torch.nn.init.normal_

    def recorded_normal(tensor, **kwargs):  # the head's draw: the last before the resize
        draws.append(kwargs)
        return normal(tensor, **kwargs)
    monkeypatch.setattr(torch.nn.init, "normal_", recorded_normal)
    torch.manual_seed(0)
    model = load_reward_model(path, tokenizer.pad_token_id).eval()
    assert draws[-1] == {"std": 1 / math.sqrt(model.score.in_features + 1)}
    if added:
        model.resize_token_embeddings(len(tokenizer))
    eos = tokenizer.eos_token_id
    rows = [{"chosen": tokenizer("the film was great")["input_ids"] + [eos],
             "rejected": tokenizer("awful")["input_ids"] + [eos]}]
    seqs = [rows[0]["chosen"], rows[0]["rejected"]]
    batch = {"input_ids": pad(seqs, tokenizer.pad_token_id), "attention_mask": pad([[1] * len(s) for s in seqs], 0)}
    with torch.no_grad():
        ours = reward_scores(model, **batch)
        alone = reward_scores(model, torch.tensor([rows[0]["rejected"]]), torch.ones(1, len(rows[0]["rejected"])))
        model.save_pretrained(tmp_path)
        theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()(**batch).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours[1:], alone, atol=1e-5, rtol=1e-5)  # padding changes nothing


@pytest.mark.parametrize("max_length", [64, 12, 4])  # whole prompt, its end, its last token
def test_pair_scores_match_the_full_sequences(family_dir, max_length):
    """Replies scored on their prompt's KV cache, in a batch whose prompts and replies need padding, get the
    scores and gradients of the full sequences."""
    family, path = family_dir
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = load_reward_model(path, tokenizer.pad_token_id)
    rows = PAIR_ROWS
    pairs = [encode_preference(row, tokenizer, max_length) for row in rows]
    whole = tokenizer(rows[0]["prompt"])["input_ids"]
    kept = min(len(whole), max_length - len(pairs[0]["chosen"]))  # the prompt's end that fits beside the longer reply
    assert kept >= 1 and len(pairs[0]["chosen"]) >= len(pairs[0]["rejected"])
    assert pairs[0]["prompt"] == whole[len(whole) - kept:] and pairs[0]["rejected"][-1] == tokenizer.eos_token_id
    pairs.sort(key=lambda pair: len(pair["prompt"]))  # the order collate_pairs puts them in
    full = [pair["prompt"] + pair[key] for pair in pairs for key in ("chosen", "rejected")]
    group = collate_pairs(pairs, tokenizer.pad_token_id, slack=math.inf)[0]
    grads = []
    for scores in (lambda: reward_scores(model, pad(full, tokenizer.pad_token_id), pad([[1] * len(s) for s in full], 0)),
                   lambda: pair_scores(model, **group).flatten(), lambda: full_pair_scores(model, **group).flatten()):
        model.zero_grad()
        out = scores()
        (out * torch.tensor([1.0, -2.0, 3.0, -4.0])).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (expected, expected_grads), *others = grads
    for got, got_grads in others:  # the prompt once, and the padded group in full (gradient checkpointing's path)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        for a, b in zip(got_grads, expected_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_score_pairs_of_a_model_with_a_recurrent_state_runs_them_in_full():
    """Jamba's Mamba layers keep a recurrent state, not keys and values that could serve a second reply:
    `score_pairs` scores such a model's pairs in full (before: an AttributeError in the RM stage's first step)."""
    tokenizer = make_tokenizer()
    config = AutoConfig.for_model("jamba", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, num_labels=1,
                                  pad_token_id=tokenizer.pad_token_id, num_experts=2, num_experts_per_tok=1,
                                  attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                  expert_layer_offset=1, mamba_d_state=4)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    pairs = sorted((encode_preference(row, tokenizer, 64) for row in PAIR_ROWS), key=lambda pair: len(pair["prompt"]))
    full = [pair["prompt"] + pair[key] for pair in pairs for key in ("chosen", "rejected")]
    with torch.no_grad():
        got = torch.stack(score_pairs(model, collate_pairs(pairs, tokenizer.pad_token_id, slack=math.inf)), 1)
        expected = reward_scores(model, pad(full, tokenizer.pad_token_id), pad([[1] * len(s) for s in full], 0))
    torch.testing.assert_close(got.flatten(), expected, atol=1e-5, rtol=1e-5)


def test_score_pairs_under_gradient_checkpointing(family_dir):
    """In training with gradient checkpointing transformers drops the KV cache that `pair_scores` hands the
    replies; `score_pairs` then runs each pair in full: the scores of the model in eval mode, and gradients."""
    _, path = family_dir
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = load_reward_model(path, tokenizer.pad_token_id)
    rows = PAIR_ROWS
    groups = collate_pairs([encode_preference(row, tokenizer, 64) for row in rows], tokenizer.pad_token_id)
    with torch.no_grad():
        expected = torch.stack(score_pairs(model.eval(), groups))
    model.train().activation_checkpointing_enable({"use_reentrant": False})
    got = torch.stack(score_pairs(model, groups))
    torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert model.score.weight.grad is not None and torch.isfinite(model.score.weight.grad).all()


def test_reply_logprobs_are_the_replies_own_in_full_sequences(family_dir):
    """DPO's summed reply log-probs, from padded pair groups, equal each prompt + reply scored alone."""
    _, path = family_dir
    tokenizer = make_tokenizer()
    model = load_causal_lm(path).eval()
    rows = PAIR_ROWS
    pairs = sorted([encode_preference(row, tokenizer, 64) for row in rows], key=lambda pair: len(pair["prompt"]))
    expected = []
    with torch.no_grad():
        for pair in pairs:
            for key in ("chosen", "rejected"):
                ids = torch.tensor([pair["prompt"] + pair[key]])
                logprobs = logprobs_from_logits(model(input_ids=ids).logits[:, :-1], ids[:, 1:])
                expected.append(logprobs[0, len(pair["prompt"]) - 1:].sum())
        chosen, rejected = reply_logprobs(model, collate_pairs(pairs, tokenizer.pad_token_id, slack=math.inf))
    assert len(collate_pairs(pairs, tokenizer.pad_token_id, slack=math.inf)) == 1  # one padded group
    torch.testing.assert_close(torch.stack([chosen, rejected], 1).flatten(), torch.stack(expected),
                               atol=1e-4, rtol=1e-4)


def test_pad_token_added_when_only_eos_exists():
    tokenizer = make_tokenizer(pad=False)
    tokenizer.unk_token = None
    assert ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id not in (tokenizer.eos_token_id, None)


def test_a_model_loaded_for_a_tokenizer_given_a_pad_token_takes_its_row_and_id(tmp_path):
    """A base without a pad token: train.py adds one to its tokenizer; the model loaded for it gets one more
    embedding row, and the pad id in its config (saved with it), as its tokenizer says."""
    from minrlhf.inputs import load_model, load_tokenizer
    path = save_tiny("llama", tmp_path, pad=False)
    tokenizer, resize = load_tokenizer("--model", path)
    model = load_model("--model", path, tokenizer, resize)
    assert resize and model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None


def test_pad_token_reuses_a_distinct_special_token():
    """A pad token that was EOS becomes another special token the tokenizer has (here BOS): nothing to resize."""
    tokenizer = make_tokenizer(chat_template=True, pad_is_eos=True)  # EOS <|im_end|>, BOS <|endoftext|>
    assert not ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == tokenizer.bos_token and tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.parametrize("chosen_ended", [True, False])
def test_score_texts_encodes_like_training(tmp_path, chosen_ended):
    """A pair's reply marked cut off (`chosen_ended` false) is trained on as PPO scores a cut-off response."""
    tokenizer = make_tokenizer(chat_template=True)
    model = load_reward_model(save_tiny("llama", tmp_path, chat_template=True), tokenizer.pad_token_id).eval()
    row = {"prompt": "is it good?", "chosen": " yes, absolutely", "rejected": " no.", "chosen_ended": chosen_ended}
    pair = encode_preference(row, tokenizer, 64)
    assert (tokenizer.eos_token_id in pair["chosen"]) == chosen_ended
    with torch.no_grad():
        expected = pair_scores(model, **collate_pairs([pair], tokenizer.pad_token_id)[0])[0]
        got = score_texts(model, tokenizer, [row["prompt"]] * 2, [row["chosen"], row["rejected"]], 64,
                          ended=[chosen_ended, True])
    torch.testing.assert_close(got, expected)


def test_score_texts_of_unequal_lengths_as_each_alone(family_dir):
    """A batch of responses of unequal lengths scores as each one alone: right padding, positions from 0 (GPT-2's
    and OPT's learned positions would read a left-padded row shifted)."""
    family, path = family_dir
    tokenizer = make_tokenizer()
    model = load_reward_model(path, tokenizer.pad_token_id).eval()
    prompts, responses = ["the film was", "hi"], [" great", " awful, what a terrible waste of time"]
    with torch.no_grad():
        got = score_texts(model, tokenizer, prompts, responses, 64)
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([sum(encode_pair(tokenizer, prompt, response), [])])
            torch.testing.assert_close(got[i:i + 1], reward_scores(model, ids, torch.ones_like(ids)))


def test_score_texts_keeps_the_last_tokens_within_the_positions(tmp_path):
    """Decoded text may re-encode to more tokens than were sampled: within_positions (as train.py and eval.py
    call it) keeps the last ones that fit GPT-2's learned positions (past them: an IndexError)."""
    tokenizer = make_tokenizer()
    model = load_reward_model(save_tiny("gpt2", tmp_path, config={"n_positions": 16}), tokenizer.pad_token_id).eval()
    prompt, response = "the film was great and the food was great", " and I loved it, the service was great"
    ids = sum(encode_pair(tokenizer, prompt, response), [])
    assert len(ids) > 16
    with torch.no_grad():
        got = score_texts(model, tokenizer, [prompt], [response], within_positions(model, 64))
        expected = reward_scores(model, torch.tensor([ids[-16:]]), torch.ones(1, 16, dtype=torch.long))
    torch.testing.assert_close(got, expected)


def test_score_texts_keeps_a_bos_first_past_the_positions(tmp_path):
    """A tokenizer that starts every text with BOS (Llama 2's): the sequence cut on the left still starts
    with it, then its last tokens, as PPO's prompts and the reward model's training pairs are cut."""
    tokenizer = make_sentencepiece_tokenizer()
    model = load_reward_model(save_tiny("gpt2", tmp_path, config={"n_positions": 16, "vocab_size": len(tokenizer)}),
                              tokenizer.pad_token_id).eval()
    prompt, response = "the film was great and the food was great", " and I loved it, the service was great"
    ids = sum(encode_pair(tokenizer, prompt, response), [])
    assert ids[0] == tokenizer.bos_token_id and len(ids) > 16
    with torch.no_grad():
        got = score_texts(model, tokenizer, [prompt], [response], within_positions(model, 64))
        expected = reward_scores(model, torch.tensor([ids[:1] + ids[-15:]]), torch.ones(1, 16, dtype=torch.long))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("chat", [False, True])
def test_a_cut_off_response_is_scored_as_generated(tmp_path, chat):
    """ended=False: no end of turn and no EOS that the policy did not generate; ended=True: as in training."""
    tokenizer = make_tokenizer(chat_template=chat)
    model = load_reward_model(save_tiny("llama", tmp_path, chat_template=chat), tokenizer.pad_token_id).eval()
    prompt, response = "is it good?", " yes, absolutely"
    prompt_ids, cut = encode_pair(tokenizer, prompt, response, ended=False)
    assert cut == tokenizer(response, add_special_tokens=False)["input_ids"]  # the text alone
    assert tokenizer.eos_token_id not in cut and tokenizer.eos_token_id in encode_pair(tokenizer, prompt, response)[1]
    ids = torch.tensor([prompt_ids + cut])
    with torch.no_grad():
        expected = reward_scores(model, ids, torch.ones_like(ids))
        got = score_texts(model, tokenizer, [prompt] * 2, [response] * 2, 64, ended=[False, True])
    torch.testing.assert_close(got[:1], expected)
    assert got[1] != got[0]


@pytest.mark.parametrize("chat", [False, True])
def test_a_generated_reply_that_spells_a_special_token_is_scored_as_text(chat):
    """A policy may write the string of a special token ("<|im_end|>", "<|endoftext|>") from ordinary tokens;
    the reward model reads those tokens, not the special token (which would end the turn early in its eyes),
    and then the reply's end as in training. Data in training is read as TRL reads it: the string is the token."""
    tokenizer = make_tokenizer(chat_template=chat)
    special = tokenizer.eos_token
    spelled = tokenizer(special, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert len(spelled) > 1  # ordinary tokens
    prompt, response = "is it good?", f" yes{special} no"
    for ended in (True, False):
        prompt_ids, generated = encode_pair(tokenizer, prompt, response, ended, generated=True)
        _, as_data = encode_pair(tokenizer, prompt, response, ended)
        assert generated.count(tokenizer.eos_token_id) == int(ended)  # only the end of an ended reply
        assert as_data.count(tokenizer.eos_token_id) == 1 + int(ended)
        assert generated[:len(spelled) + 2] == tokenizer(f" yes{special}", add_special_tokens=False,
                                                         split_special_tokens=True)["input_ids"][:len(spelled) + 2]
        plain = encode_pair(tokenizer, prompt, " yes no", ended, generated=True)[1]
        ending = plain[len(tokenizer(" yes no", add_special_tokens=False)["input_ids"]):]
        assert generated[len(generated) - len(ending):] == ending  # the end of turn as a plain reply's
    assert tokenizer(special, add_special_tokens=False)["input_ids"] == [tokenizer.eos_token_id]  # the state kept


def test_critic_starts_as_the_reward_model_of_every_prefix(family_dir):
    """Critic(rm) at position t = the reward model's score of tokens 0..t (left padding skipped), then mapped
    to the normalised scale by set_normalisation."""
    _, path = family_dir
    tokenizer = make_tokenizer()
    critic = Critic(load_reward_model(path, tokenizer.pad_token_id)).eval()
    ids = torch.randint(3, 60, (2, 7))
    padded = torch.cat([torch.full((2, 2), tokenizer.pad_token_id), ids], 1)  # left-padded, as in a rollout
    mask = torch.cat([torch.zeros(2, 2, dtype=torch.long), torch.ones_like(ids)], 1)
    with torch.no_grad():
        values = critic(padded, mask)[:, 2:]  # (2, 7)
        scores = torch.stack([reward_scores(critic.reward_model, ids[:, :t + 1], torch.ones_like(ids[:, :t + 1]))
                              for t in range(7)], 1)
        torch.testing.assert_close(values, scores, rtol=1e-4, atol=1e-5)
        critic.set_normalisation(2.0, 4.0)
        torch.testing.assert_close(critic(padded, mask)[:, 2:], (scores - 2) / 4, rtol=1e-4, atol=1e-5)


def test_a_bf16_checkpoint_loads_in_float32(tmp_path):
    """Most Hub models are saved in bf16, which transformers' default load keeps: trained as fp32 (no --bf16,
    so no fp32 master weights), most small Adam updates would round away. minrlhf loads every model in float32
    (--bf16 in bf16: DeepSpeed keeps fp32 masters), the bf16 values exactly."""
    path = save_tiny("llama", tmp_path / "model")
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    bf16.save_pretrained(tmp_path / "bf16")
    make_tokenizer().save_pretrained(tmp_path / "bf16")
    assert next(AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").parameters()).dtype == torch.bfloat16
    for model in (load_causal_lm(tmp_path / "bf16"), load_reward_model(tmp_path / "bf16", 0)):
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    torch.testing.assert_close(load_causal_lm(tmp_path / "bf16").state_dict(),
                               {k: v.float() for k, v in bf16.state_dict().items()}, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["causal", "rm"])
def test_bf16_loads_every_weight_as_the_float32_run_rounded(family_dir, kind):
    """--bf16 loads each model straight in bf16 (`load_model(bf16=True)`), not in float32 first (twice the host
    memory): the float32 load's weights rounded, the buffers (RoPE's inv_freq) those of float32, as DeepSpeed
    keeps them. Weights made after loading take the model's dtype (under ZeRO-3 DeepSpeed casts none), drawn as
    in a float32 run: a reward model's new head, LoRA's adapters (A drawn in float32, then rounded), PPO's
    value head (zero)."""
    from minrlhf.inputs import load_model
    from minrlhf.lora import add_lora
    _, path = family_dir
    models = []
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = load_model("--model", path, make_tokenizer(), False, kind, bf16=bf16)
        add_lora(model, 4, 8)
        models.append(model)
    full, half = models
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    for (name, a), b in zip(full.named_parameters(), half.parameters(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), name
    for (name, a), b in zip(full.named_buffers(), half.buffers(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    if kind == "causal":
        assert PolicyWithValueHead(half).value_head.weight.dtype == torch.bfloat16
