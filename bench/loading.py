"""Host memory a rank needs to load models: as train.py loads them, against as minrlhf loaded them before
2026-12-07 (--before). Under ZeRO-3: straight into partitions (`partitioned_loading`, deepspeed.zero.Init)
against each model whole in float32 until deepspeed.initialize partitions it. Otherwise, with --bf16: in bf16
against in float32, cast to bf16 after all are loaded (as DeepSpeed cast the policy and critic in
deepspeed.initialize). Loads --models copies of --model, as PPO loads its policy, critic and reference (all
before their engines are built), then makes them frozen engines as train.py does; prints each rank's peak RSS
over the process's import-only peak, and its private memory (RssAnon) after loading and at the end, every
weight read once.

    deepspeed --num_gpus 2 bench/loading.py [--before] [--bf16]     # ZeRO-3
    python bench/loading.py --zero-stage 0 --bf16 [--before]        # without ZeRO-3: the load's dtype
"""
import argparse
import contextlib
import os
import resource
import sys

import torch
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
    parser.add_argument("--bf16", action="store_true", help="the run's --bf16")
    parser.add_argument("--zero-stage", type=int, choices=[0, 3], default=3, help="3: partitioned; 0: not")
    parser.add_argument("--before", action="store_true", help="load as minrlhf did before 2026-12-07")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = parser.parse_args()
    path = args.model or default_model()
    init_distributed()
    cfg = {"zero_optimization": {"stage": args.zero_stage}, "train_micro_batch_size_per_gpu": 1,
           "gradient_accumulation_steps": 1, "train_batch_size": dist.get_world_size(),
           "bf16": {"enabled": args.bf16}}
    base = peak_gib()
    dtype = torch.bfloat16 if args.bf16 and not args.before else torch.float32
    with contextlib.nullcontext() if args.before else partitioned_loading(cfg):
        models = [load_causal_lm(path, dtype) for _ in range(args.models)]
    loaded, private = peak_gib(), anonymous_gib()
    if args.before and args.bf16 and args.zero_stage != 3:
        for param in (p for model in models for p in model.parameters()):
            param.data = param.data.to(torch.bfloat16)
    engines = [frozen(model, cfg, None) for model in models]
    for param in (p for model in models for p in model.parameters()):  # read once, as a forward or .to(GPU)
        param.data.sum()  # does: a checkpoint's pages mapped but untouched are not resident yet
    how = ("whole, then partitioned" if args.before else "straight into partitions") if args.zero_stage == 3 \
        else ("float32, then cast" if args.before else "in the run's dtype")
    print(f"rank {dist.get_rank()} of {dist.get_world_size()}: {len(engines)} x {os.path.basename(path)}, "
          f"ZeRO-{args.zero_stage}, {how}{', bf16' if args.bf16 else ''}: peak RSS {base:.2f} GiB after "
          f"imports, +{loaded - base:.2f} GiB after loading (private now {private:.2f}), "
          f"+{peak_gib() - base:.2f} GiB at the end (private now {anonymous_gib():.2f})", flush=True)


if __name__ == "__main__":
    main()
