"""What the flags name, loaded and checked for train.py: the offline example and the per-stage defaults for
absent flags, the flags each stage reads, tokenizer, models, examples, reward functions.
Every failure is one line naming the flag or file (`fail`), before any training starts; a reward function's
bad return, met in training, stops every rank at that step."""
import argparse
import importlib
import numbers
import os
import sys
from collections.abc import Mapping, Set

import torch
import torch.distributed as dist

from .cli import (CRITIC_NORMALISATION, LOAD_ERRORS, check_embeddings, check_not_critic, fail, fail_to_load,
                  fail_together, first_line, same_path)
from .data import (ONLINE, DataError, check_columns, ensure_pad_token, held_out, load_rows, sequence_length,
                   tokenize)
from .defaults import SENTIMENT_DATA, default_model
from .engine import frozen, writable
from .lora import LoRALinear, WithoutAdapters, add_lora
from .models import Critic, load_causal_lm, load_reward_model, load_tokenizer_of, position_limit, vocab_size


def offline_defaults(args):
    """No --model, --dataset or reward: the offline sentiment example, each stage starting from the last (one
    stopped before its final model is named, so that loading it says so, rather than silently passed over)."""
    if args.model is None:
        try:
            args.model = "runs/sft" if args.stage != "sft" and os.path.isdir("runs/sft") else default_model()
        except RuntimeError as e:
            fail(str(e))
    args.dataset = args.dataset or SENTIMENT_DATA[args.stage]
    if args.stage in ONLINE and same_path(args.dataset, SENTIMENT_DATA[args.stage]):  # however it was named
        args.gold_fn = args.gold_fn or "vader"  # the judge that plays the human labeller
        if args.missing_eos_penalty is None:  # answers that run into the token cap lose (Huang et al. 2024)
            args.missing_eos_penalty = 1.0
    if args.stage in ONLINE and not (args.reward_model or args.reward_fn) and os.path.isdir("runs/rm"):
        args.reward_model = "runs/rm"


def check_online_args(args):
    """The online stages' flags: the per-stage defaults filled in (see their help), contradictions refused."""
    G = args.num_generations = args.num_generations or (1 if args.stage == "ppo" else 4)
    args.ppo_epochs = args.ppo_epochs or (2 if args.stage == "ppo" else 1)
    args.rollout_batch_size = args.rollout_batch_size or (16 if args.stage == "ppo" else 4)
    if args.stage == "ppo" and args.rollout_batch_size * G < 2:  # one response's whitening removes its score
        fail(f"--rollout-batch-size {args.rollout_batch_size}: --stage ppo whitens the advantages over each "
             f"rank's responses, at least 2 of them")
    if args.stage != "ppo" and G < 2:
        fail(f"--num-generations {G}: --stage {args.stage} needs at least 2 samples per prompt (each one's "
             f"baseline comes from its prompt's samples)")
    if args.mini_batch_size:
        if args.grad_accum and args.grad_accum * args.batch_size != args.mini_batch_size:  # given, and other
            fail(f"--grad-accum {args.grad_accum} x --batch-size {args.batch_size} contradicts "
                 f"--mini-batch-size {args.mini_batch_size}, which sets --grad-accum; pass one of them")
        if args.mini_batch_size % args.batch_size:
            fail(f"--mini-batch-size {args.mini_batch_size} is not a multiple of --batch-size "
                 f"{args.batch_size}")
        args.grad_accum = args.mini_batch_size // args.batch_size
    args.grad_accum = args.grad_accum or 1
    if args.rollout_batch_size * G % (args.batch_size * args.grad_accum):
        times = f" x --num-generations {G}" if G > 1 else ""
        fail(f"--rollout-batch-size {args.rollout_batch_size}{times} is not a multiple of the mini-batch "
             f"(--batch-size x --grad-accum = {args.batch_size * args.grad_accum})")
    if (args.reward_model is None) == (args.reward_fn is None):
        fail(f"--stage {args.stage} needs exactly one of --reward-model DIR or --reward-fn MODULE:FUNCTION")
    if args.reward_model:
        check_not_critic("--reward-model", args.reward_model)
    if args.target_kl and not args.kl_coef:
        fail("--target-kl adapts --kl-coef by a factor at each iteration: it needs --kl-coef > 0")
    args.missing_eos_penalty = args.missing_eos_penalty or 0.0
    if args.stage == "ppo":  # the value function: a critic from the reward model (InstructGPT), or the head
        args.critic_model = args.critic_model or args.reward_model or "head"
        head = args.critic_model == "head"
        if args.vf_coef is not None and not head:
            fail(f"--vf-coef weighs the value head's loss in the policy's; the critic of --critic-model "
                 f"{args.critic_model} has a loss and optimizer of its own (--value-lr)")
        args.vf_coef = 0.1 if args.vf_coef is None else args.vf_coef
        args.lam = (1.0 if head else 0.95) if args.lam is None else args.lam
        args.value_lr = args.value_lr or (None if head else 1e-4)  # None: the head learns at --lr


NOT_GIVEN = object()  # a stage flag's value until check_stage_flags, where the command line did not give it
STAGE_FLAGS = {  # flags that only some stages read: given to another, an error rather than ignored
    "beta": ("dpo",), "ref_model": ("dpo", *ONLINE), "scale_rewards": ("grpo",),
    "eval_fraction": ("sft", "rm", "dpo"),  # the online stages hold out no rows: eval.py scores their policy
    **dict.fromkeys(("reward_model", "reward_fn", "gold_fn", "max_new_tokens", "rollout_batch_size",
                     "num_generations", "ppo_epochs", "mini_batch_size", "loss_agg", "kl_coef", "target_kl",
                     "cliprange", "temperature", "reward_norm", "missing_eos_penalty"), ONLINE),
    **dict.fromkeys(("critic_model", "value_lr", "vf_coef", "cliprange_value", "gamma", "lam",
                     "whiten_rewards"), ("ppo",)),  # the critic's and GAE's
}


def unset_stage_flags():
    """The namespace to parse into: argparse gives a flag its default only where the namespace lacks it, so a
    stage flag still NOT_GIVEN after parsing was not on the command line (`check_stage_flags`)."""
    return argparse.Namespace(**dict.fromkeys(STAGE_FLAGS, NOT_GIVEN))


def check_stage_flags(args, parser):
    """A flag given to a stage that does not read it is an error, not silently ignored, even at its default
    value (`--stage dpo --kl-coef 0.1`); those not given get their defaults here."""
    for name, stages in STAGE_FLAGS.items():
        if getattr(args, name) is NOT_GIVEN:
            setattr(args, name, parser.get_default(name))
        elif args.stage not in stages:
            fail(f"--{name.replace('_', '-')}: --stage {args.stage} does not use it (a flag of "
                 f"{', '.join(stages)})")


def load_tokenizer(flag, path):
    """-> (tokenizer with a pad token distinct from EOS, True if that token was added: resize the model)."""
    try:
        tokenizer = load_tokenizer_of(path)
    except LOAD_ERRORS as e:
        fail_to_load(flag, path, f"cannot load its tokenizer ({first_line(e)})")
    try:
        return tokenizer, ensure_pad_token(tokenizer)
    except DataError as e:
        fail(f"{flag} {path}: unusable tokenizer ({e})")


def load_model(flag, path, tokenizer, resize, kind="causal", longest=0, reads=None, bf16=False):
    """A causal LM, or a reward model ("rm": a new head is fine; "reward": a trained head is required),
    whose vocabulary and pad id agree with the tokenizer, with positions for `longest` tokens and embeddings
    for the token ids it `reads` (default: the tokenizer's; a reference or critic: all the policy samples);
    its weights in float32, or in bf16 (--bf16)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    try:
        if kind == "causal":
            model = load_causal_lm(path, dtype)
        else:
            model = load_reward_model(path, tokenizer.pad_token_id, new_head=kind == "rm", whole=writable,
                                      dtype=dtype)
    except LOAD_ERRORS as e:
        as_what = "a causal LM" if kind == "causal" else "a reward model"
        fail_to_load(flag, path, f"cannot load as {as_what} ({first_line(e)})")
    if resize:
        model.resize_token_embeddings(len(tokenizer))
    reads = reads or len(tokenizer)
    # e.g. a critic of another model family, a policy with spare embeddings
    check_embeddings(flag, path, vocab_size(model), reads,
                     "the policy can sample" if reads > len(tokenizer) else "its tokenizer has")
    limit = position_limit(model)
    if limit and longest > limit:
        fail(f"{flag} {path}: {limit} positions, fewer than the {longest} tokens of the run's longest "
             f"sequence; lower --max-length (or, for the stages that sample, --max-new-tokens)")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def adapt(model, args, source=None):
    """The model to train as the flags ask: --lora-rank freezes it but for LoRA adapters and a reward model's
    (or critic's) score head; --gradient-checkpointing. `source` names it in errors (default --model's).
    -> model, in training mode (from_pretrained gives eval mode, in which transformers does not checkpoint)"""
    source = source or f"--model {args.model}"
    if not args.lora_rank and (args.lora_alpha or args.lora_targets != "all-linear"):
        fail("--lora-alpha and --lora-targets shape LoRA adapters: pass --lora-rank R > 0 with them")
    if args.lora_rank:
        if "all-linear" in args.lora_targets.split(",") and args.lora_targets != "all-linear":
            fail(f"--lora-targets {args.lora_targets}: all-linear adapts every projection; pass it alone, or "
                 f"names alone")
        alpha = args.lora_alpha or 2 * args.lora_rank
        try:
            add_lora(model, args.lora_rank, alpha, args.lora_targets)
        except ValueError as e:
            fail(f"--lora-rank {args.lora_rank}: {e} in {source}; LoRA's update is low-rank")
        adapted = {name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, LoRALinear)}
        absent = [t for t in args.lora_targets.split(",") if t not in adapted | {"all-linear"}]  # e.g. typos
        if not adapted or absent:
            fail(f"--lora-targets {args.lora_targets}: no nn.Linear or Conv1D layer of that name in the "
                 f"transformer body of {source}: {', '.join(map(repr, absent or [args.lora_targets]))}")
        if hasattr(model, "score"):  # a sequence classifier: its head trains whole
            model.score.requires_grad_(True)
    if args.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            fail(f"--gradient-checkpointing: {source} ({type(model).__name__}) does not support it")
        model.activation_checkpointing_enable({"use_reentrant": False})  # transformers' own, non-reentrant
    return model.train()


def reference(policy, args, cfg, device, tokenizer, resize):
    """The frozen reference of the KL penalty and of DPO: --ref-model; or, with LoRA, the policy's own base
    weights with its adapters off (one copy of the base model, not two); or a copy of --model."""
    if args.lora_rank and not args.ref_model:
        return WithoutAdapters(policy)
    if args.ref_model:  # its own tokenizer says whether it lacks the pad token's embedding, as --model's does
        resize = same_tokens("--ref-model", args.ref_model, tokenizer, f"--ref-model {args.ref_model}: a "
                             f"tokenizer other than --model's, so its log-probs would be of other tokens; "
                             f"pass a reference with --model's tokenizer")
    samples = vocab_size(policy) if args.stage in ONLINE else None  # DPO's reference reads the data alone
    ref = load_model("--ref-model", args.ref_model or args.model, tokenizer, resize, longest=args.longest,
                     reads=samples, bf16=args.bf16)
    return frozen(ref, cfg, device)


def load_critic(args, tokenizer, policy):
    """PPO's critic from --critic-model, a reward model that reads the policy's tokens: its tokenizer's."""
    path, name = args.critic_model, f"--critic-model {args.critic_model}"
    resize = same_tokens("--critic-model", path, tokenizer, f"{name} (default: --reward-model): a "
                         f"tokenizer other than --model's, whose tokens a critic reads; pass --critic-model "
                         f"head, or one with --model's tokenizer")
    critic = Critic(adapt(load_model("--critic-model", path, tokenizer, resize, "reward", args.longest,
                                     vocab_size(policy), bf16=args.bf16), args, name))
    saved = os.path.join(path, CRITIC_NORMALISATION)  # a critic a PPO run saved: its values' scale
    if os.path.isfile(saved):
        try:
            critic.set_normalisation(**torch.load(saved))
        except Exception as e:  # cut short (EOFError), other keys (TypeError), not torch's
            fail(f"{name}: {CRITIC_NORMALISATION} is unreadable ({type(e).__name__}: {first_line(e)}); "
                 f"expected the mean and std a PPO run saved beside its critic")
    return critic


def same_tokens(flag, path, tokenizer, error):
    """A model that reads the policy's token ids needs the policy's vocabulary: else `error`. -> whether its
    own tokenizer had the pad token added (`load_tokenizer`): its embeddings then need resizing."""
    own, resize = load_tokenizer(flag, path)
    if own.get_vocab() != tokenizer.get_vocab():
        fail(error)
    return resize


def load_examples(args, tokenizer):
    """Tokenized (train, eval) examples for the stage; all data errors surface here, before training.
    Sets args.longest: the tokens of the run's longest sequence, which every model must have positions for."""
    try:
        rows = load_rows(args.dataset, chat=bool(tokenizer.chat_template), stage=args.stage)
        check_columns(rows, args.stage, args.dataset)
    except DataError as e:
        fail(str(e))
    try:
        examples, dropped = tokenize(rows, args.stage, tokenizer, args.max_length)
    except (DataError, UnicodeDecodeError) as e:  # the latter: text that is not UTF-8, read lazily
        fail(f"{args.dataset}: {e}")
    why = (f"an empty reply (hh-rlhf: transcripts that differ before the last reply), no response token "
           f"within --max-length {args.max_length} or a pair's replies alike")
    if dropped and dist.get_rank() == 0:
        print(f"{args.dataset}: dropped {dropped} of {len(rows)} rows: {why}")
    online = args.stage in ONLINE  # prompts to sample from, no held-out rows
    cut = sum(e["cut"] for e in examples)  # rows past --max-length
    if cut and dist.get_rank() == 0:
        how = (f"prompts longer than --max-length {args.max_length}: the policy reads their last "
               f"{args.max_length} tokens, the reward the whole prompt" if online else
               f"rows longer than --max-length {args.max_length}: their prompts or replies cut to fit")
        print(f"{args.dataset}: {cut} of {len(examples)} {how}")
    train, evals = (examples, []) if online else held_out(examples, args.eval_fraction)
    if not evals and args.eval_fraction > 0 and not online and dist.get_rank() == 0:  # no prompt hashed below
        print(f"{args.dataset}: --eval-fraction {args.eval_fraction} of {len(examples)} usable rows holds "
              f"out none: no held-out evaluation")
    batch = (args.rollout_batch_size if online else args.batch_size * args.grad_accum) * dist.get_world_size()
    if len(train) < batch:  # else an epoch holds no batch (or one optimizer step reads the rows many times)
        size = "--rollout-batch-size x ranks" if online else "--batch-size x --grad-accum x ranks"
        held = "" if online else f"; --eval-fraction holds out {len(evals)}"
        fail(f"{args.dataset}: {len(train)} usable training rows ({dropped} dropped: {why}); need at least "
             f"one batch of {batch} ({size}){held}")
    args.longest = max(map(sequence_length, examples)) + (args.max_new_tokens if online else 0)  # tokens
    return train, evals


class RewardFunction:
    """--reward-fn / --gold-fn MODULE:FUNCTION (or 'vader'): the user's f(prompts, responses) -> list of
    floats, each call checked item by item -> (B,) tensor."""

    def __init__(self, flag, spec, allow_nonfinite=False):
        self.flag, self.spec, self.allow_nonfinite = flag, spec, allow_nonfinite
        module, colon, name = {"vader": "minrlhf.defaults:vader"}.get(spec, spec).partition(":")
        if not (colon and name):
            fail(f"{flag} {spec}: expected MODULE:FUNCTION (or vader)")
        sys.path.insert(0, os.getcwd())
        try:
            self.fn = getattr(importlib.import_module(module), name)
        except (Exception, SystemExit) as e:  # a module that runs argparse or sys.exit() when imported
            fail(f"{flag} {spec}: cannot import ({type(e).__name__}: {first_line(e)}); expected "
                 f"MODULE:FUNCTION")
        if not callable(self.fn):
            fail(f"{flag} {spec}: not callable")

    def __call__(self, prompts, responses, ended=None):
        """-> (B,) scores; a bad call on any rank stops every rank with its message (`fail_together`). The
        function sees the text as generated (`ended`, whether each response came to its EOS, is for reward
        models, whose chat template would otherwise close a cut-off turn)."""
        scores, error = self.checked_call(prompts, responses)
        fail_together(error)
        return scores

    def checked_call(self, prompts, responses):
        """-> (scores, None), or (None, what was wrong)."""
        name = f"{self.flag} {self.spec}"
        try:
            returned = self.fn(prompts, responses)
            iterable = hasattr(returned, "__iter__") and getattr(returned, "ndim", 1) > 0  # not a 0-d tensor
            out = list(returned) if iterable else None  # a generator runs here
        except (Exception, SystemExit, KeyboardInterrupt) as e:  # the user's code may call sys.exit() too
            return None, f"{name} raised {type(e).__name__}: {first_line(e)}"
        if out is None or isinstance(returned, (Mapping, Set)):  # None: no `return`; a dict lists its keys
            return None, f"{name} returned {returned!r:.80}; expected a list of {len(prompts)} numbers"
        if len(out) != len(prompts):
            return None, f"{name} returned {len(out)} scores for {len(prompts)} responses"
        scores = [as_score(x, self.allow_nonfinite) for x in out]
        if None in scores:
            i = scores.index(None)
            return None, f"{name}: score {i} is {out[i]!r}; expected a finite number (float32: |x| < 3.4e38)"
        return torch.tensor(scores), None


def as_score(x, allow_nonfinite):
    """x as a float, or None: not a real number (a bool, text), or past float32's range (the scores' dtype,
    where it would be inf) unless non-finite scores are allowed. A tensor of one element is its number."""
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        return None
    try:
        value = float(x)
    except OverflowError:  # an int or a Fraction past any float
        return None
    return value if allow_nonfinite or abs(value) <= torch.finfo(torch.float32).max else None
