"""DeepSpeed plumbing for train.py: process group, config from the flags, trained and frozen engines.
losses.py, models.py and data.py never import deepspeed; this module and run.py hold all of it."""
import contextlib
import functools
import glob
import json
import math
import os
import socket
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
from torch.utils.cpp_extension import get_default_build_root
from transformers.integrations import HfDeepSpeedConfig

from .cli import fail, first_line, lost_peer


def init_distributed():
    """One process without a launcher is a world of one; under `deepspeed` the launcher sets these.
    -> (rank, world size, device)."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    accelerator = get_accelerator()
    on_cpu = accelerator.device_name() == "cpu"
    if on_cpu and "OMP_NUM_THREADS" not in os.environ:  # N ranks x all cores each would oversubscribe ~60x
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_SIZE", "1"))))
    if os.environ["LOCAL_RANK"] == "0":
        warn_build_locks()
    deepspeed.init_distributed(dist_backend=process_group_backend(accelerator.device_name(),
                                                                  accelerator.communication_backend_name()))
    device = torch.device(accelerator.device_name(int(os.environ["LOCAL_RANK"])))
    return dist.get_rank(), dist.get_world_size(), device


def warn_build_locks():
    """torch builds DeepSpeed's ops (the first run's ~1 minute) under a lock file, and a process that finds
    one waits without a word until it is gone; a build killed midway leaves its lock behind for ever. One line
    for each lock now, so that a run waiting on a stale one says where."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    for lock in sorted(glob.glob(os.path.join(root, "**", "lock"), recursive=True)):
        print(f"note: {lock} exists: another process is building that DeepSpeed op, or a build killed midway "
              f"left it; if this run waits here and no build is running, remove the file", file=sys.stderr)


def process_group_backend(device, backend):
    """gloo on CPU. On an accelerator, its own backend (NCCL on CUDA) for the model's tensors and gloo beside
    it for the run's small CPU tensors (stop flags, loss units, stats): NCCL alone cannot reduce those."""
    return "gloo" if device == "cpu" else f"cpu:gloo,{device}:{backend}"


def exit_process(status):
    """Leave the process groups (DeepSpeed's own too), flush, and exit without the interpreter's teardown:
    deepspeed.initialize leaves a gloo group that no destroy call reaches, and its threads, torn down at
    exit in no fixed order, can abort a finished run ("terminate called without an active exception")."""
    if deepspeed.comm.is_initialized():  # not yet if a signal came while DeepSpeed set up its communication
        deepspeed.comm.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def deepspeed_config(args, world_size):
    """The config file with the flags filled in; contradictions between the two are errors."""
    cfg = read_config(args.deepspeed_config)
    batch = {"train_micro_batch_size_per_gpu": args.batch_size,  # the flags map 1:1 onto DeepSpeed's keys
             "gradient_accumulation_steps": args.grad_accum,
             "train_batch_size": args.batch_size * args.grad_accum * world_size}
    for key, value in batch.items():
        if key in cfg and cfg[key] != value:
            fail(f"--deepspeed_config {args.deepspeed_config}: {key}={cfg[key]} contradicts the flags "
                 f"({value}); leave batch keys out, train.py fills them")
    cfg.update(batch)
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = zero.get("stage", 0) if args.zero_stage is None else args.zero_stage
    if type(zero["stage"]) is not int or zero["stage"] not in range(4):  # read before DeepSpeed checks it
        fail(f"--deepspeed_config {args.deepspeed_config}: zero_optimization.stage {zero['stage']!r}; "
             f"expected 0, 1, 2 or 3")
    if args.offload and zero["stage"] == 0:
        fail("--offload moves ZeRO's partitions to the CPU: it needs --zero-stage 1, 2 or 3")
    if args.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if zero["stage"] == 3:
            zero["offload_param"] = {"device": "cpu"}
    if cfg.get("bf16", {}).get("enabled") and not args.bf16:  # else the models would load in float32
        fail(f"--deepspeed_config {args.deepspeed_config}: bf16 is enabled; pass --bf16, which loads every "
             f"model in bf16 (the frozen ones too), or disable it there")
    if args.bf16:
        cfg["bf16"] = {"enabled": True}
    params = cfg.setdefault("optimizer", {"type": "AdamW"}).setdefault("params", {})
    if params.setdefault("lr", args.lr) != args.lr:
        fail(f"--deepspeed_config {args.deepspeed_config}: optimizer lr {params['lr']} contradicts --lr "
             f"{args.lr}; leave it out, train.py fills it")
    try:  # DeepSpeed's own checks of it, now: under ZeRO-3 they would first run inside a model's loading
        zero_config = DeepSpeedZeroConfig(**zero)
    except Exception as e:
        fail(f"--deepspeed_config {args.deepspeed_config}: zero_optimization: {config_problems(e)}")
    offloads = [k for k in ("offload_optimizer", "offload_param") if getattr(zero_config, k) is not None
                and getattr(zero_config, k).device != "none"]
    if zero["stage"] == 0 and offloads:  # nothing is partitioned there
        fail(f"--deepspeed_config {args.deepspeed_config}: zero_optimization.{offloads[0]} at ZeRO stage 0, "
             f"which has no partitions to offload; pass --zero-stage 1, 2 or 3")
    try:
        unread = unread_keys(cfg)
    except Exception as e:  # DeepSpeed's own checks of the whole config
        fail(f"--deepspeed_config {args.deepspeed_config}: {config_problems(e)}")
    if unread:  # DeepSpeed ignores them
        fail(f"--deepspeed_config {args.deepspeed_config}: {', '.join(unread)}: not a key DeepSpeed reads (a "
             f"typo? another kind of file?)")
    return cfg


class ReadKeys(dict):
    """A dict that records which of its keys were looked up."""

    def __init__(self, items):
        super().__init__(items)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def unread_keys(cfg):
    """The config's top-level keys that DeepSpeed's parser (DeepSpeedConfig) never looks up: a misspelt key
    ("zero_optimisation") or another file (a model's config.json), which DeepSpeed would ignore silently."""
    # without train_batch_size (the other batch keys' product), which DeepSpeedConfig would check against a
    # world size it may not know yet. It reads a shallow copy, which shares `read`; were it ever to read a
    # plain dict, nothing would be recorded, and nothing refused
    keys = ReadKeys({k: v for k, v in cfg.items() if k != "train_batch_size"})
    DeepSpeedConfig(keys)
    return sorted(set(keys) - keys.read) if keys.read else []


def config_problems(error):
    """DeepSpeed's config error in one line: pydantic's errors name each key and what it expected."""
    if not hasattr(error, "errors"):
        return first_line(error)
    return "; ".join(f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}" for problem in error.errors())


def read_config(path):
    """The DeepSpeed config file as a dict, in the shape `deepspeed_config` fills in."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:  # missing, not JSON, not UTF-8
        fail(f"--deepspeed_config {path}: {e}")
    sections = ("zero_optimization", "optimizer", "bf16", "fp16")  # those the flags fill in or train.py reads
    if not (isinstance(cfg, dict) and all(isinstance(cfg.get(k, {}), dict) for k in sections)
            and isinstance(cfg.get("optimizer", {}).get("params", {}), dict)):
        fail(f"--deepspeed_config {path}: expected a JSON object, with objects for {', '.join(sections)} and "
             f"optimizer.params")
    if cfg.get("fp16", {}).get("enabled"):  # its loss scaler skips overflowing steps: here they stop the run
        fail(f"--deepspeed_config {path}: fp16 is enabled; train.py trains in fp32, or bf16 with --bf16 (no "
             f"loss scaling)")
    problems = unchecked_value_problems(cfg)
    if problems:
        fail(f"--deepspeed_config {path}: {problems[0]}")
    if "scheduler" in cfg:  # DeepSpeed would run it instead of train.py's, silently
        fail(f"--deepspeed_config {path}: a scheduler section; leave it out, train.py's lr decays linearly "
             f"to 0")
    if "checkpoint" in cfg:  # its writers (decoupled, node-local) would write after stepN.tmp is renamed
        fail(f"--deepspeed_config {path}: a checkpoint section; leave it out, train.py writes each "
             f"checkpoint under a temporary name and renames it when it is complete")
    return cfg


def unchecked_value_problems(cfg):
    """What DeepSpeed reads unchecked and fails on at the first step (or ignores): gradient clipping, the
    optimizer's type, betas, eps and weight decay, steps_per_print. -> list of problems, each one line"""
    optimizer = cfg.get("optimizer", {"type": "AdamW"})
    params, problems = optimizer.get("params", {}), []
    if not non_negative_number(cfg.get("gradient_clipping", 0.0)):
        problems.append(f"gradient_clipping {cfg['gradient_clipping']!r}; expected a number >= 0 (0: none)")
    if not isinstance(optimizer.get("type"), str):
        problems.append(f"optimizer type {optimizer.get('type')!r}; expected a name, e.g. \"AdamW\"")
    betas = params.get("betas", [0.9, 0.999])
    if not (isinstance(betas, list) and len(betas) == 2 and all(non_negative_number(b) for b in betas)
            and max(betas) < 1):
        problems.append(f"optimizer betas {betas!r}; expected two numbers in [0, 1)")
    problems += [f"optimizer {key} {params[key]!r}; expected a number >= 0" for key in ("eps", "weight_decay")
                 if key in params and not non_negative_number(params[key])]
    steps = cfg.get("steps_per_print")
    if steps is not None and (type(steps) is not int or steps < 1):
        problems.append(f"steps_per_print {steps!r}; expected a whole number > 0, or null")
    return problems


def non_negative_number(value):
    """A finite JSON number >= 0: not a string, not true/false."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf


def param_groups(model, part=None, lr=None):
    """The trainable parameters as optimizer groups: those of `part` (a submodule, or `model` itself) learn at
    `lr`, the others at the config's lr; the schedule scales each group's lr alike."""
    params = [p for p in model.parameters() if p.requires_grad]
    if part is None or lr is None:
        return params
    own = {id(p) for p in part.parameters()}
    groups = [{"params": [p for p in params if id(p) not in own]},
              {"params": [p for p in params if id(p) in own], "lr": lr}]
    return [group for group in groups if group["params"]]


def build_engine(model, cfg, total_steps, config_path, part=None, lr=None):
    """Trainable model -> DeepSpeed engine with AdamW (from the config), its lr decaying linearly to 0 over
    `total_steps`; `part`'s parameters learn at `lr`, the others at the config's (`param_groups`)."""
    params = param_groups(model, part, lr)
    decay = functools.partial(torch.optim.lr_scheduler.LambdaLR,
                              lr_lambda=functools.partial(linear_decay, total_steps=total_steps))
    try:
        engine = deepspeed.initialize(model=model, model_parameters=params, config=cfg, lr_scheduler=decay)[0]
    except Exception as e:  # DeepSpeed validates the config here
        if lost_peer(e):  # ... and its collectives meet a rank that has ended
            raise
        fail(f"--deepspeed_config {config_path}: {type(e).__name__}: {first_line(e)}")
    if isinstance(engine.optimizer, FP16_UnfusedOptimizer):  # bf16 without ZeRO: it stepped AdamW on zero
        engine.optimizer.optimizer.state.clear()  # gradients to make its state, whose step count 1 would
        # scale the first updates by Adam's bias correction (x0.73, x0.85, ...): Adam starts at 0, as in ZeRO
    if not hasattr(engine.optimizer, "overflow"):
        engine.optimizer.register_step_pre_hook(skip_nonfinite_step)
    if dist.get_world_size() == 1 and cfg["zero_optimization"]["stage"] == 0:
        engine.enable_backward_allreduce = False  # else it flattens, "averages", copies back every gradient
    return engine


def linear_decay(step, total_steps):
    """The lr schedule's multiplier at `step`: from 1 linearly down to 0 at total_steps."""
    return max(0.0, 1 - step / max(1, total_steps))


def skip_nonfinite_step(optimizer, args, kwargs):
    """DeepSpeed's ZeRO and bf16 optimizers skip an update whose gradients hold NaN/inf and set `overflow`,
    which the engine reads to count skipped_steps and hold the lr schedule; its plain fp32 path has no such
    check. This step pre-hook gives it one: it drops the gradients, and torch optimizers skip parameters
    without one. The gradients are all-reduced already, so every rank decides alike."""
    grads = [p.grad.sum() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    optimizer.overflow = not torch.isfinite(torch.stack(grads).sum())
    if optimizer.overflow:
        optimizer.zero_grad(set_to_none=True)


def frozen(model, cfg, device):
    """Reference and reward models: no gradients, no optimizer state; partitioned too under ZeRO-3, with the
    config's ZeRO settings, the optimizer's offload aside (--offload puts them on the CPU, as DeepSpeed-Chat
    offloads its reference). They are loaded in the run's dtype, as the policy is (`inputs.load_model`: bf16
    with --bf16; buffers such as RoPE's inv_freq stay float32)."""
    model.requires_grad_(False).eval()
    zero = cfg["zero_optimization"]
    if zero["stage"] == 3:
        keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "bf16")
        settings = {k: v for k, v in zero.items() if k != "offload_optimizer"}  # e.g. persistence thresholds
        config = {"zero_optimization": settings, **{k: cfg[k] for k in keys if k in cfg}}
        return deepspeed.initialize(model=model, config=config)[0]
    return model.to(device)


@contextlib.contextmanager
def partitioned_loading(cfg):
    """Within, under ZeRO-3, from_pretrained builds each model straight into its partitions (transformers
    enters deepspeed.zero.Init while an HfDeepSpeedConfig lives; DeepSpeed-Chat loads so): a rank holds its
    1/N of the weights from the start, not the whole model in float32 until deepspeed.initialize splits it."""
    config = HfDeepSpeedConfig(cfg) if cfg["zero_optimization"]["stage"] == 3 else None
    try:
        yield
    finally:
        del config  # transformers holds it by a weak reference: ZeRO-3 loading ends here


def writable(params):
    """`params` whole within, and rank 0's values theirs on every rank after; unpartitioned: as they are."""
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def gathered(engine):
    """Whole weights for generate(), which calls the model once per token: under ZeRO-3 gather them once
    around it instead of per forward (with no partitioned parameter, DeepSpeed's context does nothing)."""
    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
