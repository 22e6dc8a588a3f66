"""merge.py: the task-vector merge by hand, end to end on tiny saved policies, and its one-line errors."""
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedModel

import merge
from minrlhf import load_causal_lm, load_reward_model
from minrlhf.sampling import load_chat_model
from test_errors import assert_one_error_line
from tiny import save_tiny


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
    for name, seed in {"base": 0, "a": 1, "b": 2}.items():  # three models of one architecture and tokenizer
        save_tiny("llama", d / name, seed=seed)
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
    "output not empty": (["--output", "{d}/a"], r"--output .*a: not empty; choose a new folder"),
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
    """A full disk: one line, and --output left empty (no config.json: no half a model that the next stage
    would load, nor one that a rerun would refuse as not empty), no temporary folder beside it."""
    if where == "the base's save":
        monkeypatch.setattr(PreTrainedModel, "save_pretrained", config_then_disk_full)
    else:
        monkeypatch.setattr(merge, "save_file", disk_full)
    argv = ["--base", str(saved / "base"), "--policies", str(saved / "a"), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        merge.main(argv)
    assert_one_error_line(exit_info, capsys,
                          r"--output .*: cannot write the merged policy there \(\[Errno 28\]")
    assert not any((tmp_path / "out").iterdir()) and [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp
    monkeypatch.undo()  # room again: the same command writes the merge
    merge.main(argv)
    assert (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("name", list(CASES))
def test_merge_py_bad_input_fails_with_one_line(name, saved, tmp_path, capsys):
    flags, message = CASES[name]
    argv = {"--base": "{d}/base", "--policies": "{d}/a", "--output": str(tmp_path / "out")}
    for flag, value in zip(flags[::2], flags[1::2]):
        argv[flag] = value
    with pytest.raises(SystemExit) as exit_info:
        merge.main([s.format(d=saved) for pair in argv.items() for s in pair])
    assert_one_error_line(exit_info, capsys, message)
    assert not (tmp_path / "out" / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merging-")]  # no temporary folder left
