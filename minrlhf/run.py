"""A training run's bookkeeping for train.py: the output folder, the data order, metrics and progress,
signals, the non-finite policy, checkpoints and the final model. Calls, not callbacks: the loops stay
in train.py, which calls `Run.end_step` once per step."""
import fcntl
import hashlib
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from .cli import (CRITIC_NORMALISATION, WRITE_ERRORS, check_writable, fail, fail_together, lost_peer,
                  new_file_mode, run_path, same_path, saved_args, synced, write_atomically)
from .engine import read_config
from .lora import merged_state_dict

APPROX_KL_WARNING = 0.5  # nats per token: far outside the trust region PPO's clipping assumes


def checkpoints(output):
    """Complete checkpoints, oldest first (a folder still named *.tmp was cut off mid-save)."""
    root = os.path.join(output, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    names = [n for n in names if n.startswith("step") and n[4:].isdigit()]
    return [os.path.join(root, n) for n in sorted(names, key=lambda n: int(n[4:]))]


RESUME_MAY_CHANGE = {  # the flags that --resume may change: how long the run goes on, how it logs and saves
    "output", "resume", "max_steps", "epochs", "save_every", "keep_checkpoints", "log_every",
    "skip_nonfinite", "gradient_checkpointing", "gold_fn", "local_rank",
    "deepspeed_config"}  # its path (a moved checkout): its contents are compared, deepspeed_config_json


MODEL_PATHS = ("model", "ref_model", "reward_model", "critic_model")  # model folders a run reads
PATHS = ("dataset", *MODEL_PATHS)


def check_output(args):
    """Never train over another run (a different stage's, or checkpoints without --resume), never resume with
    other flags, and never find out after loading the models that --output cannot be written."""
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        fail(f"--output {args.output} is a file; expected a directory")
    for name in MODEL_PATHS:  # what it reads: never write there
        source = getattr(args, name, None)
        if source and same_path(source, args.output):
            fail(f"--output {args.output} is the --{name.replace('_', '-')} folder, which the run would "
                 f"write over; choose another --output")
    saved = saved_args(args.output)
    if not saved and os.path.isfile(os.path.join(args.output, "config.json")):  # a model, not a run's
        fail(f"--output {args.output} holds a model that no train.py run wrote, which the run would write "
             f"over; choose another --output")
    if saved.get("stage", args.stage) != args.stage:
        fail(f"--output {args.output} holds a --stage {saved['stage']} run; choose another --output for "
             f"--stage {args.stage}")
    found = checkpoints(args.output)
    if args.resume and not found:  # found out now, not after loading the models
        fail(f"--resume: no complete checkpoint in {os.path.join(args.output, 'checkpoints')}")
    if found:
        if not args.resume:
            fail(f"--output {args.output} already holds checkpoints; pass --resume to continue, or choose "
                 f"another --output")
        check_resume_flags(args, saved)
    elif saved and os.path.isfile(os.path.join(args.output, "config.json")):  # its checkpoints removed
        fail(f"--output {args.output} holds the final model of a finished run, which the run would write "
             f"over; choose another --output")
    check_writable("--output", args.output, args.output)


def lock_output(output):
    """One run at a time writes to --output (two would interleave their checkpoints and logs): rank 0 holds an
    exclusive lock on OUTPUT/.lock until its process ends, when the system drops it. -> the open lock file."""
    if int(os.environ.get("RANK", "0")) != 0:  # the other ranks of a run share rank 0's folder
        return None
    lock = open(os.path.join(output, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fail(f"--output {output}: another run is writing there; wait for it to end, or choose another "
             f"--output")
    return lock


def check_resume_flags(args, saved):
    """--resume goes on with the run its checkpoints came from, so every flag that shapes the model, its
    optimiser or the data order must be that run's: a checkpoint restores the lr, the KL coefficient and the
    position in the data as they were, and cannot load under another ZeRO stage, LoRA or number of ranks."""
    if not saved:  # written before any checkpoint: without it, a checkpoint of another model looks damaged
        fail(f"--resume: {os.path.join(args.output, 'args.json')} is missing or unreadable, so the "
             f"checkpoints' flags are unknown")
    current = {**vars(args), "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    config = read_config(args.deepspeed_config)  # the file may have been edited since
    if "deepspeed_config_json" in saved and saved["deepspeed_config_json"] != config:
        fail(f"--resume: --deepspeed_config {args.deepspeed_config} differs from the file the checkpoints' "
             f"run read (kept in its args.json); only how long it runs, logs and saves may change")
    digest = file_digest(args.dataset)
    if saved.get("dataset_sha256", digest) != digest:
        fail(f"--resume: --dataset {args.dataset} has changed since the checkpoints' run read it (another "
             f"sha256), so its data order and held-out rows would not go on; resume with that data")
    for name, before in saved.get("model_files", {}).items():  # the reference (a copy of --model), RM, critic
        if before != model_files(current.get(name)):
            fail(f"--resume: --{name.replace('_', '-')} {current[name]} has changed since the checkpoints' "
                 f"run read it (its files' sizes or times), e.g. trained again; resume with that model")
    for name, value in saved.items():
        if name in RESUME_MAY_CHANGE or name not in current:
            continue
        if name in PATHS and isinstance(value, str):  # the same file or folder, however spelled, from its cwd
            value = run_path(saved, name)
            changed = not same_path(value, current[name])
        else:
            changed = current[name] != value
        if changed:
            flag = "the number of ranks" if name == "world_size" else f"--{name.replace('_', '-')}"
            fail(f"--resume: {flag} is {current[name]}, where the checkpoints' run had {value} "
                 f"({os.path.join(args.output, 'args.json')}); only how long it runs, logs and saves may "
                 f"change")


def model_files(path):
    """A local model folder's files, as (name, size, time) under a sha256, which --resume compares: a model
    trained again in the same folder is another model. None for a Hub name (or --critic-model head)."""
    if not (isinstance(path, str) and os.path.isdir(path)):
        return None
    files = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path) if e.is_file())
    return hashlib.sha256(repr(files).encode()).hexdigest()


def file_digest(path):
    """The sha256 of a local file's bytes (None for a Hub dataset's name)."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def batches(n, batch_size, seed, start=0):
    """This rank's batches of example indices from batch `start` on, for ever: the epochs' permutations (each
    seeded by (seed, epoch)) one after another, dealt across ranks batch by batch. A batch may span two
    epochs, so each epoch reads every example once (--epochs 2 reads each twice, whatever n % batch).
    Resuming at step s just starts at s."""
    rank, world = dist.get_rank(), dist.get_world_size()
    orders = {}  # epoch -> its permutation: the one or two that the batch reads
    for i in range(start, 2**62):
        first = (i * world + rank) * batch_size  # where this rank's batch starts in the stream of epochs
        epochs = {first // n, (first + batch_size - 1) // n}
        orders = {e: orders.get(e) or epoch_order(n, seed, e) for e in epochs}
        yield [orders[p // n][p % n] for p in range(first, first + batch_size)]


def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()


def mean_across_ranks(stats):
    """{name: number} -> the same names, averaged over the ranks (every rank gets the same numbers)."""
    keys = sorted(stats)
    values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return dict(zip(keys, (values / dist.get_world_size()).tolist()))


def across_ranks(values):
    """Every rank's `values` (1-D, of any length: e.g. a rollout's valid tokens) in one tensor, in rank order,
    on every rank: statistics that are not means of means (a std, the explained variance) of the whole."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values.detach().cpu())
    return torch.cat(parts)


class Stopwatch:
    """Phase times: `lap(name)` adds the seconds since the previous lap to times["time/NAME"]."""

    def __init__(self):
        self.times, self.t0 = {}, time.perf_counter()

    def lap(self, name):
        now = time.perf_counter()
        self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + now - self.t0
        self.t0 = now


class Run:
    """One run on every rank: `start` and `state` (from --resume's checkpoint), then `end_step` after each
    step: log, stop on a signal or a non-finite value, checkpoint. Rank 0 writes metrics.jsonl."""

    def __init__(self, args, engine, total, critic=None):
        self.args, self.engine, self.total, self.main = args, engine, total, dist.get_rank() == 0
        self.critic = critic  # PPO's separate critic: an engine of its own, checkpointed beside the policy
        self.start, self.state = self.resume() if args.resume else (0, {})
        self.stop = False  # set by SIGINT/SIGTERM: finish the step, checkpoint, exit
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGTERM, self.request_stop)
        self.bar, self.metrics = None, self.open_metrics() if self.main else None
        self.t0, self.skipped = time.perf_counter(), self.skipped_steps()

    def request_stop(self, signum, frame):
        self.stop = True

    def open_metrics(self):
        """args.json and metrics.jsonl in --output (`check_output` made it); on --resume the lines logged
        after the checkpoint (and any a crash cut short) are dropped. Both are rewritten under a temporary
        name and renamed, so a kill meanwhile leaves the old ones whole; a full disk: one line. A final model
        of before (a finished run resumed for more steps, or started again) is no longer this run's: its
        config.json goes, so that no stage loads it as this run's until `save_final` writes this one."""
        run = {**vars(self.args), "world_size": dist.get_world_size(),  # and below: what --resume compares
               "cwd": os.getcwd(),  # where its relative paths start (`cli.run_path`)
               "deepspeed_config_json": read_config(self.args.deepspeed_config),
               "dataset_sha256": file_digest(self.args.dataset),
               "model_files": {name: model_files(getattr(self.args, name, None)) for name in MODEL_PATHS}}
        path, kept = os.path.join(self.args.output, "metrics.jsonl"), []
        try:
            for folder in (self.args.output, os.path.join(self.args.output, "critic")):
                if self.start < self.total and os.path.isfile(os.path.join(folder, "config.json")):
                    os.remove(os.path.join(folder, "config.json"))
            write_atomically(os.path.join(self.args.output, "args.json"), json.dumps(run, indent=1))
            if self.args.resume and os.path.exists(path):  # a garbled line's bytes: dropped as garbled lines
                with open(path, errors="replace") as f:
                    kept = [line for line in f if logged_step(line) <= self.start]
            write_atomically(path, "".join(kept))
            return open(path, "a")
        except OSError as e:
            fail(f"--output {self.args.output}: cannot write args.json and metrics.jsonl there ({e})",
                 this_rank=True)

    def end_step(self, step, stats, state=None):
        """Average the step's stats over ranks, check them, log, checkpoint on schedule; `state` (small,
        JSON-like) goes into the checkpoint. True when a signal stopped the run before its last step
        (checkpoint written)."""
        stats |= {"time/step": time.perf_counter() - self.t0,  # peak resident memory of this rank (Linux)
                  "memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        stats = mean_across_ranks({**stats, "stop": float(self.stop)})
        stop = stats.pop("stop") > 0  # one rank interrupted: all stop together
        stats = self.check_finite(step, stats)
        evaluated = any(k.startswith("eval/") for k in stats)  # written whatever --log-every says
        self.log(step, stats, evaluated or step % self.args.log_every == 0 or step == self.total)
        if stop or step == self.total or (self.args.save_every and step % self.args.save_every == 0):
            self.save_checkpoint(step, state or {})
        self.t0, self.skipped = time.perf_counter(), self.skipped_steps()
        return stop and step < self.total  # on the last step the run ends anyway: with its final model

    def check_finite(self, step, stats):
        """A NaN/inf stat or a skipped (non-finite) update stops the run, or with --skip-nonfinite is
        counted and left out of the log (JSON has no NaN)."""
        bad = [k for k, v in stats.items() if not math.isfinite(v)]
        bad += ["gradient"] * (self.skipped_steps() > self.skipped)
        if not self.args.skip_nonfinite:
            if bad:
                fail(f"step {step}: non-finite {', '.join(bad)}; stopped without writing a checkpoint "
                     f"(--skip-nonfinite skips such updates instead)")
            return stats
        stats = {k: v for k, v in stats.items() if math.isfinite(v)}
        return stats | {"skipped_steps": self.skipped_steps()}

    def skipped_steps(self):
        """Updates skipped for a non-finite gradient: the policy's, and a separate critic's."""
        return self.engine.skipped_steps + (self.critic.skipped_steps if self.critic else 0)

    def log(self, step, stats, write):
        if not self.main:
            return
        if self.bar is None:  # opened after the first step, so errors in it print on a line of their own
            self.bar = tqdm(total=self.total, initial=step - 1, desc=self.args.stage, dynamic_ncols=True)
        if stats.get("ppo/policy/approx_kl", 0.0) > APPROX_KL_WARNING:
            self.bar.write(f"warning: step {step}: approx KL between rollout and updated policy is "
                           f"{stats['ppo/policy/approx_kl']:.3g} > {APPROX_KL_WARNING}; "
                           f"lower --lr or --ppo-epochs")
        self.bar.update()
        if write:
            try:
                self.metrics.write(json.dumps({"step": step, **stats}) + "\n")
                self.metrics.flush()
            except OSError as e:  # a full disk: a line cut short is dropped on --resume
                fail(f"--output {self.args.output}: cannot write metrics.jsonl there ({e}); --resume goes on "
                     f"from the newest complete checkpoint", this_rank=True)
            self.bar.write(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in stats.items()))

    def weights_finite(self):
        """No NaN/inf in any rank's weights (a ZeRO-3 rank holds its partition in ds_tensor)."""
        params = [*self.engine.module.parameters(), *(self.critic.module.parameters() if self.critic else [])]
        ok = torch.tensor(float(all(torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in params)))
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return ok.item() == 1.0

    def save_checkpoint(self, step, state):
        """Written under a temporary name and renamed when complete, so a kill mid-save leaves the previous
        checkpoint intact; then all but the newest --keep-checkpoints are removed."""
        if not self.weights_finite():
            fail(f"step {step}: non-finite weights after the update; stopped without writing a checkpoint")
        root, rank = os.path.join(self.args.output, "checkpoints"), dist.get_rank()
        tmp = os.path.join(root, f"step{step}.tmp")
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
               "accelerator": get_accelerator().get_rng_state()}  # a GPU's own generator, sampling's
        try:  # disk full, permissions (torch's writer raises RuntimeError). DeepSpeed's save holds barriers,
            # so a rank cannot wait here for the others' outcome: the one that fails says so and exits
            self.engine.save_checkpoint(root, tag=os.path.basename(tmp), client_state={"step": step, **state},
                                        save_latest=False)
            if self.critic:
                self.critic.save_checkpoint(tmp, tag="critic", save_latest=False)
            torch.save(rng, os.path.join(tmp, f"rng_rank{rank}.pt"))
        except WRITE_ERRORS as e:
            if lost_peer(e):  # another rank failed
                raise
            fail(self.unwritable(e), this_rank=True)
        dist.barrier()
        error = None
        try:  # rank 0 renames stepN.tmp to stepN, complete, on the disk before any older checkpoint goes
            if rank == 0:
                os.replace(synced(tmp, below=True), tmp.removesuffix(".tmp"))
                synced(root)
        except OSError as e:
            error = self.unwritable(e)
        fail_together(error)  # the other ranks wait for rank 0's renaming, and exit with it if it fails
        if rank == 0:
            self.remove_old_checkpoints()

    def remove_old_checkpoints(self):
        """All but the newest --keep-checkpoints, each renamed before it is removed (a folder removed halfway
        is no checkpoint); one that cannot be removed is named in a note: the new one is complete."""
        for old in checkpoints(self.args.output)[: -self.args.keep_checkpoints]:
            try:
                os.replace(old, f"{old}.old")
                shutil.rmtree(f"{old}.old")
            except OSError as e:
                print(f"note: --output {self.args.output}: cannot remove the old checkpoint {old} ({e})",
                      file=sys.stderr, flush=True)

    def unwritable(self, error):
        kept = "the newest complete one is whole" if checkpoints(self.args.output) else "no complete one yet"
        return f"--output {self.args.output}: cannot write checkpoints there ({error}); {kept}"

    def resume(self):
        """Load the newest complete checkpoint: model, optimizer, scheduler, RNG states -> (step, state)."""
        found = checkpoints(self.args.output)  # `check_output` found one
        root, tag = os.path.split(found[-1])
        if int(tag[4:]) > self.total:  # known from its name: no need to load it first
            fail(f"--resume: the checkpoint is at step {tag[4:]}, past this run's last step {self.total} "
                 f"(--max-steps or --epochs)")
        try:  # a file deleted or cut short: DeepSpeed and torch raise all kinds of errors. DeepSpeed's load
            # holds collectives, so the rank that fails says so and exits; the others stop at their next one
            _, state = self.engine.load_checkpoint(root, tag=tag)
            if self.critic:
                self.critic.load_checkpoint(found[-1], tag="critic")
            rng = torch.load(os.path.join(found[-1], f"rng_rank{dist.get_rank()}.pt"), weights_only=False)
        except Exception as e:
            if lost_peer(e):  # another rank failed: its checkpoint files, not necessarily this one's
                raise
            reason = (f"{type(e).__name__}: {e}" if str(e) else repr(e)).splitlines()[0]  # assert: no message
            advice = (f"remove it to resume from {os.path.basename(found[-2])}" if len(found) > 1 else
                      "it is the run's only checkpoint: start the run again in another --output")
            fail(f"--resume: cannot load {found[-1]} ({reason}); {advice}", this_rank=True)
        reschedule(self.engine)
        if self.critic:
            reschedule(self.critic)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if "accelerator" in rng:  # checkpoints from before it was saved lack it
            get_accelerator().set_rng_state(rng["accelerator"])
        return state["step"], state

    def save_final(self, tokenizer):
        """Hugging Face folders, any LoRA adapters merged into the weights: the policy (PPO's value head
        beside it: value_head.pt) or reward model in --output; a separate critic in --output/critic."""
        state = whole_state(self.engine)
        critic = whole_state(self.critic) if self.critic else None
        error = None
        try:
            if self.main:
                self.write_final(state, critic, tokenizer)
        except WRITE_ERRORS as e:  # disk full, permissions
            error = (f"--output {self.args.output}: cannot write the final model ({e}); its last checkpoint "
                     f"holds it, and --resume writes it")
        fail_together(error)  # the other ranks wait for rank 0's writing, and exit with it if it fails

    def write_final(self, state, critic, tokenizer):
        """`save_final`'s writing, on rank 0: whole state dicts -> Hugging Face folders (`save_complete`)."""
        module, state = self.engine.module, merged_state_dict(self.engine.module, state)  # LoRA: plain
        extras = {}
        if hasattr(module, "backbone"):  # the online stages' policy
            head = submodule_state(state, "value_head.")  # {} without a value head
            state, module = submodule_state(state, "backbone."), module.backbone
            if head:
                extras["value_head.pt"] = head
        save_complete(self.args.output, module, state, tokenizer, extras)
        if critic is not None:  # a reward model: its score at each position, normalised, is a value
            norm = {"mean": critic["shift"].item(), "std": critic["scale"].item()}  # models.Critic's
            critic = submodule_state(merged_state_dict(self.critic.module, critic), "reward_model.")
            save_complete(os.path.join(self.args.output, "critic"), self.critic.module.reward_model, critic,
                          tokenizer, {CRITIC_NORMALISATION: norm})


def save_complete(folder, module, state, tokenizer, extras=None):
    """module.save_pretrained(folder), the tokenizer and `extras` ({file name: object}, torch.save'd: PPO's
    value head, a critic's normalisation), written in folder/final.tmp and then moved in, config.json last: a
    folder with a config.json (what the next stage looks for) holds a whole model, even after a full disk or
    a kill mid-write or a crash of the machine (`synced`)."""
    tmp = os.path.join(folder, "final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a failed attempt's
    module.save_pretrained(tmp, state_dict=state)
    # its config.json names the module's dtype (bf16 under --bf16), the weights may be float32 (LoRA's,
    # merged), and transformers' default load takes the config's: it names the weights'
    weights = next(v.dtype for v in state.values() if v.is_floating_point())
    module.config.dtype = str(weights).removeprefix("torch.")
    module.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name, value in (extras or {}).items():
        torch.save(value, os.path.join(tmp, name))
    mode = new_file_mode()
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), mode)  # safetensors' weights: 0o600
    synced(tmp, below=True)
    for name in sorted(os.listdir(tmp), key=lambda name: name == "config.json"):  # False first: config last
        os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    synced(folder)
    os.rmdir(tmp)


def reschedule(engine):
    """Each lr as this run's schedule sets it at the checkpoint's step: a checkpoint holds the lr of its own
    run's schedule, which a new --max-steps or --epochs changes."""
    scheduler = engine.lr_scheduler
    for group, base, decay in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * decay(scheduler.last_epoch)


def logged_step(line):
    """The step of a metrics.jsonl line; infinity for a line cut short or garbled (dropped on resume)."""
    try:
        step = json.loads(line)["step"] if line.endswith("\n") else math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf
    return step if type(step) is int else math.inf  # a step of another type: garbled too


def whole_state(engine):
    """The engine's whole state dict; ZeRO-3 gathers it on rank 0 (every rank must call)."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def submodule_state(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
