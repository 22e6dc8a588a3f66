"""Plot a PPO run: reward, KL and (when logged) the gold score per step, from RUN_DIR/metrics.jsonl.

    python plot.py runs/ppo                 # writes runs/ppo/ppo.png
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [("reward", "reward (RM or --reward-fn)"), ("kl", "KL to reference (nats)"), ("gold", "gold score (VADER)")]


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(rows, out):
    """One panel per metric that the rows carry, sharing the step axis."""
    panels = [(key, label) for key, label in PANELS if any(key in r for r in rows)]
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(7, 2.4 * len(panels)), squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], panels):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points), marker=".")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("PPO step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot reward, KL and gold score of a PPO run.")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG file (default RUN_DIR/ppo.png)")
    args = p.parse_args(argv)
    out = args.out or os.path.join(args.run_dir, "ppo.png")
    plot(read_metrics(os.path.join(args.run_dir, "metrics.jsonl")), out)
    print(out)


if __name__ == "__main__":
    main()
