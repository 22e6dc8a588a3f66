"""merge.py: the task-vector merge by hand, end to end on tiny saved policies, and its one-line errors."""
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedModel

import merge
from minrlhf import load_causal_lm, load_reward_model
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
    return d


def test_merge_py_writes_the_scaled_mean_change(saved, tmp_path):
    merge.main(["--base", str(saved / "base"), "--policies", str(saved / "a"), str(saved / "b"),
                "--scale", "1.5", "--output", str(tmp_path / "merged")])
    base, a, b, merged = (load_causal_lm(str(p)).state_dict()
                          for p in (saved / "base", saved / "a", saved / "b", tmp_path / "merged"))
    for key, weight in base.items():
        expected = weight.double() + 1.5 * ((a[key].double() + b[key].double()) / 2 - weight.double())
        torch.testing.assert_close(merged[key], expected.float(), rtol=0, atol=1e-6)
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    merge.main(["--base", str(saved / "base"), "--policies", str(saved / "a"),
                "--output", str(tmp_path / "one")])
    one = load_causal_lm(str(tmp_path / "one")).state_dict()
    assert all(torch.equal(one[key], a[key]) for key in a)  # one policy at scale 1: that policy


def test_merge_py_reads_tied_and_sharded_policies(saved, tmp_path):
    """A tied LM head (saved once, under the embedding's name) and a policy saved in shards: the same merge."""
    assert len(list((saved / "tied_b_sharded").glob("*.safetensors"))) > 1
    merge.main(["--base", str(saved / "tied_base"), "--policies", str(saved / "tied_a"),
                str(saved / "tied_b_sharded"), "--scale", "1.5", "--output", str(tmp_path / "merged")])
    base, a, b, merged = (load_causal_lm(str(saved / p)).state_dict()
                          for p in ("tied_base", "tied_a", "tied_b", tmp_path / "merged"))
    for key, weight in base.items():
        expected = weight.double() + 1.5 * ((a[key].double() + b[key].double()) / 2 - weight.double())
        torch.testing.assert_close(merged[key], expected.float(), rtol=0, atol=1e-6)


CASES = {  # name: (flags, the one line expected on stderr)
    "another architecture": (["--policies", "{d}/wide"],
                             r"--policies .*wide: model\.embed_tokens\.weight: shape \(\d+, 64\), "
                             r"where --base .*base has \(\d+, 32\)"),
    "another tokenizer": (["--policies", "{d}/chat"],
                          r"--policies .*chat: a tokenizer other than --base .*base's"),
    "missing policy": (["--policies", "{d}/nope"], r"--policies .*nope: cannot load as a causal LM"),
    "a reward model": (["--base", "{d}/tied_base", "--policies", "{d}/tied_rm"],
                       r"--policies .*tied_rm: score\.weight: a weight that --base .*tied_base has not"),
    "output not empty": (["--output", "{d}/a"], r"--output .*a: not empty; choose a new folder"),
    "negative scale": (["--scale", "-1"], r"argument --scale: -1: expected a number >= 0"),
}


def test_merge_py_a_failed_write_is_one_line(saved, tmp_path, capsys, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    with pytest.raises(SystemExit) as exit_info:
        merge.main(["--base", str(saved / "base"), "--policies", str(saved / "a"), "--output", str(tmp_path)])
    assert_one_error_line(exit_info, capsys,
                          r"--output .*: cannot write the merged policy there \(\[Errno 28\]")


@pytest.mark.parametrize("name", list(CASES))
def test_merge_py_bad_input_fails_with_one_line(name, saved, tmp_path, capsys):
    flags, message = CASES[name]
    argv = {"--base": "{d}/base", "--policies": "{d}/a", "--output": str(tmp_path / "out")}
    for flag, value in zip(flags[::2], flags[1::2]):
        argv[flag] = value
    with pytest.raises(SystemExit) as exit_info:
        merge.main([s.format(d=saved) for pair in argv.items() for s in pair])
    assert_one_error_line(exit_info, capsys, message)
