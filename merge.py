"""Merge policies trained from one base: average their weight changes (task vectors, Ilharco et al. 2023) and
scale the average, theta = base + scale * mean_i(theta_i - base).

    python merge.py --base runs/sft --policies runs/s0 runs/s1 runs/s2 --scale 1.5 --output runs/merged

Why: runs from one base with different seeds share the change that raises the reward and differ in the
rest, which costs KL and buys little. Their average keeps most of the gain at a fraction of the KL (Ramé et
al. 2024, "WARP": its second stage merges independently trained policies), and a scale above 1 spends the KL
saved on more reward; below 1 it moves back toward the base (WARP's third stage, LITI). How fast KL grows with
the scale differs from merge to merge (measured: two PPO seeds at 1.2, 1.8x the plain average's KL; three GRPO
seeds at 1.5, 2.4x; three PPO seeds at 1.45, 1.6x): score a few scales' KL before picking one.

--output gets the merged model, its tokenizer and an args.json naming the base, which eval.py then compares
the merge with.
"""
import contextlib
import json
import os
import shutil
import stat
import tempfile

from safetensors import safe_open
from safetensors.torch import save_file

from minrlhf.cli import (LOAD_ERRORS, WRITE_ERRORS, OneLineArgumentParser, check_writable, fail, fail_to_load,
                         first_line, new_file_mode, nonempty, non_negative, quiet_libraries, run_path,
                         same_path, saved_args, write_atomically)
from minrlhf.models import load_tokenizer_of
from minrlhf.sampling import load_chat_model


def merge_task_vectors(base, policies, scale):
    """base + scale * mean_i(policy_i - base), key by key, in float64, stored in the base's dtype; tensors
    that are not floating point (masks, ids) are the base's. base, policies: state dicts of one model's
    architecture (a policy may be any mapping of names to tensors: `SavedWeights`)."""
    merged = {}
    for key, weight in base.items():
        if not weight.is_floating_point():
            merged[key] = weight
            continue
        exact = weight.double()
        change = sum(policy[key].double() - exact for policy in policies) / len(policies)
        merged[key] = (exact + scale * change).to(weight.dtype)
    return merged


class SavedWeights:
    """A saved model's weights by name, read one tensor at a time from its safetensors file(s) (sharded or
    not), so that merging N policies holds one tensor of each, not N whole models."""

    def __init__(self, path):
        index = os.path.join(path, "model.safetensors.index.json")  # a sharded save: name -> shard
        if os.path.isfile(index):
            with open(index) as f:
                self.shards = json.load(f)["weight_map"]
        else:
            with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
                self.shards = dict.fromkeys(f.keys(), "model.safetensors")
        self.files = {name: safe_open(os.path.join(path, name), "pt") for name in set(self.shards.values())}

    def __getitem__(self, name):
        return self.files[self.shards[name]].get_tensor(name)

    def shape(self, name):
        """The weight's shape, read from its file's header; None if there is no such weight."""
        if name not in self.shards:
            return None
        return tuple(self.files[self.shards[name]].get_slice(name).get_shape())


def parse_args(argv=None):
    p = OneLineArgumentParser(description="Merge policies trained from one base: their mean weight change, "
                                          "scaled, added to the base.")
    p.add_argument("--base", type=nonempty, required=True, help="the model the policies were trained from")
    p.add_argument("--policies", type=nonempty, nargs="+", required=True,
                   help="policies trained from --base (e.g. --stage grpo with different --seed)")
    p.add_argument("--scale", type=non_negative, default=1.0,
                   help="multiplies the mean weight change: 1 the plain average, > 1 past it, 0 the base")
    p.add_argument("--output", type=nonempty, required=True, help="new folder for the merged policy")
    return p.parse_args(argv)


def load(flag, path, loader):
    """`loader(path)`: (the model or its weights, tokenizer), or one line naming the flag and what failed."""
    try:
        return loader(path)
    except LOAD_ERRORS as e:
        fail_to_load(flag, path, f"cannot load as a causal LM ({first_line(e)})")


def saved_policy(path):
    """(`SavedWeights`, tokenizer) of a policy folder."""
    return SavedWeights(path), load_tokenizer_of(path)


@contextlib.contextmanager
def writing(output):
    """One line for a write that fails (disk full, permissions), naming --output."""
    try:
        yield
    except WRITE_ERRORS as e:
        fail(f"--output {output}: cannot write the merged policy there ({e})")


def check_policy_paths(policies, base):
    """One line for a policy passed twice (its change would count twice in the mean), the base itself (its
    change, none, would shrink the mean), or one whose args.json names another model than --base: its change
    from --base is no task vector. A recorded path that does not exist here (relative to another folder, a
    Hub name) cannot be compared, and passes."""
    for i, path in enumerate(policies):
        twice = [other for other in policies[:i] if same_path(path, other)]
        if twice:
            fail(f"--policies {path}: passed twice (also as {twice[0]}); pass each policy once")
        if same_path(path, base):
            fail(f"--policies {path}: the --base itself, whose change from --base is none; pass trained "
                 f"policies")
        model = run_path(saved_args(path), "model")  # what the train.py run in `path` was trained from
        if model and os.path.exists(model) and not same_path(model, base):
            fail(f"--policies {path}: trained from {model} (its args.json), not from --base {base}; pass "
                 f"--base {model}, or policies trained from {base}")


def open_policies(paths, base_tokenizer, base_path):
    """Every policy opened (`SavedWeights`) and checked before the base is saved: the base's tokens, and the
    first policy's weights (names and shapes as saved); `check_like` compares that one with the saved base."""
    policies = []
    for path in paths:
        policy, tokenizer = load("--policies", path, saved_policy)
        if tokenizer.get_vocab() != base_tokenizer.get_vocab():
            fail(f"--policies {path}: a tokenizer other than --base {base_path}'s; pass policies trained "
                 f"from it")
        if policies:
            check_like(path, policy, policies[0], f"--policies {paths[0]}")
        policies.append(policy)
    return policies


def save_base(args, folder):
    """Load the base as train.py loads the model it trains (a pad token added if it has none distinct from
    EOS, the embeddings resized for it), open and check the policies, and save the base in `folder` as
    train.py saves its policies -> (the saved base's `SavedWeights`, the policies'). Saved, its weights have
    the policies' names (transformers renames some in memory: GPT-NeoX's embed_out, MoE experts fused),
    shapes and tied weights (saved once), so both sides merge as saved."""
    model, tokenizer = load("--base", args.base, load_chat_model)
    policies = open_policies(args.policies, tokenizer, args.base)
    with writing(args.output):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    base = SavedWeights(folder)
    check_like(args.policies[0], policies[0], base, f"--base {args.base}")
    return base, policies


def check_like(path, policy, reference, where):
    """One line unless the policy has the weights of `reference` (a `SavedWeights`: the saved base, or the
    first policy; `where` names it) with their shapes, and no others (a reward model's score head)."""
    for key in reference.shards:
        if policy.shape(key) != reference.shape(key):
            found = f"shape {policy.shape(key)}" if key in policy.shards else "no such weight"
            fail(f"--policies {path}: {key}: {found}, where {where} has {reference.shape(key)}; pass "
                 f"policies trained from --base")
    for key in sorted(policy.shards.keys() - reference.shards.keys()):
        fail(f"--policies {path}: {key}: a weight that {where} has not; pass causal LMs trained from --base")


def check_finite(merged, scale):
    """One line naming --scale unless every merged weight is finite: a scaled change can pass its dtype's
    range (float32's 3.4e38), which would be saved as inf."""
    for key, weight in merged.items():
        if weight.is_floating_point() and not weight.isfinite().all():
            dtype = str(weight.dtype).removeprefix("torch.")
            fail(f"--scale {scale:g}: {key}: merged weights not finite in {dtype}; pass a smaller --scale")


def write_merged(folder, base, policies, scale):
    """Replace each safetensors file of the saved base in `folder` (`base`: its `SavedWeights`) by its merge,
    one file at a time. The merge is written to a new file that then takes the old one's name: the old one
    is still open for reading."""
    for name in sorted(base.files):
        merged = merge_task_vectors({key: base[key] for key, file in base.shards.items() if file == name},
                                    policies, scale)
        check_finite(merged, scale)
        path = os.path.join(folder, name)
        save_file(merged, f"{path}.tmp", metadata={"format": "pt"})
        os.chmod(f"{path}.tmp", new_file_mode())  # safetensors writes 0o600
        os.replace(f"{path}.tmp", path)


def merge_record(args):
    """The merge's args.json, read as a train.py run's: `model` (the base), so that eval.py compares the merge
    with its base and merging it again checks that base; the policies' sampling `temperature` if they agree;
    `stage` "merge", so that train.py never takes the folder for its --output."""
    temperatures = [saved_args(path).get("temperature") for path in args.policies]
    record = {"stage": "merge", "model": args.base, "policies": args.policies, "scale": args.scale,
              "cwd": os.getcwd()}
    if temperatures[0] is not None and temperatures.count(temperatures[0]) == len(temperatures):
        record["temperature"] = temperatures[0]
    return record


def missing_folders(path):
    """`path` and those of its parent folders that do not exist yet, innermost first."""
    path, missing = os.path.abspath(path), []
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def merge(args):
    """The merge, made in a new folder beside --output, then moved there whole."""
    check_writable("--output", args.output, args.output)
    with writing(args.output):
        folder = tempfile.mkdtemp(prefix=".merging-", dir=os.path.dirname(os.path.abspath(args.output)))
    try:
        base, policies = save_base(args, folder)
        with writing(args.output):
            write_merged(folder, base, policies, args.scale)
            write_atomically(os.path.join(folder, "args.json"), json.dumps(merge_record(args), indent=1))
            # mkdtemp's 0700 would hide the model from others: --output's mode (the umask's) instead
            os.chmod(folder, stat.S_IMODE(os.stat(args.output).st_mode))
            os.replace(folder, args.output)  # onto the empty --output: a whole merge there, or nothing
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # a failed attempt's; a merge moved in is gone from here


def main(argv=None):
    args = parse_args(argv)
    quiet_libraries()
    check_policy_paths(args.policies, args.base)
    if os.path.isdir(args.output) and os.listdir(args.output):  # never write over a model
        fail(f"--output {args.output}: not empty; choose a new folder")
    created = missing_folders(args.output)
    try:
        merge(args)
    except BaseException:  # a failure leaves no folder it made: --output (and its parents) as they were
        for folder in created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise
    print(f"{args.output}: {args.base} + {args.scale:g} x the mean change of {len(args.policies)} policies")


if __name__ == "__main__":
    # save_pretrained imports deepspeed (accelerate's unwrap_model), whose accelerator detection prints a
    # banner on stdout unless told which: merge.py runs on the CPU (set here, not in main(): a process that
    # trains after calling main() keeps its own choice)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
