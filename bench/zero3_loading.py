"""Host memory a rank needs to load models under ZeRO-3: each model whole in float32 until
deepspeed.initialize partitions it (as minrlhf loaded before 2026-12-07), against straight into its
partitions (`partitioned_loading`, deepspeed.zero.Init). Loads --models copies of --model as PPO loads its
policy, critic and reference (all before their engines are built), then partitions them as train.py does;
prints each rank's peak RSS over the process's import-only peak, and its private memory (RssAnon) after
loading and after partitioning.

    deepspeed --num_gpus 2 bench/zero3_loading.py            # straight into partitions
    deepspeed --num_gpus 2 bench/zero3_loading.py --whole    # whole, then partitioned
"""
import argparse
import os
import resource
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from minrlhf.defaults import default_model  # noqa: E402
from minrlhf.engine import frozen, init_distributed, partitioned_loading  # noqa: E402
from minrlhf.models import load_causal_lm  # noqa: E402


def peak_gib():
    """This process's peak resident memory so far (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def anonymous_gib():
    """This process's private memory now (Linux: RssAnon): what ranks cannot share, unlike a checkpoint's
    pages mapped from the page cache, which ru_maxrss counts in every rank."""
    with open("/proc/self/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith("RssAnon:"))
    return int(kib) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a causal LM folder (default: the offline SmolLM2-135M-Instruct)")
    parser.add_argument("--models", type=int, default=3, help="copies loaded before any is partitioned")
    parser.add_argument("--bf16", action="store_true", help="the run's --bf16: partitions made in bf16")
    parser.add_argument("--whole", action="store_true", help="load each model whole, as before zero.Init")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = parser.parse_args()
    path = args.model or default_model()
    init_distributed()
    cfg = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1,
           "gradient_accumulation_steps": 1, "train_batch_size": dist.get_world_size(),
           "bf16": {"enabled": args.bf16}}
    base = peak_gib()
    if args.whole:
        models = [load_causal_lm(path) for _ in range(args.models)]
    else:
        with partitioned_loading(cfg):
            models = [load_causal_lm(path) for _ in range(args.models)]
    loaded, private = peak_gib(), anonymous_gib()
    engines = [frozen(model, cfg, None) for model in models]
    print(f"rank {dist.get_rank()} of {dist.get_world_size()}: {len(engines)} x {os.path.basename(path)}, "
          f"{'whole, then partitioned' if args.whole else 'straight into partitions'}"
          f"{', bf16' if args.bf16 else ''}: peak RSS {base:.2f} GiB after imports, +{loaded - base:.2f} GiB "
          f"after loading (private now {private:.2f}), +{peak_gib() - base:.2f} GiB after partitioning "
          f"(private now {anonymous_gib():.2f})", flush=True)


if __name__ == "__main__":
    main()
