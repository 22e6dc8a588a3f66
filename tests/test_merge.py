"""merge.py: the task-vector merge by hand, end to end on tiny saved policies, and its one-line errors."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedModel

import eval as eval_py
import merge
from minrlhf import load_causal_lm, load_reward_model
from minrlhf.cli import same_path
from minrlhf.run import check_output
from minrlhf.sampling import load_chat_model
from test_errors import assert_one_error_line
from tiny import make_causal_lm, make_tokenizer, save_tiny


def test_merge_task_vectors_by_hand():
    base = {"w": torch.tensor([1.0, 2.0]), "half": torch.tensor([1.0], dtype=torch.bfloat16),
            "ids": torch.tensor([0, 1])}
    policies = [{"w": torch.tensor([3.0, 2.0]), "half": torch.tensor([2.0], dtype=torch.bfloat16),
                 "ids": torch.tensor([5, 5])},
                {"w": torch.tensor([1.0, 6.0]), "half": torch.tensor([2.0], dtype=torch.bfloat16),
                 "ids": torch.tensor([7, 7])}]  # mean change of w: [1, 2]
    for scale, w in {1.0: [2.0, 4.0], 1.5: [2.5, 5.0], 0.0: [1.0, 2.0]}.items():
        merged = merge.merge_task_vectors(base, policies, scale)
        assert torch.equal(merged["w"], torch.tensor(w)), scale
        assert merged["half"].dtype == torch.bfloat16 and merged["half"].item() == 1.0 + scale
        assert torch.equal(merged["ids"], base["ids"])  # not floating point: the base's


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    for name, seed in {"base": 0, "a": 1, "b": 2, "from_a": 3}.items():  # one architecture and tokenizer
        save_tiny("llama", d / name, seed=seed)
    (d / "a" / "args.json").write_text(json.dumps({"model": f"{d}/./base/"}))  # train.py's: --base, spelled
    (d / "b" / "args.json").write_text(json.dumps({"model": "elsewhere/base"}))  # relative to another folder
    (d / "from_a" / "args.json").write_text(json.dumps({"model": str(d / "a")}))  # trained from another model
    save_tiny("llama", d / "wide", config={"hidden_size": 64})
    save_tiny("llama", d / "chat", chat_template=True)
    for name, seed in {"tied_base": 0, "tied_a": 1, "tied_b": 2}.items():  # an LM head that is the embedding
        save_tiny("llama", d / name, seed=seed, config={"tie_word_embeddings": True})
    sharded = load_causal_lm(str(d / "tied_b"))  # saved again in shards of at most 20 kB
    sharded.save_pretrained(d / "tied_b_sharded", max_shard_size="20KB")
    AutoTokenizer.from_pretrained(d / "tied_b").save_pretrained(d / "tied_b_sharded")
    rm = load_reward_model(str(d / "tied_base"), AutoTokenizer.from_pretrained(d / "tied_base").pad_token_id)
    rm.save_pretrained(d / "tied_rm")  # the base's body with a score head: not a policy
    AutoTokenizer.from_pretrained(d / "tied_base").save_pretrained(d / "tied_rm")
    for name, seed in {"neox_base": 0, "neox_a": 1, "neox_b": 2}.items():  # embed_out on disk, lm_head loaded
        save_tiny("gpt_neox", d / name, seed=seed)
    (d / "empty_dir").mkdir()  # not a model folder
    make_causal_lm("gpt2", len(make_tokenizer())).save_pretrained(d / "no_tokenizer")  # config and weights alone
    save_tiny("llama", d / "nopad_base", pad=False)  # train.py adds a pad token: 400 -> 401 embeddings
    for name, seed in {"nopad_a": 1, "nopad_b": 2}.items():
        save_trained(d / "nopad_base", d / name, seed)
    return d


def save_trained(base, path, seed):
    """A policy as train.py saves one trained from `base`: loaded as it loads it (a pad token added, the
    embeddings resized), its weights moved at random (by `seed`), saved with its tokenizer."""
    torch.manual_seed(seed)
    model, tokenizer = load_chat_model(str(base))
    model.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(0.01 * torch.randn_like(weight))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def assert_merged(folder, base, policies, scale):
    """The causal LM in `folder` is base + scale * mean_i(policy_i - base), weight by weight, as loaded; of a
    weight with more rows than the base's (a pad token added by train.py), the rows of the base's tokens."""
    base, merged = (load_causal_lm(str(path)).state_dict() for path in (base, folder))
    policies = [load_causal_lm(str(path)).state_dict() for path in policies]
    for key, weight in base.items():
        rows = len(weight)
        change = sum(policy[key][:rows].double() - weight.double() for policy in policies) / len(policies)
        torch.testing.assert_close(merged[key][:rows], (weight.double() + scale * change).float(),
                                   rtol=0, atol=1e-6)


def test_merge_py_writes_the_scaled_mean_change(saved, tmp_path):
    merge.main(["--base", str(saved / "base"), "--policies", str(saved / "a"), str(saved / "b"),
                "--scale", "1.5", "--output", str(tmp_path / "merged")])
    assert_merged(tmp_path / "merged", saved / "base", [saved / "a", saved / "b"], 1.5)
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    merge.main(["--base", str(saved / "base"), "--policies", str(saved / "a"),
                "--output", str(tmp_path / "one")])
    a, one = (load_causal_lm(str(p)).state_dict() for p in (saved / "a", tmp_path / "one"))
    assert all(torch.equal(one[key], a[key]) for key in a)  # one policy at scale 1: that policy


def test_a_merge_records_its_base_for_eval_py(saved, tmp_path, monkeypatch, capsys):
    """The merge's args.json names its base (as merge.py read it: relative to its folder) and the policies'
    temperature where they agree: eval.py's defaults, as for a train.py run; train.py's --output refuses it."""
    for name, temperature in {"a": 0.9, "b": 0.9, "c": None}.items():
        shutil.copytree(saved / "a", tmp_path / name)
        (tmp_path / name / "args.json").write_text(json.dumps({"model": str(saved / "base"),
                                                                "temperature": temperature}))
    monkeypatch.chdir(saved)
    merge.main(["--base", "base", "--policies", str(tmp_path / "a"), str(tmp_path / "b"),
                "--output", str(tmp_path / "ab")])
    merge.main(["--base", "base", "--policies", str(tmp_path / "a"), str(tmp_path / "c"),
                "--output", str(tmp_path / "ac")])
    monkeypatch.chdir(tmp_path)  # eval.py run elsewhere
    for policy, temperature in {"ab": 0.9, "ac": 0.7}.items():  # ac: theirs differ, eval.py's default
        args = argparse.Namespace(policy=policy, base=None, temperature=None)
        eval_py.training_defaults(args)
        assert same_path(args.base, saved / "base") and args.temperature == temperature, policy
    with pytest.raises(SystemExit):
        check_output(argparse.Namespace(output="ab", stage="ppo", model="a", resume=False))
    assert capsys.readouterr().err.endswith("--output ab holds a --stage merge run; choose another --output "
                                            "for --stage ppo\n")


def test_merge_py_reads_tied_and_sharded_policies(saved, tmp_path):
    """A tied LM head (saved once, under the embedding's name), a policy saved in shards: the same merge."""
    assert len(list((saved / "tied_b_sharded").glob("*.safetensors"))) > 1
    merge.main(["--base", str(saved / "tied_base"), "--policies", str(saved / "tied_a"),
                str(saved / "tied_b_sharded"), "--scale", "1.5", "--output", str(tmp_path / "merged")])
    assert_merged(tmp_path / "merged", saved / "tied_base", [saved / "tied_a", saved / "tied_b"], 1.5)


def test_merge_py_merges_weights_that_transformers_renames(saved, tmp_path):
    """GPT-NeoX's LM head is embed_out on disk, lm_head once loaded: the merge reads both sides as saved."""
    policies = [saved / "neox_a", saved / "neox_b"]
    merge.main(["--base", str(saved / "neox_base"), "--policies", *map(str, policies), "--scale", "1.5",
                "--output", str(tmp_path / "merged")])
    assert_merged(tmp_path / "merged", saved / "neox_base", policies, 1.5)


def test_merge_py_adds_the_pad_token_train_py_adds(saved, tmp_path):
    """A base without a pad token distinct from EOS: train.py's policies have '<|pad|>' and a row for it; the
    merge loads the base as train.py does, and its rows of the base's tokens are the formula's."""
    policies = [saved / "nopad_a", saved / "nopad_b"]
    merge.main(["--base", str(saved / "nopad_base"), "--policies", *map(str, policies), "--scale", "1.5",
                "--output", str(tmp_path / "merged")])
    assert_merged(tmp_path / "merged", saved / "nopad_base", policies, 1.5)
    merged = load_causal_lm(str(tmp_path / "merged"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(policies[0]).get_vocab()
    assert merged.get_input_embeddings().weight.shape[0] == len(tokenizer) == 401
    assert merged.config.pad_token_id == tokenizer.pad_token_id == 400


CASES = {  # name: (flags, the one line expected on stderr)
    "another architecture": (["--policies", "{d}/wide"],  # the first weight that differs, by name as saved
                             r"--policies .*wide: lm_head\.weight: shape \(\d+, 64\), "
                             r"where --base .*base has \(\d+, 32\)"),
    "another tokenizer": (["--policies", "{d}/chat"],
                          r"--policies .*chat: a tokenizer other than --base .*base's"),
    "missing policy": (["--policies", "{d}/nope"], r"--policies .*nope: cannot load as a causal LM"),
    "a reward model": (["--base", "{d}/tied_base", "--policies", "{d}/tied_rm"],
                       r"--policies .*tied_rm: score\.weight: a weight that --base .*tied_base has not"),
    "base an empty folder": (["--base", "{d}/empty_dir", "--policies", "{d}/nopad_a"],  # no args.json naming a base
                             r"--base .*empty_dir: not a model folder \(no config\.json\)$"),
    "policy an empty folder": (["--policies", "{d}/empty_dir"], r"--policies .*empty_dir: not a model folder \(no "
                                                                r"config\.json\)$"),
    "base without tokenizer files": (["--base", "{d}/no_tokenizer", "--policies", "{d}/nopad_a"],
                                     r"--base .*no_tokenizer: cannot load as a causal LM \(an empty tokenizer that "
                                     r"encodes text to no tokens"),
    "output not empty": (["--output", "{d}/a"], r"--output .*a: not empty; choose a new folder"),
    "trained from another base": (["--policies", "{d}/from_a"],
                                  r"--policies .*from_a: trained from .*/a \(its args\.json\), not from "
                                  r"--base .*base; pass --base .*/a, or policies trained from .*base$"),
    "the base as a policy": (["--policies", ["{d}/a", "{d}/base/"]],
                             r"--policies .*base/: the --base itself, whose change from --base is none; pass trained "
                             r"policies$"),
    "a policy twice": (["--policies", ["{d}/a", "{d}/b", "{d}/./a/"]],
                       r"--policies .*/\./a/: passed twice \(also as .*/a\); pass each policy once"),
    "a new --output in new folders": (["--output", "{t}/new/deeper/out", "--base", "{d}/nope", "--policies",
                                       "{d}/b"], r"--base .*nope: cannot load as a causal LM"),
    "negative scale": (["--scale", "-1"], r"argument --scale: -1: expected a number >= 0"),
    "a scale past float32": (["--scale", "1e300"],
                             r"--scale 1e\+300: \S+: merged weights not finite in float32; pass a smaller --scale"),
}


def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def config_then_disk_full(model, folder, *args, **kwargs):
    """save_pretrained on a full disk: its config.json written, then no room for the weights."""
    model.config.save_pretrained(folder)
    disk_full()


@pytest.mark.parametrize("where", ["the base's save", "the merged weights"])
def test_merge_py_a_failed_write_is_one_line_and_leaves_no_model(where, saved, tmp_path, capsys, monkeypatch):
    """A full disk: one line, and no --output (no config.json: no half a model that the next stage would
    load, nor one that a rerun would refuse as not empty), no temporary folder beside it."""
    if where == "the base's save":
        monkeypatch.setattr(PreTrainedModel, "save_pretrained", config_then_disk_full)
    else:
        monkeypatch.setattr(merge, "save_file", disk_full)
    argv = ["--base", str(saved / "base"), "--policies", str(saved / "a"), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        merge.main(argv)
    assert_one_error_line(exit_info, capsys,
                          r"--output .*: cannot write the merged policy there \(\[Errno 28\]")
    assert not any(tmp_path.iterdir())  # no --output (it made it), no temporary folder
    monkeypatch.undo()  # room again: the same command writes the merge
    merge.main(argv)
    assert (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("name", list(CASES))
def test_merge_py_bad_input_fails_with_one_line(name, saved, tmp_path, capsys):
    """One line, and no folder left that it made: not --output, nor its new parents."""
    flags, message = CASES[name]
    argv = {"--base": "{d}/base", "--policies": "{d}/a", "--output": "{t}/out"}
    for flag, value in zip(flags[::2], flags[1::2]):
        argv[flag] = value
    values = [[value] if isinstance(value, str) else value for value in argv.values()]  # --policies: several
    with pytest.raises(SystemExit) as exit_info:
        merge.main([arg.format(d=saved, t=tmp_path) for flag, value in zip(argv, values)
                    for arg in [flag, *value]])
    assert_one_error_line(exit_info, capsys, message)
    assert not any(tmp_path.iterdir())  # no --output, no temporary folder
    assert (saved / "a" / "config.json").exists()


def saved_too_soon(*args, **kwargs):
    raise AssertionError("the base saved before every policy was checked")


@pytest.mark.parametrize("policy, message", [
    ("nope", r"--policies .*nope: cannot load as a causal LM"),
    ("chat", r"--policies .*chat: a tokenizer other than --base .*base's"),
    ("wide", r"--policies .*wide: lm_head\.weight: shape \(\d+, 64\), where --policies .*a has \(\d+, 32\)")])
def test_merge_py_checks_every_policy_before_saving_the_base(policy, message, saved, tmp_path, capsys,
                                                             monkeypatch):
    """A typo or a stray model among the policies: one line before the base is saved (minutes for 7B)."""
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", saved_too_soon)
    with pytest.raises(SystemExit) as exit_info:
        merge.main(["--base", str(saved / "base"), "--policies", str(saved / "a"), str(saved / policy),
                    "--output", str(tmp_path / "out")])
    assert_one_error_line(exit_info, capsys, message)


def mode(path):
    return oct(os.stat(path).st_mode & 0o777)


def test_merge_py_gives_the_merge_the_mode_of_a_new_folder(saved, tmp_path):
    """Not mkdtemp's 0700 (a model others cannot read): the mode that the umask gives a new folder, or that of
    the empty --output made before, which a failed merge leaves as it was."""
    argv = ["--base", str(saved / "base"), "--policies", str(saved / "a"), "--output"]
    umask = os.umask(0o027)
    try:
        merge.main([*argv, str(tmp_path / "new")])
    finally:
        os.umask(umask)
    assert mode(tmp_path / "new") == oct(0o750)
    assert mode(tmp_path / "new" / "model.safetensors") == oct(0o640)  # the umask's, not safetensors' 0o600
    (tmp_path / "made").mkdir()
    os.chmod(tmp_path / "made", 0o711)
    with pytest.raises(SystemExit):
        merge.main(["--base", str(saved / "nope"), "--policies", str(saved / "b"), "--output",
                    str(tmp_path / "made")])
    assert mode(tmp_path / "made") == oct(0o711) and not any((tmp_path / "made").iterdir())
    merge.main([*argv, str(tmp_path / "made")])
    assert mode(tmp_path / "made") == oct(0o711) and (tmp_path / "made" / "config.json").exists()


def test_merge_py_as_a_process_prints_no_banner(saved, tmp_path):
    """stdout is merge.py's line alone: no DeepSpeed accelerator banner (save_pretrained imports it)."""
    script = os.path.join(os.path.dirname(merge.__file__), "merge.py")
    argv = ["--base", str(saved / "base"), "--policies", str(saved / "a"), "--output", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == f"{tmp_path / 'out'}: {saved / 'base'} + 1 x the mean change of 1 policies\n"
