"""Merge policies trained from one base: average their weight changes (task vectors, Ilharco et al. 2023) and
scale the average, theta = base + scale * mean_i(theta_i - base).

    python merge.py --base runs/sft --policies runs/s0 runs/s1 runs/s2 --scale 1.5 --output runs/merged

Why: runs from one base with different seeds share the change that raises the reward and differ in the
rest, which costs KL and buys little. Their average keeps most of the gain at a fraction of the KL (Ramé et
al. 2024, "WARP": its second stage merges independently trained policies), and a scale above 1 spends the KL
saved on more reward; below 1 it moves back toward the base (WARP's third stage, LITI). How fast KL grows with
the scale differs from merge to merge (measured: two PPO seeds at 1.2, 1.8x the plain average's KL; three GRPO
seeds at 1.5, 2.4x; three PPO seeds at 1.45, 1.6x): score a few scales' KL before picking one.
"""
import os

import torch

from minrlhf.cli import (LOAD_ERRORS, OneLineArgumentParser, check_writable, fail, fail_to_load, nonempty,
                         non_negative, quiet_libraries)
from minrlhf.models import load_causal_lm
from transformers import AutoTokenizer  # after minrlhf: Hub offline mode where the Hub does not resolve


def merge_task_vectors(base, policies, scale):
    """base + scale * mean_i(policy_i - base), key by key, in float64, stored in the base's dtype; tensors
    that are not floating point (masks, ids) are the base's. base, policies: state dicts of one model's
    architecture."""
    merged = {}
    for key, weight in base.items():
        if not weight.is_floating_point():
            merged[key] = weight
            continue
        exact = weight.double()
        change = sum(policy[key].double() - exact for policy in policies) / len(policies)
        merged[key] = (exact + scale * change).to(weight.dtype)
    return merged


def parse_args(argv=None):
    p = OneLineArgumentParser(description="Merge policies trained from one base: their mean weight change, "
                                          "scaled, added to the base.")
    p.add_argument("--base", type=nonempty, required=True, help="the model the policies were trained from")
    p.add_argument("--policies", type=nonempty, nargs="+", required=True,
                   help="policies trained from --base (e.g. --stage grpo with different --seed)")
    p.add_argument("--scale", type=non_negative, default=1.0,
                   help="multiplies the mean weight change: 1 the plain average, > 1 past it, 0 the base")
    p.add_argument("--output", type=nonempty, required=True, help="new folder for the merged policy")
    return p.parse_args(argv)


def load(flag, path):
    """(causal LM, tokenizer), or one line naming the flag and what failed."""
    try:
        return load_causal_lm(path), AutoTokenizer.from_pretrained(path)
    except LOAD_ERRORS as e:
        fail_to_load(flag, path, f"cannot load as a causal LM ({str(e).splitlines()[0]})")


def check_like_base(path, policy, tokenizer, base, base_tokenizer, base_path):
    """One line unless the policy has the base's tokens and weights of the base's names and shapes."""
    if tokenizer.get_vocab() != base_tokenizer.get_vocab():
        fail(f"--policies {path}: a tokenizer other than --base {base_path}'s; pass policies trained from it")
    for key, weight in base.items():
        if key not in policy or policy[key].shape != weight.shape:
            found = f"shape {tuple(policy[key].shape)}" if key in policy else "no such weight"
            fail(f"--policies {path}: {key}: {found}, where --base {base_path} has {tuple(weight.shape)}; "
                 f"pass policies trained from it")


def main(argv=None):
    args = parse_args(argv)
    quiet_libraries()
    if os.path.isdir(args.output) and os.listdir(args.output):  # never write over a model
        fail(f"--output {args.output}: not empty; choose a new folder")
    check_writable("--output", args.output, args.output)
    model, tokenizer = load("--base", args.base)
    base = model.state_dict()
    policies = []
    for path in args.policies:
        policy, policy_tokenizer = load("--policies", path)
        policies.append(policy.state_dict())
        check_like_base(path, policies[-1], policy_tokenizer, base, tokenizer, args.base)
    with torch.no_grad():
        model.load_state_dict(merge_task_vectors(base, policies, args.scale))
    try:
        model.save_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
    except OSError as e:  # disk full, permissions
        fail(f"--output {args.output}: cannot write the merged policy there ({e})")
    print(f"{args.output}: {args.base} + {args.scale:g} x the mean change of {len(policies)} policies")


if __name__ == "__main__":
    main()
