"""Writes rm_pairs.jsonl: preference pairs between the base model's own answers to the train prompts,
labelled by VADER (the gold judge): chosen is the answer with the higher compound score.

    python data/sentiment/make_rm_pairs.py

Settings: model minrlhf.defaults.default_model() (SmolLM2-135M-Instruct) with its chat template; n = 16
samples per prompt, pure sampling (top_k=0, top_p=1.0) at temperature 0.7, at most 48 new tokens, torch seed 1
(make_sft.py uses 0), 32 sequences per batch, torch's default threads (2 on the 2-core machine that wrote
rm_pairs.jsonl). Answers are kept as sampled, cut-off ones included and marked (`chosen_ended`,
`rejected_ended` false): the reward model must score what PPO's policy writes, as PPO scores it. Per prompt
the answers are sorted by score; the i-th best is paired with the i-th worst for i = 1..PAIRS_PER_PROMPT (4);
a pair whose scores differ by less than MIN_GAP = 0.3 is skipped, since VADER's label would be mostly noise.
Earlier sets: 4 samples, all pairs 0.1 apart: 367 pairs, 61% held-out RM accuracy; 8 samples, 2 pairs
per prompt: 422 pairs, whose RM ranked the best of 64 SFT answers no better than of 32 (bench/README.md).
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from minrlhf.data import load_rows  # noqa: E402
from minrlhf.defaults import SENTIMENT_DATA, default_model, vader  # noqa: E402
from minrlhf.sampling import sample_n  # noqa: E402

N, PAIRS_PER_PROMPT, TEMPERATURE, MAX_NEW_TOKENS, SEED, MIN_GAP = 16, 4, 0.7, 48, 1, 0.3


def pairs(prompt, samples):
    """[({prompt, chosen, rejected, chosen_ended, rejected_ended}, chosen score, rejected score)]: i-th best
    against i-th worst. `*_ended` is False for an answer cut off at the token cap (no EOS)."""
    texts = [s["text"] for s in samples]
    # ties in score break by text, as when the file held texts only; the index finds the sample's `ended`
    ranked = sorted(zip(vader([prompt] * len(texts), texts), texts, range(len(texts))), reverse=True)
    out = []
    for (hi, _, i), (lo, _, j) in zip(ranked[:PAIRS_PER_PROMPT], ranked[::-1]):
        if hi - lo >= MIN_GAP:
            out.append(({"prompt": prompt, "chosen": samples[i]["text"], "rejected": samples[j]["text"],
                         "chosen_ended": samples[i]["ended"], "rejected_ended": samples[j]["ended"]}, hi, lo))
    return out


def main():
    start = time.time()
    prompts = list(load_rows(SENTIMENT_DATA["ppo"])["prompt"])
    samples = sample_n(default_model(), prompts, N, TEMPERATURE, MAX_NEW_TOKENS, SEED)
    rows = [r for p, group in zip(prompts, samples) for r in pairs(p, group)]
    with open(SENTIMENT_DATA["rm"], "w") as f:
        f.writelines(json.dumps(row) + "\n" for row, _, _ in rows)
    print(f"{len(rows)} pairs written to {SENTIMENT_DATA['rm']}; mean VADER chosen "
          f"{sum(r[1] for r in rows) / len(rows):.3f} vs rejected {sum(r[2] for r in rows) / len(rows):.3f}; "
          f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
