"""The command line's rules for train.py, eval.py and plot.py: bad input is one line on stderr and exit
status 2, before any work starts. No deepspeed here, so eval.py and plot.py print no accelerator banner."""
import argparse
import contextlib
import json
import math
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from tqdm import tqdm

from .data import DataError, check_prompts


# what loading a missing, damaged or mismatched model or tokenizer folder raises: OSError, ValueError,
# KeyError, safetensors' and huggingface_hub's errors, the tokenizers library's bare Exception... Loading is
# library code reading the folder, so any Exception is the folder's fault, and one line names it.
LOAD_ERRORS = Exception
# what writing to a full disk (or a folder without permission) raises: the OS's error for plain files,
# torch.save's RuntimeError, safetensors' own SafetensorError for the weights of save_pretrained
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
CRITIC_NORMALISATION = "value_normalisation.pt"  # beside a saved critic: its values are (score - mean) / std


def fail(message, this_rank=False):
    """Bad input: one line on stderr, exit status 2. Inputs are alike on every rank, so one rank per node
    prints (a file missing on one node still reaches the user), with its rank when it is not rank 0;
    `this_rank`: an error of this rank's own (its checkpoint files), printed by whichever rank meets it."""
    if this_rank or os.environ.get("LOCAL_RANK", "0") == "0":
        rank = int(os.environ.get("RANK", "0"))
        where = f"rank {rank}: " if rank else ""
        tqdm.write(f"error: {where}{message}", file=sys.stderr)  # tqdm.write clears a progress bar first
    sys.exit(2)


def first_line(error):
    """An exception's message for a one-line error: its first line, or its repr if it has no message. A
    first line that ends in a colon introduces the lines after it, which are joined to it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [repr(error)]
    return " ".join(lines) if lines[0].endswith(":") else lines[0]


def check_template(flag, path, tokenizer, prompts, source, replies=True):
    """One line unless the model's tokenizer can write every prompt of `source` (its chat template)."""
    try:
        check_prompts(tokenizer, prompts, replies)
    except DataError as e:
        fail(f"{source}: {flag} {path}: {e}")


def check_embeddings(flag, path, embeddings, reads, whose):
    """One line unless a model's `embeddings` rows cover the `reads` token ids it reads (`whose`: the ids of
    its tokenizer, or all the policy can sample); past them, an IndexError deep in the forward."""
    if embeddings < reads:
        fail(f"{flag} {path}: {embeddings} token embeddings, fewer than the {reads} token ids it reads "
             f"({whose})")


def fail_together(error):
    """An error that one rank alone may meet (in its own samples), or None; every rank calls this at the
    same point. If any rank has an error, it prints it with its rank and every rank exits 2 at once,
    instead of the others waiting in their next collective for a rank that is gone."""
    failed = torch.tensor([float(error is not None)])
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        prefix = f"rank {dist.get_rank()}: " if dist.get_world_size() > 1 else ""
        tqdm.write(f"error: {prefix}{error}", file=sys.stderr)
    if failed.item():
        sys.exit(2)


def lost_peer(error):
    """Whether `error` is a collective's failure to reach a rank that has ended (it printed its own line, if
    any): NCCL raises a DistError, gloo a RuntimeError saying the connection was closed or reset "by peer"."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "by peer" in str(error))


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, as every other error here (`fail`), not usage and message."""

    def error(self, message):
        fail(message)


def bounded(kind, low, high=math.inf, above=False):
    """An argparse type: a `kind` number >= low (> low if `above`) and <= high. Each flag's bounds stand
    where it is declared, and a value that cannot work is one line naming the flag."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        finite = kind is int or math.isfinite(value)  # an int (even 10**400, past any float) is finite
        if not (finite and (value > low if above else value >= low) and value <= high):
            bounds = f"{'>' if above else '>='} {low}" + (f" and <= {high}" if high < math.inf else "")
            raise argparse.ArgumentTypeError(f"{text}: expected a number {bounds}")
        return value
    return parse


def nonempty(text):
    """An argparse type for a path, Hub name or MODULE:FUNCTION: '' is refused (it would mean the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a path or name")
    return text


positive_int = bounded(int, 0, above=True)
positive = bounded(float, 0, above=True)
sampling_temperature = bounded(float, 1e-3)  # logits / T stay finite in fp32 (at 1e-42 they overflow)
non_negative = bounded(float, 0)
samples_per_prompt = bounded(int, 1, 1024)  # past this, prompts x samples outgrow memory (10**9: OOM-killed)


def quiet_libraries():
    """Our progress bar and our error lines only: no load bars or library log lines in between (offline, the
    Hub client logs each retry of a name that is neither a local folder nor reachable)."""
    import datasets
    import huggingface_hub
    import transformers
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()


def fail_to_load(flag, path, reason):
    """One line for a model folder that does not load, with `reason`; a folder without a model's config.json
    is named as what it is: a train.py run stopped before its final model, a PEFT adapter, not a model."""
    if os.path.isfile(path):
        fail(f"{flag} {path}: a file; expected a model folder or a Hub name")
    if not os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isdir(os.path.join(path, "checkpoints")):
            fail(f"{flag} {path}: a train.py run without its final model (checkpoints only); train.py "
                 f"--resume finishes it")
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            fail(f"{flag} {path}: a PEFT adapter, not a whole model; merge it into its base model (peft's "
                 f"merge_and_unload(), then save_pretrained) and pass that folder")
        if os.path.isdir(path):  # else a Hub name, or nothing: the reason says which
            fail(f"{flag} {path}: not a model folder (no config.json)")
    fail(f"{flag} {path}: {reason}")


def check_not_critic(flag, path):
    """One line for a PPO run's critic passed as a reward model: it scores values, scaled by that run's
    rewards (CRITIC_NORMALISATION beside it), not what the reward model it started from scores."""
    if os.path.isfile(os.path.join(path, CRITIC_NORMALISATION)):
        fail(f"{flag} {path}: a PPO critic ({CRITIC_NORMALISATION} beside it): it predicts returns, not "
             f"rewards; pass a reward model (--stage rm's output)")


def saved_args(output):
    """The flags of the train.py run in `output` (its args.json, with its number of ranks), or {}."""
    try:
        with open(os.path.join(output, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def run_path(saved, key):
    """A path that the train.py run of args.json `saved` was given (`key`: "model", "ref_model"...) as the
    run read it: a relative one from the folder the run started in (its `cwd`), a Hub name as is; or None."""
    value, cwd = saved.get(key), saved.get("cwd")
    if not (isinstance(value, str) and value.strip()):
        return None
    there = os.path.join(cwd if isinstance(cwd, str) else "", value)  # an absolute value: itself
    return there if os.path.exists(there) else value


def new_file_mode():
    """The mode the umask gives a new file (0o644 under 022). safetensors writes its files 0o600, which would
    hide a saved model from the other users of a shared machine."""
    umask = os.umask(0)  # reading the umask sets it: set it back
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path, text):
    """Write `text` to `path` through a temporary file and a rename: never a half-written file, and a write
    that fails (a full disk) leaves `path` as it was and no temporary file."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(synced(tmp), path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def synced(path, below=False):
    """`path` (a file or a folder; below=True: with all below it) on the disk, fsync'd: renamed after this, a
    crash of the machine cannot leave the new name on files whose data had not reached the disk yet."""
    names = [path]
    if below:
        names += [os.path.join(folder, n) for folder, dirs, files in os.walk(path) for n in files + dirs]
    for name in names:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def same_path(path, other):
    """Whether two paths (the second may be None), however spelled (./rm, rm/), name one file or folder."""
    return other is not None and os.path.realpath(path) == os.path.realpath(other)


def check_writable(flag, path, folder):
    """Create `folder` if need be and write a probe file in it: find out now, not after loading the models."""
    try:
        if not os.path.isfile(folder):  # else the probe says what is wrong: "Not a directory"
            os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        fail(f"{flag} {path}: cannot write there ({e.strerror})")
