"""Does the reward model rank cut-off answers the way PPO scores them?

    python bench/rm_cutoffs.py --reward-model runs/rm

PPO and eval.py score an answer cut off at the token cap as generated, without the chat template's end of turn
and EOS. The preference pairs (data/sentiment/rm_pairs.jsonl) mark such answers (`chosen_ended`,
`rejected_ended` false) and `--stage rm` trains on them as generated; a file without the marks trains on every
answer closed. On the held-out pairs (those train.py keeps whose prompts hash below --eval-fraction, as it
holds them out) this prints the reward model's accuracy both ways: every answer closed, and the cut-offs as
generated.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval import load_reward_model, reward_model_scores  # noqa: E402
from minrlhf.data import encode_preference, held_out, reply_ended  # noqa: E402
from minrlhf.defaults import SENTIMENT_DATA  # noqa: E402


def answers(rows, key, ended):
    """The pairs' `key` answers as the rows eval.py's `reward_model_scores` takes: {prompt, text, ended}."""
    return [{"prompt": r["prompt"], "text": r[key], "ended": e} for r, e in zip(rows, ended)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reward-model", default="runs/rm", help="reward model saved by --stage rm")
    p.add_argument("--pairs", default=SENTIMENT_DATA["rm"], help="the pairs it was trained on")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share, as in its training")
    p.add_argument("--max-length", type=int, default=512, help="as in its training: which pairs it kept")
    args = p.parse_args(argv)
    model, tokenizer = load_reward_model(args.reward_model)
    with open(args.pairs) as f:
        rows = [json.loads(line) for line in f]
    kept = [{**pair, "row": row} for row in rows  # the pairs train.py keeps
            if (pair := encode_preference(row, tokenizer, args.max_length))]
    rows = [pair["row"] for pair in held_out(kept, args.eval_fraction)[1]]  # the pairs train.py holds out
    cut = {key: torch.tensor([not reply_ended(r, key) for r in rows])
           for key in ("chosen", "rejected")}
    both = cut["chosen"] & cut["rejected"]
    print(f"{len(rows)} held-out pairs; cut off: {cut['chosen'].float().mean():.2f} of the chosen answers, "
          f"{cut['rejected'].float().mean():.2f} of the rejected, both in {int(both.sum())} pairs")
    closed = torch.ones(len(rows), dtype=torch.bool)
    for name, as_generated in (("every answer closed", False), ("cut-offs as generated", True)):
        ended = {key: (~cut[key] if as_generated else closed).tolist() for key in cut}
        scored = {key: reward_model_scores(model, tokenizer, answers(rows, key, ended[key]), batch_size=16)
                  for key in cut}
        right = (torch.tensor(scored["chosen"]) > torch.tensor(scored["rejected"])).float()
        print(f"{name}: accuracy {right.mean():.3f}; where both are cut off {right[both].mean():.3f}")


if __name__ == "__main__":
    main()
