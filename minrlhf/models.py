"""Models: a causal LM with a value head (policy and critic on one backbone), the reward model, a standard
AutoModelForSequenceClassification (num_labels=1) so plain transformers loads what we save, and PPO's critic
as a network of its own, started from the reward model (`Critic`, the default).
Shapes: B batch, P prompt length, R response or reply length, T = P + R, V vocab, H hidden size, K
positions kept.
"""
import contextlib
import math

import torch
from jinja2 import TemplateSyntaxError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from .data import encode_pair, last_tokens, pad_with_mask, prompts_before_replies
from .losses import logprobs_from_logits


def dropout_free_config(path, **overrides):
    """The model's config with every dropout probability set to 0 (and OPT's layerdrop, which skips whole
    layers): in RL, dropout makes the log-probs of the update disagree with those of the rollout, and it
    makes reward scores noisy."""
    config = AutoConfig.from_pretrained(path, **overrides)
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or key.endswith(("pdrop", "layerdrop"))):
            setattr(config, key, 0.0)
    return config


def load_causal_lm(path, dtype=torch.float32):
    """A causal LM in `dtype` whatever the checkpoint's: float32 by default, where transformers' default keeps
    the checkpoint's (most Hub models: bf16), as bf16 weights trained without fp32 master copies round most
    small Adam updates away. --bf16 passes bf16: DeepSpeed makes its fp32 masters from the bf16 weights, so
    loading float32 first would only double the host memory. A checkpoint that lacks some of its weights (an
    encoder) is refused, where transformers would initialise the missing head at random and carry on, and so
    is a reward model, whose LM head may be tied to its embeddings (SmolLM2, GPT-2): then no weight is
    missing, but its score head is left over."""
    model, info = AutoModelForCausalLM.from_pretrained(
        path, config=dropout_free_config(path), dtype=dtype, output_loading_info=True)
    if info["missing_keys"]:
        missing = ", ".join(sorted(info["missing_keys"])[:3])
        raise ValueError(f"not a causal LM checkpoint, weights missing: {missing}")
    if any(key.startswith("score.") for key in info["unexpected_keys"]):
        raise ValueError("not a causal LM checkpoint: a reward model (it has a score head)")
    return model


def load_tokenizer_of(path):
    """The tokenizer saved with a model. One that encodes text to no tokens is refused: for a folder without
    tokenizer files (a model's config and weights alone) transformers builds an empty GPT-2 tokenizer of one
    token, which turns every prompt into no tokens and every figure computed from them into noise; so is a
    chat template that does not parse."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.encode("a", add_special_tokens=False):
        raise ValueError("an empty tokenizer that encodes text to no tokens: what transformers loads from a "
                         "folder without tokenizer files; expected tokenizer.json, vocab.json or the like")
    if tokenizer.chat_template:  # a template that does not parse: the model's fault, not the first row's
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False)
        except TemplateSyntaxError as e:
            raise ValueError(f"its chat template does not parse ({e.message}, line {e.lineno})") from None
        except Exception:  # it parses; what it refuses (a user turn alone), the rows' own messages will meet
            pass
    return tokenizer


def position_limit(model):
    """How many positions `model` reads; None for no limit (ALiBi: BLOOM). Past it, learned position
    embeddings (GPT-2, OPT) fail deep in the forward, and rotary ones meet positions never trained on.
    LongRoPE (Phi-3-128k, Phi-3.5): its original range, past which transformers rotates every row of a batch
    by the long factors as soon as one row is longer (mid-generation too): a row's log-probs would change."""
    config = model.config.get_text_config()
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "longrope":
        return rope["original_max_position_embeddings"]
    return getattr(config, "max_position_embeddings", None)


def vocab_size(model):
    """How many token ids `model` reads: its input embeddings' rows (past them: an IndexError in forward)."""
    return model.get_input_embeddings().num_embeddings


def within_positions(model, length):
    """`length`, or `model`'s positions if fewer: a reward model reads text decoded and encoded again, which
    may come out longer than the tokens that were sampled (score_texts then keeps the last ones)."""
    return min(length, position_limit(model) or length)


def position_ids(attention_mask):
    """Positions that skip left padding, as generate() computes them, so that a forward over a
    left-padded batch gives the same log-probs as the rollout did. (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_positions(input_ids, prompt_len):
    """The positions whose outputs belong to the response tokens: P-1 .. T-2, (R,). The logits at position
    t predict token t+1, and the value there is of the state before token t+1 is chosen:

        token      p0   p1   p2 | r0   r1   r2        (P = 3, R = 3, T = 6)
        position    0    1    2 |  3    4    5
        predicts   p1   p2   r0 | r1   r2   --        so r_i's log-prob and value sit at P-1+i
    """
    return torch.arange(prompt_len - 1, input_ids.shape[1] - 1, device=input_ids.device)


def sampled_logprobs(logits, response, temperature):
    """Logits as the sampler saw them, divided by the temperature in float32, as generate() scales them
    (bf16 would round them again), and the log-probs of the response tokens under them.
    (B, R, V), (B, R) -> (B, R, V), (B, R)."""
    logits = logits.float() / temperature
    return logits, logprobs_from_logits(logits, response)


def response_logprobs(model, input_ids, attention_mask, prompt_len, temperature):
    """Log-probs, at the sampling temperature, of the response tokens of left-padded prompt + response
    rows, from a plain causal LM (PPO's reference; DPO's policy and reference, via `reply_logprobs`).
    (B, T) -> (B, R). Only the positions that predict the response need the LM head, a large matmul at
    V = 50k-150k: `response_positions`."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                   position_ids=position_ids(attention_mask),
                   logits_to_keep=response_positions(input_ids, prompt_len)).logits  # (B, R, V)
    return sampled_logprobs(logits, input_ids[:, prompt_len:], temperature)[1]


def reply_logprobs(model, groups):
    """Log-probs of the chosen and the rejected replies, summed over their tokens, (B,) each, from
    `collate_pairs` groups: each reply after its prompt, left-padded so that every reply starts at P."""
    sums = []
    for group in groups:
        P = group["prompt_ids"].shape[1]
        ids = prompts_before_replies(group["prompt_ids"], group["reply_ids"])  # (2B, T)
        logprobs = response_logprobs(model, ids, group["attention_mask"], P, 1.0)  # (2B, R)
        sums.append(torch.where(group["attention_mask"][:, P:].bool(), logprobs, 0.0).sum(1))
    return torch.cat(sums).view(-1, 2).unbind(1)  # rows chosen 0, rejected 0, chosen 1, ... -> two (B,)


class PolicyWithValueHead(nn.Module):
    """Policy and critic on one backbone (--critic-model head): one forward gives next-token logits and
    per-token values. The value head reads the last hidden state and starts at zero, so the critic starts
    neutral. value_head=False: a policy alone (GRPO, RLOO; PPO with a `Critic`), whose values are None."""

    def __init__(self, backbone, value_head=True):
        super().__init__()
        self.backbone = backbone
        head = backbone.get_output_embeddings()  # reads the last hidden state (OPT-350m: projected)
        # in the backbone's dtype: under ZeRO-3 DeepSpeed casts no weight of a model with partitioned ones
        self.value_head = nn.Linear(head.in_features, 1, dtype=head.weight.dtype) if value_head else None
        if value_head:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, logits_to_keep=0):
        """-> logits at `logits_to_keep` (0: all positions; n: the last n; a tensor: those), (B, K, V) for
        the K positions kept, and values (B, T) or None."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            position_ids=position_ids(attention_mask), logits_to_keep=logits_to_keep,
                            output_hidden_states=self.value_head is not None)
        if self.value_head is None:
            return out.logits, None
        hidden = out.hidden_states[-1].to(self.value_head.weight.dtype)  # (B, T, H)
        return out.logits, self.value_head(hidden).squeeze(-1)


class Critic(nn.Module):
    """PPO's critic as a network of its own, initialised from the reward model (Ouyang et al. 2022, sec.
    3.5; Huang et al. 2024, "The N+ implementation details"): the reward model's scalar head read at every
    position, so that at the start the value of each prefix is the reward model's score of that prefix, on
    the scale of PPO's normalised scores once `set_normalisation` gives it their mean and std."""

    def __init__(self, reward_model):
        super().__init__()
        self.reward_model = reward_model
        self.register_buffer("shift", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))

    def set_normalisation(self, mean, std):
        self.shift.fill_(mean)
        self.scale.fill_(std)

    def forward(self, input_ids, attention_mask):
        """-> values (B, T); the value at t reads the sequence up to and including token t."""
        body = self.reward_model.base_model  # the transformer without its head
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                      position_ids=position_ids(attention_mask)).last_hidden_state  # (B, T, H)
        return (self.reward_model.score(hidden).squeeze(-1).float() - self.shift) / self.scale


def load_reward_model(path, pad_token_id, new_head=True, whole=contextlib.nullcontext, dtype=torch.float32):
    """A reward model, in `dtype` as `load_causal_lm`: backbone + scalar head read at the last non-pad token
    (transformers' sequence-classification pooling, hence a pad token distinct from EOS). A new head is drawn
    with mean 0 and std 1/sqrt(H+1), H its input's width (Stiennon et al. 2020; Huang et al. 2024, "The N+
    implementation details"), within `whole(params)`: the context in which partitioned weights are whole and
    writable (ZeRO-3's; a partition alone would be drawn); new_head=False refuses a checkpoint without one."""
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, config=dropout_free_config(path, num_labels=1), dtype=dtype, output_loading_info=True)
    if any(key.startswith("score.") for key in info["missing_keys"]):
        if not new_head:
            raise ValueError("not a reward model: it has no trained score head")
        with whole(list(model.score.parameters())):
            nn.init.normal_(model.score.weight, std=1 / math.sqrt(model.score.in_features + 1))
            if getattr(model.score, "bias", None) is not None:
                nn.init.zeros_(model.score.bias)
    model.config.pad_token_id = pad_token_id
    return model


def reward_scores(reward_model, input_ids, attention_mask):
    """Scalar reward per right-padded sequence: (B, T) -> (B,)."""
    return reward_model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()


def pair_scores(reward_model, prompt_ids, reply_ids, attention_mask):
    """Scores of B pairs of replies, each prompt run once: its keys and values (the KV cache, copied for
    its two rows) serve both replies, which attend to exactly what they would in the full sequences.
    On HH-RLHF at 256 tokens this needs 1.6x fewer tokens than scoring chosen and rejected in full.
    prompt_ids (B, P) left-padded with P >= 1, reply_ids (2B, R) right-padded, rows chosen 0, rejected 0,
    chosen 1, ..., attention_mask (2B, P+R) -> (B, 2). A cache that cannot be repeated: in full after all."""
    prompt_mask = attention_mask[::2, :prompt_ids.shape[1]]  # (B, P)
    cache = reward_model(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True,
                         position_ids=position_ids(prompt_mask)).cache
    if not repeatable(cache):
        return full_pair_scores(reward_model, prompt_ids, reply_ids, attention_mask)
    cache.batch_repeat_interleave(2)  # every layer's (B, ...) keys and values -> (2B, ...)
    positions = position_ids(attention_mask)[:, prompt_ids.shape[1]:]  # (2B, R): each reply goes on from P
    return reward_model(input_ids=reply_ids, attention_mask=attention_mask, position_ids=positions,
                        cache=cache).logits.float().view(-1, 2)


def repeatable(cache):
    """Whether every layer of `cache` holds only keys and values, which `pair_scores` repeats for the second
    reply: no recurrent state (Mamba's, linear attention's: Jamba, Zamba, Qwen3-Next), which transformers
    does not repeat."""
    return not any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in cache.layers)


def full_pair_scores(reward_model, prompt_ids, reply_ids, attention_mask):
    """What `pair_scores` computes, from the same inputs, with each prompt + reply run in full. -> (B, 2)"""
    ids = prompts_before_replies(prompt_ids, reply_ids)  # (2B, P+R)
    return reward_model(input_ids=ids, attention_mask=attention_mask, use_cache=False,
                        position_ids=position_ids(attention_mask)).logits.float().view(-1, 2)


def score_pairs(reward_model, groups):
    """Scores of the chosen and the rejected replies, (B,) each, from `collate_pairs` groups: what scoring
    each prompt + reply in full gives (`reward_scores`; tested), with each prompt run once (`pair_scores`).
    Gradient checkpointing turns the KV cache off in training; there each pair is run in full."""
    cache_off = reward_model.training and torch.is_grad_enabled() and reward_model.is_activation_checkpointing
    score = full_pair_scores if cache_off else pair_scores
    return torch.cat([score(reward_model, **group) for group in groups]).unbind(1)  # chosen, rejected


@torch.no_grad()
def score_texts(reward_model, tokenizer, prompts, responses, max_length, device="cpu", ended=None):
    """Reward of each (prompt, response) text, encoded as in training (`encode_pair`), so a reward model
    may have its own tokenizer and chat template. ended[i] False: response i was cut off at the token limit
    and is scored as such, without the end of turn and EOS it did not generate (default: all ended).
    Past max_length it keeps each sequence's last tokens (`last_tokens`: a BOS stays), where training cuts a
    pair's shared prompt to fit its longer reply. -> (B,)"""
    ended = [True] * len(prompts) if ended is None else ended
    seqs = [last_tokens(sum(encode_pair(tokenizer, p, r, e, generated=True), []), max_length, tokenizer)
            for p, r, e in zip(prompts, responses, ended)]
    ids, mask = pad_with_mask(seqs, tokenizer.pad_token_id)  # (B, T) right-padded
    return reward_scores(reward_model, ids.to(device), mask.to(device))
