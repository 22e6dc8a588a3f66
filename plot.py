"""Plot a PPO run: reward, KL and (when logged) the gold score per step, from RUN_DIR/metrics.jsonl; or
several runs side by side: gold score against KL, per training step and held out (RUN_DIR/eval.json,
written by `eval.py --json`).

    python plot.py runs/ppo                              # writes runs/ppo/ppo.png
    python plot.py runs/ppo runs/grpo runs/rloo runs/dpo --out runs/methods.png
"""
import json
import math
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

from minrlhf.cli import OneLineArgumentParser, check_writable, fail, same_path  # noqa: E402

PANELS = [("reward", "reward (RM or --reward-fn)"), ("kl", "KL to reference (nats)"),
          ("gold", "gold score (VADER)")]


def read_metrics(run_dir):
    """RUN_DIR/metrics.jsonl as a list of dicts; a missing or broken file is one line (exit 2)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path) as f:
            lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    except (OSError, ValueError) as e:  # missing, a directory, not UTF-8
        fail(f"{path}: {getattr(e, 'strerror', None) or e}; expected the metrics of a train.py run")
    rows = []
    for number, line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            if not line.endswith("\n"):  # the last line, cut short by a crash mid-write: as --resume, drop it
                continue
            fail(f"{path}: line {number}: malformed JSON ({e}); expected the metrics of a train.py run")
    if not rows:
        fail(f"{path}: no step logged yet")
    for number, row in enumerate(rows, 1):
        if not (isinstance(row, dict) and "step" in row):
            fail(f"{path}: line {number}: a line without a step; expected the metrics of a train.py run")
        if not all(isinstance(value, (int, float)) for value in row.values()):
            fail(f"{path}: line {number}: a value that is not a number; expected the metrics of a train.py "
                 f"run")
    return rows


def read_eval(run_dir):
    """RUN_DIR/eval.json's held-out KL and gold (`eval.py --json`), or None when there is none; one line if
    its `policy` is another folder (a relative path is read from here: one that does not resolve passes)."""
    path = os.path.join(run_dir, "eval.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            figures = json.load(f)
        held_out, policy = (figures["kl"], figures["gold"]), figures.get("policy")
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"{path}: {type(e).__name__}: {e}; expected the figures of eval.py --json")
    if not all(type(x) in (int, float) and -math.inf < x < math.inf for x in held_out):  # no "0.5", true, NaN
        fail(f"{path}: kl {held_out[0]!r}, gold {held_out[1]!r}; expected finite numbers, as eval.py --json "
             f"writes them")
    if isinstance(policy, str) and os.path.exists(policy) and not same_path(policy, run_dir):
        fail(f"{path}: the figures of eval.py --policy {policy}, not of {run_dir}; run eval.py --policy "
             f"{run_dir} --json {path}")
    return held_out


def gold_and_kl(run_dir):
    """A run's (KL, gold) per training step that logs gold, and held out (eval.json's, or None); one line if
    it has neither. A folder with an eval.json and no metrics.jsonl (merge.py's) has no steps."""
    held_out = read_eval(run_dir)
    merged = held_out and not os.path.exists(os.path.join(run_dir, "metrics.jsonl"))
    rows = [] if merged else read_metrics(run_dir)
    points = [(r["kl"], r["gold"]) for r in rows if "gold" in r and "kl" in r]  # --skip-nonfinite: one
    if not (points or held_out):
        path = os.path.join(run_dir, "eval.json")
        fail(f"{run_dir}: no gold logged and no {path}; run eval.py --policy {run_dir} --json {path} first")
    return points, held_out


def plot(rows, run_dir, out):
    """One panel per metric that the rows carry, sharing the step axis."""
    panels = [(key, label) for key, label in PANELS if any(key in r for r in rows)]
    if not panels:
        fail(f"{run_dir}: no reward, kl or gold logged; plot.py draws the runs of --stage ppo, grpo or rloo")
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(7, 2.4 * len(panels)), squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], panels):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points), marker=".")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("iteration (a rollout and its updates)")
    save(fig, out)


def compare(run_dirs, out):
    """Gold against KL for each run: a dot per training step (a rollout, where it logs gold) and a star at its
    held-out figures (eval.json): where each method gets, and at what distance from the SFT policy. Every run
    is read before anything is drawn."""
    runs = [gold_and_kl(run_dir) for run_dir in run_dirs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (run_dir, (points, held_out)) in enumerate(zip(run_dirs, runs)):
        color, name = f"C{i}", os.path.basename(os.path.normpath(run_dir))
        if points:  # named by its star, if it has one
            ax.plot(*zip(*points), ".", color=color, alpha=0.4, label=None if held_out else name)
        if held_out:
            ax.plot(*held_out, "*", color=color, markersize=16, label=name)
    ax.set_xlabel("KL to the SFT policy (nats per response)")
    ax.set_ylabel("gold score (VADER): held out (stars), rollouts (dots)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, out)


def save(fig, out):
    """The figure to `out`; one that cannot be written (a directory, a read-only run folder) is one line."""
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=100)
    except (OSError, RuntimeError) as e:  # the latter: a format's missing tool (.pgf: xelatex)
        fail(f"{out}: cannot write the plot there ({getattr(e, 'strerror', None) or e}); pass --out")
    plt.close(fig)


def main(argv=None):
    p = OneLineArgumentParser(description="Plot reward, KL and gold score of a PPO run, or compare runs.")
    p.add_argument("run_dirs", nargs="+", help="one run: its curves; several: gold against KL side by side")
    p.add_argument("--out", help="PNG file (default RUN_DIR/ppo.png; several runs: methods.png)")
    args = p.parse_args(argv)
    if args.out:
        if os.path.splitext(args.out)[1][1:].lower() not in FigureCanvasBase.get_supported_filetypes():
            fail(f"--out {args.out}: expected an image file name ending in .png, .pdf, .svg, ...")
        check_writable("--out", args.out, os.path.dirname(os.path.abspath(args.out)))
    if len(args.run_dirs) == 1:
        out = args.out or os.path.join(args.run_dirs[0], "ppo.png")
        plot(read_metrics(args.run_dirs[0]), args.run_dirs[0], out)
    else:
        out = args.out or "methods.png"
        compare(args.run_dirs, out)
    print(out)


if __name__ == "__main__":
    main()
