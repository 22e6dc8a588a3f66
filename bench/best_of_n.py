"""Best-of-n from the SFT policy on the held-out prompts: how much gold a given KL can buy.

    python bench/best_of_n.py --policy runs/sft --reward-model runs/rm --n 64 --bf16

Samples n answers per prompt (as eval.py: temperature 0.7, 48 tokens), scores each with the reward model and
the gold judge, and for k = 1, 2, 4, ..., n prints the mean gold of the answer the reward model ranks best of
k, and of the one the gold judge ranks best (the most gold best-of-k can reach). Best-of-k's KL to the sampled
policy is at most log k - (k-1)/k nats (the formula of Stiennon et al. 2020, an upper bound: Beirami et al.
2024), the KL eval.py measures of a trained policy. Each prompt's n answers are split into n/k disjoint sets
of k, so every k uses all of them. Then, for PPO's kl_coef beta from 1 to 0.1, the KL and gold of the optimum
of the objective PPO maximises, E[r] - beta KL, with r as PPO shapes it (normalised, less the EOS penalty),
estimated on the same answers (`regularised_optimum`): what a perfect optimiser of that reward would reach.
"""
import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minrlhf as M  # noqa: E402
from eval import load_reward_model, reward_model_scores  # noqa: E402
from minrlhf.defaults import SENTIMENT_DATA, vader  # noqa: E402
from minrlhf.sampling import load_chat_model, sample  # noqa: E402


def best_of(scores, judge, k):
    """Mean of `judge` over the answers `scores` ranks best within each disjoint set of k: (N, n) -> float."""
    N, n = scores.shape
    sets = scores.view(N, n // k, k).argmax(-1, keepdim=True)  # (N, n/k)
    return judge.view(N, n // k, k).gather(-1, sets).mean().item()


def shaped(scores, ended, missing_eos_penalty):
    """Scores as PPO optimises them: mean 0 and std 1 over all answers, less the penalty where no EOS came."""
    return (scores - scores.mean()) / scores.std() - missing_eos_penalty * (~ended).float()


def regularised_optimum(scores, judge, beta):
    """The optimum of the KL-regularised objective PPO optimises, max E[r] - beta KL(pi || pi_sft), which is
    pi*(y) ~ pi_sft(y) exp(r(y) / beta) (Ziegler et al. 2019; Rafailov et al. 2023, eq. 4), on the n answers
    sampled per prompt: answer i weighs w_i = softmax(r / beta)_i (self-normalised importance sampling),
    its KL is sum_i w_i log(n w_i) (at most log n: the optimum's own KL is larger).
    (N, n) -> (KL, mean judge score)."""
    n, w = scores.shape[1], torch.softmax(scores / beta, 1)  # (N, n)
    return torch.special.xlogy(w, n * w).sum(1).mean().item(), (w * judge).sum(1).mean().item()


def answers(args, prompts):
    """n sampled answers per prompt, in order: read from --answers if that file exists, else sampled (and
    written there, so that other reward models can be compared on the very same answers)."""
    if args.answers and os.path.exists(args.answers):
        with open(args.answers) as f:
            return [json.loads(line) for line in f]
    torch.manual_seed(args.seed)
    policy, tokenizer = load_chat_model(args.policy, torch.bfloat16 if args.bf16 else torch.float32)
    rows = sample(policy, tokenizer, [q for q in prompts for _ in range(args.n)], 0.7, 48, batch_size=64)
    rows = [{"prompt": r["prompt"], "text": r["text"], "ended": r["ended"]} for r in rows]
    if args.answers:
        with open(args.answers, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="runs/sft", help="policy to sample from")
    p.add_argument("--reward-model", default="runs/rm", help="reward model saved by --stage rm")
    p.add_argument("--prompts", default=SENTIMENT_DATA["eval"], help="jsonl of {prompt} rows")
    p.add_argument("--n", type=int, default=64, help="answers per prompt, a power of 2")
    p.add_argument("--bf16", action="store_true", help="sample in bf16 (faster on CPUs with AVX-512 bf16)")
    p.add_argument("--answers", help="jsonl of the sampled answers: read if it exists, else written")
    p.add_argument("--missing-eos-penalty", type=float, default=1.0, help="as train.py's offline default")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    prompts = [row["prompt"] for row in M.load_rows(args.prompts)]
    rows = answers(args, prompts)
    N, n = len(prompts), len(rows) // len(prompts)
    reward_model, tokenizer = load_reward_model(args.reward_model)
    scores = torch.tensor(reward_model_scores(reward_model, tokenizer, rows, 64)).view(N, n)  # (N, n)
    gold = torch.tensor(vader([r["prompt"] for r in rows], [r["text"] for r in rows])).view(N, n)  # (N, n)
    ended = torch.tensor([r["ended"] for r in rows]).view(N, n)  # (N, n)
    print(f"{N} prompts x {n} answers; cut off: {1 - ended.double().mean().item():.1%}")
    print("| k | KL bound (nats) | gold, best of k by the reward model | gold, best of k by the gold judge |")
    print("|---|---|---|---|")
    k = 1
    while k <= n:
        print(f"| {k} | {math.log(k) - (k - 1) / k:.2f} | {best_of(scores, gold, k):.3f} | "
              f"{best_of(gold, gold, k):.3f} |")
        k *= 2
    by_rm, by_judge = (shaped(s, ended, args.missing_eos_penalty) for s in (scores, gold))
    print("\n| kl_coef | KL, the RM's optimum | its gold | KL, the judge's optimum | its gold |")
    print("|---|---|---|---|---|")
    for beta in (1.0, 0.5, 0.3, 0.2, 0.1):
        print(f"| {beta} | " + " | ".join(f"{kl:.2f} | {g:.3f}" for kl, g in (
            regularised_optimum(by_rm, gold, beta), regularised_optimum(by_judge, gold, beta))) + " |")


if __name__ == "__main__":
    main()
