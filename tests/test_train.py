"""train.py end to end on tiny random models: each stage learns, ZeRO stages, bf16 and offload, 2 ranks under
ZeRO-3, resume after SIGKILL, outputs that plain transformers loads. Launchers, signals, kills and exit statuses
run train.py as a process, as a user does; other one-rank runs call its main() here (`train`), which gives the
same numbers (test_same_seed_same_metrics) without the ~4 s of imports per run."""
import contextlib
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, pipeline

import minrlhf
import train as train_py  # train.py; `train` below runs it as a process
from minrlhf.cli import new_file_mode
from minrlhf.engine import build_engine, deepspeed_config, param_groups, skip_nonfinite_step
from minrlhf.lora import add_lora
from minrlhf.run import check_resume_flags, checkpoints, write_atomically
from minrlhf.sampling import pure_sampling
from tiny import make_tokenizer, save_tiny, turn_ending_chat_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
# torchrun gives the ranks the environment deepspeed's launcher gives them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
# MASTER_PORT; and OMP_NUM_THREADS=1, the threads train.py gives each of 2 ranks on 2 cores) after one import of torch
# instead of two of deepspeed: 3.5 s less per launch. The tests of a rank that fails, and LoRA's on two ranks, launch
# with deepspeed's launcher, as the README does.
TWO_RANKS = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SUBJECTS = ["the film", "the food", "the movie", "the service", "this product", "the book", "the hotel", "the show"]
# a clean launch: no rendezvous settings left in this process's environment by an in-process run
ENV = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
REWARD_FN = """def count_e(prompts, responses):
    return [float(r.count('e')) for r in responses]

def prompt_length(prompts, responses):
    return [float(len(p)) for p in prompts]

def count_e_affine(prompts, responses):
    return [2 * x + 3 for x in count_e(prompts, responses)]

calls = []
def nan_on_second_call(prompts, responses):
    calls.append(1)
    return [float('nan') if len(calls) == 2 else float(r.count('e')) for r in responses]

def interrupt_on_third_call(prompts, responses):  # as if Ctrl-C came during the last of 3 iterations
    import os, signal
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGINT)
    return count_e(prompts, responses)

def random_judge(prompts, responses):  # a gold judge that draws from torch's generator
    import torch
    return torch.rand(len(responses)).tolist()

def killed_on_rank1(prompts, responses):  # as the system kills a rank (out of memory) in iteration 2
    import os, signal
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return count_e(prompts, responses)

def terminated_on_rank1(prompts, responses):  # as a cluster preempts one rank's node in iteration 2
    import os, signal
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return count_e(prompts, responses)

def fail_on_rank1(prompts, responses):
    import os
    if os.environ["RANK"] == "1":
        raise RuntimeError("rank one is broken")
    return count_e(prompts, responses)
"""
DISK_FULL = """# train.py on a disk that fills up: at step 3's checkpoint, or at the final model ($FULL_AT says which),
# (unset: neither), for every rank or for rank $FULL_RANK alone. Runs as `disk_full.py [--local_rank=R] train.py flags...`
import errno, os, resource, runpy, signal, sys, torch, transformers
train = next(a for a in sys.argv if a.endswith("train.py"))
sys.argv = [train] + [a for a in sys.argv[1:] if a != train]
sys.path.insert(0, os.path.dirname(train))
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
save, save_pretrained = torch.save, transformers.PreTrainedModel.save_pretrained
def save_until_step3(obj, path, *args, **kwargs):
    return full() if "step3" in str(path) else save(obj, path, *args, **kwargs)
def save_into_4kb_files(*args, **kwargs):  # from here on, no file may grow past 4 kB: config.json fits, weights do not
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    return save_pretrained(*args, **kwargs)
if os.environ.get("FULL_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0"):
    if os.environ.get("FULL_AT") == "checkpoint":
        torch.save = save_until_step3
    elif os.environ.get("FULL_AT") == "final":
        transformers.PreTrainedModel.save_pretrained = save_into_4kb_files
    elif os.environ.get("FULL_AT") == "metrics":  # metrics.jsonl's writes fail from step 3's line on
        import minrlhf.run
        class FullFrom3:
            def __init__(self, f):
                self.f = f
            def write(self, text):
                return full() if text.startswith('{"step": 3,') else self.f.write(text)
            def flush(self):
                self.f.flush()
        open_metrics = minrlhf.run.Run.open_metrics
        minrlhf.run.Run.open_metrics = lambda run: FullFrom3(open_metrics(run))
runpy.run_path(train, run_name="__main__")
"""
NAN_GRADIENT = """# train.py with a NaN gradient at step 2 while its loss stays finite: d/dx 0 * sqrt(x) at x = 0 is 0 * inf
import os, runpy, sys, torch
sys.argv = sys.argv[1:]  # [train.py, flags...]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
import minrlhf
logprobs, calls = minrlhf.logprobs_from_logits, []
def poisoned(logits, labels):
    calls.append(1)
    return logprobs(logits, labels) + (0 * torch.sqrt(logits.sum() - logits.sum()) if len(calls) == 2 else 0)
minrlhf.logprobs_from_logits = poisoned
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny Llama, an SFT set, an obvious preference set, prompts and a reward function."""
    # DeepSpeed compiles its CPU ops (shared-memory comm, CPU Adam) on first use: build them once here,
    # not in two ranks at once
    subprocess.run([sys.executable, "-c", "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder, "
                    "CPUAdamBuilder; ShareMemCommBuilder().load(); CPUAdamBuilder().load()"], check=True)
    d = tmp_path_factory.mktemp("train")
    save_tiny("llama", d / "model")
    # weights 25x larger than the default init: next-token distributions that LoRA on the body can reshape
    # (with init 0.02 the frozen LM head keeps every distribution near uniform whatever the adapters do)
    save_tiny("llama", d / "peaked", config={"initializer_range": 0.5})
    minrlhf.load_reward_model(str(d / "model"), make_tokenizer().pad_token_id).save_pretrained(d / "random_rm")
    make_tokenizer().save_pretrained(d / "random_rm")  # a random head: an arbitrary, fixed function of the text
    rows = [{"prompt": f"{s} was", "chosen": " great, I loved it", "rejected": " awful"} for s in SUBJECTS] * 8
    (d / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "rewards.py").write_text(REWARD_FN)
    (d / "nan_gradient.py").write_text(NAN_GRADIENT)
    (d / "disk_full.py").write_text(DISK_FULL)
    (d / "interrupt.py").write_text("raise KeyboardInterrupt  # as if Ctrl-C came while the models load\n")
    # ZeRO-3 keeps parameters under 1e5 elements whole by default, i.e. all of a tiny model: partition all
    (d / "zero3.json").write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
                                              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    return d


def train(work, *flags, output, launcher=(), timeout=600):
    """train.py's metrics after a run from `work`: under `launcher` as a process, else one rank in this process
    (`train_py.main`: the imports done once, ~4 s less per run; the same numbers, tested below)."""
    argv = ["--model", str(work / "model"), "--dataset", str(work / "pref.jsonl"), "--output", str(work / output),
            *map(str, flags)]
    if not launcher:
        in_process(work, argv)
        return metrics(work / output)
    proc = subprocess.run([*launcher, os.path.join(ROOT, "train.py"), *argv], cwd=work, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return metrics(work / output)


def in_process(work, argv):
    """train_py.main(argv) as in a new process: from `work` (reward functions import from it), its reward module
    imported anew (the call counters of REWARD_FN at 0); then this process's SIGINT and SIGTERM handlers back
    (`Run` sets its own)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.modules.pop("rewards", None)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        train_py.main(argv)
    finally:
        os.chdir(cwd)
        for s, handler in handlers.items():
            signal.signal(s, handler)


def metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def checkpoint_weights(folder):
    """The module state DeepSpeed saved in a checkpoint folder (checkpoints/stepN, or its critic/)."""
    return torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def measured(log):
    """The metrics, less wall time and memory, which vary from run to run."""
    return [{k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))} for m in log]


def assert_resume_reproduces(work, flags, name):
    """4 steps checkpointed every 2, and a copy cut after step 3 (its step-4 checkpoint removed) and resumed:
    the same metrics, bit for bit."""
    flags = [*flags, "--max-steps", 4, "--save-every", 2, "--keep-checkpoints", 3]
    whole = train(work, *flags, output=f"{name}_whole")
    shutil.copytree(work / f"{name}_whole", work / f"{name}_cut")
    shutil.rmtree(work / f"{name}_cut" / "checkpoints" / "step4")  # as if killed after step 3
    cut_log = work / f"{name}_cut" / "metrics.jsonl"
    kept = "".join(line for line in cut_log.read_text().splitlines(True) if json.loads(line)["step"] <= 3)
    garbled = '{"step": "x"}\n{"step": null}\n'.encode() + b"\xff\xfe\n"  # steps not ints, bytes not UTF-8
    cut_log.write_bytes(kept.encode() + garbled + b'\n{"step": 4, "lo')  # a blank line, one cut short by a crash
    resumed = train(work, *flags, "--resume", output=f"{name}_cut")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4] and measured(whole) == measured(resumed)


PPO = ["--stage", "ppo", "--reward-fn", "rewards:count_e", "--max-new-tokens", 8, "--rollout-batch-size", 16,
       "--batch-size", 8, "--ppo-epochs", 2, "--temperature", 1.0, "--lr", 3e-3]


class Accumulating:
    """What ppo_update asks of a DeepSpeed engine: as DeepSpeed, `backward` divides the loss by the micro-batches
    per step (`accum`), `step` acts at the step's last; it keeps the weights (and the gradients, for a look)."""
    accum, micro = 1, 0

    def backward(self, loss):
        (loss / self.accum).backward()

    def step(self):
        self.micro += 1
        if self.micro % self.accum == 0:
            self.grads = [p.grad.clone() for p in self.parameters()]
            self.zero_grad()


class FakeEngine(Accumulating, minrlhf.PolicyWithValueHead):
    """The policy's engine."""


class FakeCritic(Accumulating, minrlhf.Critic):
    """A separate critic's engine."""


class Unpartitioned:
    """What rollout asks of a DeepSpeed engine without ZeRO-3."""
    def __init__(self, module):
        self.module = module

    def zero_optimization_partition_weights(self):
        return False


def test_rollout_ends_a_reply_at_its_turn_end():
    """A policy whose turns end with a special token other than EOS (Qwen2.5 base, Gemma, Phi-3) ends its reply
    there: one valid token, ended, so no missing-EOS penalty (stopping only at EOS: 6 tokens, cut off)."""
    model, tokenizer = turn_ending_chat_model()
    policy = minrlhf.PolicyWithValueHead(model, value_head=False)
    policy.backbone.generation_config = pure_sampling(tokenizer, 1.0, 6)
    batch = minrlhf.collate_prompts([{"prompt": p, "input_ids": minrlhf.encode_prompt(tokenizer, p)}
                                     for p in ("hi", "is it worth watching?")], tokenizer.pad_token_id)
    response, mask, ended = train_py.rollout(Unpartitioned(policy), batch, tokenizer)
    assert response.tolist() == [[tokenizer.convert_tokens_to_ids("<|im_end|>")]] * 2
    assert mask.tolist() == [[1], [1]] and ended.tolist() == [True, True]


@pytest.mark.parametrize("loss_agg", ["token", "sequence"])
def test_ppo_update_aggregates_as_told_and_puts_grpo_kl_in_the_loss(tmp_path, loss_agg):
    """ppo_update on a fixed rollout with answers of unequal length: the policy loss and GRPO's k3 term are
    aggregated as --loss-agg says, and --kl-coef weighs the KL term in the gradients. Two micro-batches of
    unequal tokens accumulated into one step give the gradient and stats of one micro-batch of them all; the
    entropy is a token mean whatever --loss-agg says (weights 25x the default init: entropies that differ)."""
    from argparse import Namespace
    train_py.init_distributed()  # a world of one, for loss_weights' all_reduce
    model = minrlhf.load_causal_lm(save_tiny("llama", tmp_path, config={"initializer_range": 0.5}))
    engine = FakeEngine(model, value_head=False)
    P, ids = 3, torch.randint(3, 60, (4, 9))  # 3 prompt tokens, 6 response tokens
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    attention_mask = torch.cat([torch.ones(4, P, dtype=torch.long), mask], 1)
    with torch.no_grad():
        logits, logprobs, _ = train_py.policy_forward(engine, ids, attention_mask, P, 1.0)
        entropy = minrlhf.entropy_from_logits(logits)
    advantages = torch.randn(4, 6)
    exp = {"ids": ids, "attention_mask": attention_mask, "mask": mask, "prompt_len": P, "logprobs": logprobs,
           "ref_logprobs": logprobs - 0.5, "advantages": advantages}
    args = Namespace(stage="grpo", ppo_epochs=1, batch_size=4, grad_accum=1, temperature=1.0, cliprange=0.2,
                     loss_agg=loss_agg)
    stats, grads = [], []
    for kl_coef in (0.0, 1.0):
        stats.append(train_py.ppo_update(engine, None, exp, kl_coef, args))
        grads.append(engine.grads)
    engine.accum, engine.micro = 2, 0  # a step of two micro-batches from here
    args.grad_accum = 2
    args.batch_size = 2
    torch.manual_seed(0)  # the micro-batches: rows (0, 1) and (3, 2), 12 and 5 tokens
    split = train_py.ppo_update(engine, None, exp, 1.0, args)
    assert all(split[k] == pytest.approx(v, rel=1e-5) for k, v in stats[1].items() if not k.startswith("time/"))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(engine.grads, grads[1]))
    expected_kl = minrlhf.aggregate(minrlhf.kl_k3(logprobs, logprobs - 0.5, mask), mask, loss_agg)
    for s in stats:  # ratio 1: the clipped surrogate is the mean of -A, the way loss_agg takes means
        assert s["ppo/loss/policy"] == pytest.approx(minrlhf.aggregate(-advantages, mask, loss_agg).item(), rel=1e-5)
        assert s["grpo/kl_k3"] == pytest.approx(expected_kl.item(), rel=1e-5)
        assert s["entropy"] == pytest.approx(minrlhf.aggregate(entropy, mask, "token").item(), rel=1e-5)
    assert minrlhf.aggregate(entropy, mask, "token") != pytest.approx(minrlhf.aggregate(entropy, mask, "sequence"))
    assert minrlhf.aggregate(-advantages, mask, "token") != minrlhf.aggregate(-advantages, mask, "sequence")
    exp["logprobs"] = logprobs + 0.3 * torch.randn_like(logprobs)  # ratios off 1: clipfrac, approx_kl > 0
    engine.accum, engine.micro = 1, 0
    args.grad_accum = 1
    args.batch_size = 4
    whole = train_py.ppo_update(engine, None, exp, 1.0, args)
    engine.accum, engine.micro = 2, 0  # a step of two micro-batches from here
    args.grad_accum = 2
    args.batch_size = 2
    torch.manual_seed(0)
    split = train_py.ppo_update(engine, None, exp, 1.0, args)
    assert whole["ppo/policy/clipfrac"] > 0 and whole["ppo/policy/approx_kl"] > 0
    assert all(split[k] == pytest.approx(whole[k], rel=1e-5) for k in whole if not k.startswith("time/"))
    exp["logprobs"] = logprobs
    engine.zero_grad()  # kl_coef 1 adds exactly the k3 term's gradient, with its sign
    _, new_logprobs, _ = train_py.policy_forward(engine, ids, attention_mask, P, 1.0)
    minrlhf.aggregate(minrlhf.kl_k3(new_logprobs, logprobs - 0.5, mask), mask, loss_agg).backward()
    kl_grads = [p.grad for p in engine.parameters()]
    assert any(k.abs().max() > 1e-4 for k in kl_grads)
    assert all(torch.allclose(b, a + k, rtol=1e-4, atol=1e-6) for a, b, k in zip(*grads, kl_grads))


def test_a_separate_critics_step_is_a_token_level_mean_over_micro_batches(tmp_path):
    """The critic's value loss, as the policy's, weighs every token of a mini-batch alike: two micro-batches of
    unequal tokens accumulated into one step give the critic the gradient of one micro-batch of them all."""
    from argparse import Namespace
    train_py.init_distributed()  # a world of one, for loss_weights' all_reduce
    path = save_tiny("llama", tmp_path)
    engine = FakeEngine(minrlhf.load_causal_lm(path), value_head=False)
    critic = FakeCritic(minrlhf.load_reward_model(path, make_tokenizer().pad_token_id))
    P, ids = 3, torch.randint(3, 60, (4, 9))  # 3 prompt tokens, 6 response tokens
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    attention_mask = torch.cat([torch.ones(4, P, dtype=torch.long), mask], 1)
    with torch.no_grad():
        _, logprobs, values = train_py.policy_forward(engine, ids, attention_mask, P, 1.0, critic)
    exp = {"ids": ids, "attention_mask": attention_mask, "mask": mask, "prompt_len": P, "logprobs": logprobs,
           "values": values, "returns": values + torch.randn(4, 6), "advantages": torch.randn(4, 6)}
    args = Namespace(stage="ppo", ppo_epochs=1, batch_size=4, grad_accum=1, temperature=1.0, cliprange=0.2,
                     cliprange_value=0.2, loss_agg="token")
    whole = train_py.ppo_update(engine, critic, exp, 0.1, args)
    grads = critic.grads
    engine.accum = critic.accum = args.grad_accum = 2
    engine.micro = critic.micro = 0
    args.batch_size = 2  # any two rows of the four: 12 and 5, 8 and 9 or 9 and 8 tokens
    split = train_py.ppo_update(engine, critic, exp, 0.1, args)
    assert split["ppo/loss/value"] == pytest.approx(whole["ppo/loss/value"], rel=1e-5)
    assert any(g.abs().max() > 1e-4 for g in grads)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(critic.grads, grads))


RLOO_EXP = {"mask": torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]), "logprobs": torch.zeros(4, 3),
            "ref_logprobs": -torch.tensor([[0.1], [0.2], [0.3], [0.4]]).expand(4, 3)}  # sequence KLs 0.3, 0.4, 0.3, 1.2


def test_rloo_takes_the_sequence_kl_from_the_score():
    from argparse import Namespace
    advantages = train_py.critic_free_advantages(RLOO_EXP, torch.zeros(4), 1.0, Namespace(stage="rloo", num_generations=2))
    # the KLs taken from the scores (0), then each less the other of its pair
    torch.testing.assert_close(advantages, torch.tensor([0.1, -0.1, 0.9, -0.9])[:, None].expand(4, 3))


def test_rollout_stats_by_hand():
    """What the online stages log against hand-computed values: the KL, the share of groups that tie, the critic's
    explained variance."""
    train_py.init_distributed()  # a world of one: some stats are of every rank's rollout
    exp, mask = {**RLOO_EXP, "advantages": torch.zeros(4, 3)}, RLOO_EXP["mask"]
    assert train_py.rollout_stats(exp, torch.zeros(4), torch.zeros(4), 1.0, 2)["kl"] == pytest.approx(0.55)
    six = {"mask": torch.ones(6, 2), "logprobs": torch.zeros(6, 2), "ref_logprobs": torch.zeros(6, 2),
           "advantages": torch.zeros(6, 2)}
    scores = torch.tensor([1.0, 1.0, 2.0, 3.0, 4.0, 4.0])  # two of three groups tie
    assert train_py.rollout_stats(six, scores, scores, 1.0, 2)["frac_reward_zero_std"] == pytest.approx(2 / 3)
    cut_off = scores - torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # the EOS penalty of the first group's second
    assert train_py.rollout_stats(six, scores, cut_off, 1.0, 2)["frac_reward_zero_std"] == pytest.approx(1 / 3)
    torch.manual_seed(0)
    values, returns = torch.randn(4, 3), 3 * torch.randn(4, 3)
    stats = train_py.rollout_stats({**RLOO_EXP, "values": values, "returns": returns}, torch.zeros(4), torch.zeros(4),
                                  1.0, 1)
    expected = 1 - minrlhf.masked_var(returns - values, mask) / minrlhf.masked_var(returns, mask)
    assert stats["ppo/val/explained_variance"] == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected - minrlhf.explained_variance(returns, values, mask)) > 0.1  # not symmetric in V and R


def test_rollout_stats_are_means_over_valid_tokens_and_samples():
    """`ppo/returns/mean` over valid tokens (returns in padding are not the rollout's); `advantage_std` over the
    samples (one advantage each, repeated over its tokens)."""
    train_py.init_distributed()
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0], [6.0, 99.0, 99.0], [7.0, 8.0, 9.0]])
    stats = train_py.rollout_stats({**RLOO_EXP, "values": torch.zeros(4, 3), "returns": returns}, torch.zeros(4),
                                   torch.zeros(4), 1.0, 1)
    assert stats["ppo/returns/mean"] == pytest.approx(45 / 9)
    per_sample = torch.tensor([1.0, -1.0, 3.0, 0.0])
    exp = {**RLOO_EXP, "advantages": per_sample[:, None].expand(4, 3)}
    assert train_py.rollout_stats(exp, torch.zeros(4), torch.zeros(4), 1.0, 2)["advantage_std"] == pytest.approx(
        per_sample.std().item())


def test_ppo_advantages_are_gae_at_gamma_and_lambda():
    """PPO's phases 3-4: the KL-shaped rewards, GAE at --gamma and --lam (not the other way round), whitened."""
    from argparse import Namespace
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    exp = {"mask": mask, "logprobs": torch.randn(2, 3), "ref_logprobs": torch.randn(2, 3), "values": torch.randn(2, 3)}
    scores = torch.tensor([1.0, -2.0])
    args = Namespace(whiten_rewards=False, gamma=0.9, lam=0.5)
    advantages, returns = train_py.ppo_advantages(exp, scores, 0.3, args)
    rewards = minrlhf.kl_penalized_rewards(scores, exp["logprobs"], exp["ref_logprobs"], mask, 0.3)
    expected, expected_returns = minrlhf.compute_gae(rewards, exp["values"], mask, 0.9, 0.5)
    torch.testing.assert_close(advantages, minrlhf.masked_whiten(expected, mask))
    torch.testing.assert_close(returns, expected_returns)


def test_policy_forward_reads_each_tokens_value_where_its_logits_are(tmp_path):
    """values[:, i] is the value head's output at position P - 1 + i, the state before response token i."""
    policy = minrlhf.PolicyWithValueHead(minrlhf.load_causal_lm(save_tiny("llama", tmp_path)))
    torch.nn.init.normal_(policy.value_head.weight)  # a head that tells positions apart
    ids, P = torch.randint(3, 60, (2, 7)), 3
    with torch.no_grad():
        values = train_py.policy_forward(policy, ids, torch.ones_like(ids), P, 1.0)[2]  # (2, 4)
        every = policy(ids, torch.ones_like(ids))[1]  # (2, 7)
    torch.testing.assert_close(values, every[:, P - 1:-1])


def test_make_experience_scores_the_reference_at_the_sampling_temperature(tmp_path):
    """The reference's log-probs at the policy's temperature: the same model gives KL 0 at any temperature."""
    from argparse import Namespace
    model = minrlhf.load_causal_lm(save_tiny("llama", tmp_path))
    policy = minrlhf.PolicyWithValueHead(model, value_head=False)
    batch = {"input_ids": torch.randint(3, 60, (2, 4)), "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    response, mask = torch.randint(3, 60, (2, 3)), torch.ones(2, 3, dtype=torch.long)
    exp = train_py.make_experience(policy, model, None, batch, response, mask, Namespace(batch_size=1,
                                                                                          temperature=0.7))
    torch.testing.assert_close(exp["ref_logprobs"], exp["logprobs"])


def test_the_value_heads_loss_joins_the_policys_weighed_by_vf_coef(tmp_path):
    from argparse import Namespace
    torch.manual_seed(0)
    policy = minrlhf.PolicyWithValueHead(minrlhf.load_causal_lm(save_tiny("llama", tmp_path)))
    ids, mask = torch.randint(3, 60, (2, 6)), torch.ones(2, 3, dtype=torch.long)
    exp = {"ids": ids, "attention_mask": torch.ones_like(ids), "prompt_len": 3, "mask": mask,
           "logprobs": torch.zeros(2, 3), "advantages": torch.randn(2, 3), "values": torch.zeros(2, 3),
           "returns": torch.randn(2, 3)}
    losses = {}
    for vf_coef in (0.0, 0.1):
        args = Namespace(temperature=1.0, cliprange=0.2, cliprange_value=0.2, loss_agg="token", stage="ppo",
                         vf_coef=vf_coef)
        losses[vf_coef], critic_loss, stats = train_py.ppo_losses(policy, None, exp, torch.arange(2), 0.1, args)
        assert critic_loss is None  # one loss for the shared backbone
    assert (losses[0.1] - losses[0.0]).item() == pytest.approx(0.1 * stats["ppo/loss/value"].item(), rel=1e-5)


def test_loss_units_count_the_labels_that_are_predicted():
    """A {text} row's first token has a label but nothing predicts it: SFT's loss is over the others."""
    assert train_py.loss_units({"labels": torch.tensor([[5, 6, 7, -100], [-100, 8, 9, 10]])}, "sft") == 5


def test_loss_weights_over_several_steps():
    """Each step's micro-batches weighed by its own units: steps (10, 30) and (20, 20) -> 0.5, 1.5, 1, 1."""
    train_py.init_distributed()  # a world of one, for the all_reduce
    assert train_py.loss_weights([10, 30, 20, 20], 2) == pytest.approx([0.5, 1.5, 1.0, 1.0])


def test_policy_forward_scores_at_the_sampling_temperature(tmp_path):
    """The policy's log-probs at the sampling temperature, as the reference's (which test_models checks against
    the sampler's own)."""
    policy = minrlhf.PolicyWithValueHead(minrlhf.load_causal_lm(save_tiny("llama", tmp_path)), value_head=False)
    ids = torch.randint(3, 60, (2, 7))
    with torch.no_grad():
        logprobs = train_py.policy_forward(policy, ids, torch.ones_like(ids), 3, 0.7)[1]
        reference = minrlhf.response_logprobs(policy.backbone, ids, torch.ones_like(ids), 3, 0.7)
    torch.testing.assert_close(logprobs, reference)
    assert (logprobs - train_py.policy_forward(policy, ids, torch.ones_like(ids), 3, 1.0)[1]).abs().max() > 1e-3


def test_rm_loss_is_the_ranking_loss_of_the_pairs_scores(tmp_path):
    """rm_loss: the pairwise ranking loss of score_pairs' scores, its accuracy and margin their means over pairs."""
    tok = make_tokenizer()
    model = minrlhf.load_reward_model(save_tiny("llama", tmp_path), tok.pad_token_id).eval()
    rows = [{"prompt": f"{s} was", "chosen": " great", "rejected": f" awful, {s} was bad"} for s in SUBJECTS[:5]]
    groups = minrlhf.collate_pairs([minrlhf.encode_preference(r, tok, 64) for r in rows], tok.pad_token_id)
    with torch.no_grad():
        chosen, rejected = minrlhf.score_pairs(model, groups)
        loss, stats = train_py.rm_loss(model, groups)
    assert loss.item() == pytest.approx(minrlhf.pairwise_ranking_loss(chosen, rejected)[0].item())
    assert stats["margin"] == pytest.approx((chosen - rejected).mean().item(), rel=1e-5)
    assert stats["accuracy"] == pytest.approx((chosen > rejected).float().mean().item())


def test_sft_loss_is_transformers_own(tmp_path):
    """sft_loss (LM head on positions 0 .. T-2, prompt labels -100) is the loss transformers computes from labels."""
    model = AutoModelForCausalLM.from_pretrained(save_tiny("llama", tmp_path))
    ids = torch.randint(3, 60, (2, 9))
    labels = ids.clone()
    labels[0, :4], labels[1, 7:] = -100, -100
    loss, _ = train_py.sft_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    torch.testing.assert_close(loss, model(input_ids=ids, labels=labels).loss)


def test_sft_loss_falls_and_saves_a_pipeline_model(work):
    log = train(work, "--stage", "sft", "--max-steps", 30, "--lr", 1e-2, "--batch-size", 8, "--save-every", 10,
                output="sft")
    assert [m["step"] for m in log] == list(range(1, 31))
    assert log[-1]["loss"] < 0.5 * log[0]["loss"] and "eval/loss" in log[-1] and "eval/loss" in log[9]
    saved = json.loads((work / "sft" / "args.json").read_text())
    assert (saved["stage"], saved["world_size"], saved["cwd"]) == ("sft", 1, str(work))  # cwd: `run_path`
    assert stat.S_IMODE(os.stat(work / "sft" / "model.safetensors").st_mode) == new_file_mode()  # not 0o600
    assert sorted(os.listdir(work / "sft" / "checkpoints")) == ["step20", "step30"]  # --keep-checkpoints 2
    generate = pipeline("text-generation", model=str(work / "sft"), tokenizer=str(work / "sft"))
    out = generate("the book was", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert out.startswith("the book was great")


def test_rm_separates_preferences_and_loads_as_sequence_classifier(work):
    log = train(work, "--stage", "rm", "--max-steps", 20, "--lr", 1e-3, "--batch-size", 8, "--eval-fraction", 0.25,
                output="rm")
    assert log[-1]["eval/accuracy"] == 1.0 and log[-1]["eval/margin"] > 1.0
    model = AutoModelForSequenceClassification.from_pretrained(work / "rm").eval()
    tok = AutoTokenizer.from_pretrained(work / "rm")
    tok.padding_side = "right"
    batch = tok(["the hotel was great, I loved it" + tok.eos_token, "the hotel was awful" + tok.eos_token],
                return_tensors="pt", padding=True)
    with torch.no_grad():
        chosen, rejected = model(**batch).logits.squeeze(-1).tolist()
    assert chosen > rejected


def summed_reply_logprob(model, tokenizer, prompt, reply):
    """log p(reply + EOS | prompt) with plain transformers."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = torch.tensor([prompt_ids + tokenizer(reply)["input_ids"] + [tokenizer.eos_token_id]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])
    return logprobs[len(prompt_ids) - 1:].sum().item()


def test_dpo_learns_the_preference_without_a_reward_model(work):
    log = train(work, "--stage", "dpo", "--max-steps", 12, "--lr", 3e-3, "--batch-size", 8, "--eval-fraction", 0.25,
                output="dpo")
    for key in ("loss", "accuracy", "margin", "logps/chosen", "logps/rejected", "eval/accuracy", "eval/margin"):
        assert key in log[-1], key
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference before the first update
    assert log[-1]["loss"] < 0.3 and log[-1]["eval/accuracy"] == 1.0
    tokenizer = AutoTokenizer.from_pretrained(work / "dpo")
    policy, base = (AutoModelForCausalLM.from_pretrained(work / d).eval() for d in ("dpo", "model"))
    prompt = "the play was"  # a subject never trained on: the implicit reward log pi/pi_ref must generalise
    implicit = {reply: summed_reply_logprob(policy, tokenizer, prompt, reply)
                - summed_reply_logprob(base, tokenizer, prompt, reply) for reply in (" great, I loved it", " awful")}
    assert implicit[" great, I loved it"] > implicit[" awful"], implicit


def test_dpo_resume_reproduces_the_uninterrupted_run(work):
    """With micro-batches accumulated: the resumed run goes on from the micro-batch after the checkpoint's step."""
    assert_resume_reproduces(work, ["--stage", "dpo", "--lr", 1e-3, "--batch-size", 2, "--grad-accum", 2], "dpo")


def test_batches_reshuffle_each_epoch_and_resume_where_they_were():
    from minrlhf.run import batches
    train_py.init_distributed()  # a world of one
    order = batches(8, 2, seed=0)
    first = [next(order) for _ in range(8)]  # two epochs of four batches
    assert sorted(sum(first[:4], [])) == sorted(sum(first[4:], [])) == list(range(8))
    assert first[:4] != first[4:]  # a new permutation each epoch
    resumed = batches(8, 2, seed=0, start=5)
    assert [next(resumed) for _ in range(3)] == first[5:]
    odd = batches(7, 2, seed=0)  # batches span epochs: each epoch reads every example once
    stream = sum((next(odd) for _ in range(7)), [])  # two epochs of 7
    assert sorted(stream[:7]) == sorted(stream[7:]) == list(range(7))


def test_ppo_raises_the_reward(work):
    log = train(work, *PPO, "--max-steps", 20, output="ppo")
    first, last = [sum(m["reward"] for m in part) / 5 for part in (log[:5], log[-5:])]
    assert last > first + 0.3, [m["reward"] for m in log]
    for key in ("reward", "kl", "kl_coef", "ppo/loss/policy", "ppo/loss/value", "ppo/policy/clipfrac",
                "ppo/val/clipfrac", "ppo/policy/approx_kl", "entropy", "ppo/val/explained_variance",
                "response_length", "time/rollout", "time/score", "time/forward", "time/update"):
        assert key in log[-1]
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # policy == reference before the first update
    assert os.path.exists(work / "ppo" / "value_head.pt")
    assert AutoModelForCausalLM.from_pretrained(work / "ppo").config.vocab_size == 400
    prompts = [f"{s} was" for s in SUBJECTS[:4]]  # the saved policy, sampled with plain transformers
    assert sampled_e_count(work / "ppo", prompts) > sampled_e_count(work / "model", prompts) + 0.3  # 1.48, 0.92


GROUP = ["--reward-fn", "rewards:count_e", "--max-new-tokens", 8, "--rollout-batch-size", 4, "--batch-size", 8,
         "--temperature", 1.0, "--lr", 1e-2]  # 4 prompts x G = 4 samples per rollout


@torch.no_grad()
def sampled_e_count(run_dir, prompts, samples=32):
    """Mean number of 'e' in responses sampled with plain transformers from a saved policy."""
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    model = AutoModelForCausalLM.from_pretrained(run_dir).eval()
    torch.manual_seed(0)
    total = 0.0
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]] * samples)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                             temperature=1.0, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
        total += sum(t.count("e") for t in tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True))
    return total / (samples * len(prompts))


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_critic_free_stages_raise_the_reward(work, stage):
    log = train(work, "--stage", stage, *GROUP, "--max-steps", 20, output=stage)
    first, last = [sum(m["reward"] for m in part) / 5 for part in (log[:5], log[-5:])]
    assert last > first + 0.5, [m["reward"] for m in log]
    for key in ("reward", "kl", "advantage_std", "frac_reward_zero_std", "response_length", "ppo/loss/policy",
                "ppo/policy/clipfrac", "entropy", "time/rollout", "time/update"):
        assert key in log[-1], key
    assert ("grpo/kl_k3" in log[-1]) == (stage == "grpo") and "ppo/loss/value" not in log[-1]
    assert not os.path.exists(work / stage / "value_head.pt")  # no critic
    prompts = [f"{s} was" for s in SUBJECTS[:4]]
    assert sampled_e_count(work / stage, prompts) > sampled_e_count(work / "model", prompts) + 0.5


def test_sequence_loss_agg_and_dr_grpo_run(work):
    """Each alone, from the same first rollout: --no-scale-rewards changes the advantages; --loss-agg sequence
    their means, except where every answer has the same length, as here, all at the cap (unequal lengths:
    test_ppo_update_aggregates_as_told_and_puts_grpo_kl_in_the_loss)."""
    flags = ["--stage", "grpo", *GROUP, "--max-steps", 2]
    plain = train(work, *flags, output="agg_token")
    sequence = train(work, *flags, "--loss-agg", "sequence", output="agg_sequence")
    unscaled = train(work, *flags, "--no-scale-rewards", output="agg_unscaled")
    for other in (sequence, unscaled):
        assert other[0]["reward"] == plain[0]["reward"] and other[0]["kl"] == plain[0]["kl"]
    assert plain[0]["response_length"] == 8
    assert measured(sequence)[0] == pytest.approx(measured(plain)[0], rel=1e-6, abs=1e-9)
    assert unscaled[0]["advantage_std"] != pytest.approx(plain[0]["advantage_std"])
    assert unscaled[0]["ppo/loss/policy"] != pytest.approx(plain[0]["ppo/loss/policy"])


def test_critic_free_resume_reproduces_the_uninterrupted_run(work):  # rloo: the same loop
    assert_resume_reproduces(work, ["--stage", "grpo", *GROUP], "grpo")


def test_reward_norm_makes_ppo_blind_to_the_reward_scale(work):
    """Scores are normalised with the first rollout's mean and std, so 2 * score + 3 trains identically."""
    plain = train(work, *PPO, "--max-steps", 3, output="norm_plain")
    affine = train(work, *PPO, "--max-steps", 3, "--reward-fn", "rewards:count_e_affine", output="norm_affine")
    for a, b in zip(plain, affine):
        assert b["reward"] == pytest.approx(2 * a["reward"] + 3)
        for key in ("kl", "ppo/loss/policy", "ppo/loss/value", "ppo/returns/mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key


def test_ppo_with_the_reward_model_and_adaptive_kl(work):
    log = train(work, "--stage", "ppo", "--reward-model", work / "random_rm", "--max-new-tokens", 6,
                "--rollout-batch-size", 8, "--batch-size", 4, "--max-steps", 3, "--target-kl", 0.01,
                "--missing-eos-penalty", 1.0, "--gold-fn", "rewards:count_e", output="ppo_rm")
    assert len(log) == 3
    for this, then in zip(log, log[1:]):  # Ziegler et al.'s controller: beta *= 1 + 0.1 clip(KL / target - 1, +-0.2)
        error = min(max(this["kl"] / 0.01 - 1, -0.2), 0.2)
        assert then["kl_coef"] == pytest.approx(this["kl_coef"] * (1 + 0.1 * error)) and error != 0
    assert (work / "ppo_rm" / "critic" / "config.json").exists()  # the default critic: the reward model's copy
    # its values are the score normalised by the scores' mean and std: saved beside it, and read with it
    norm = torch.load(work / "ppo_rm" / "critic" / "value_normalisation.pt")
    state = torch.load(work / "ppo_rm" / "checkpoints" / "step3" / "mp_rank_00_model_states.pt", weights_only=False)
    assert norm == pytest.approx(state["reward_norm"]) and norm["std"] != 1.0
    from argparse import Namespace
    from minrlhf.inputs import load_critic
    args = Namespace(critic_model=str(work / "ppo_rm" / "critic"), model=None, lora_rank=0, lora_alpha=None,
                     lora_targets="all-linear", gradient_checkpointing=False, longest=16, bf16=False)
    critic = load_critic(args, AutoTokenizer.from_pretrained(work / "ppo_rm"), minrlhf.load_causal_lm(str(work / "ppo_rm")))
    assert (critic.shift.item(), critic.scale.item()) == pytest.approx((norm["mean"], norm["std"]))
    # the second judge is logged: count_e's mean over 8 responses, a multiple of 1/8, unlike the RM's reward
    assert all((m["gold"] * 8).is_integer() for m in log) and not all((m["reward"] * 8).is_integer() for m in log)


@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_whiten_rewards_whitens_what_gae_sums(whiten_rewards):
    """With values 0 and gamma = lam = 1 the returns are each token's reward-to-go, so their differences give
    back the per-token rewards GAE summed: the KL-shaped ones, or those whitened (variance 1, mean kept). The
    advantages are whitened either way."""
    from argparse import Namespace
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    logprobs = torch.randn(3, 4)
    exp = {"mask": mask, "logprobs": logprobs, "ref_logprobs": logprobs - torch.rand(3, 4), "values": torch.zeros(3, 4)}
    shaped = torch.tensor([5.0, -3.0, 8.0])
    args = Namespace(whiten_rewards=whiten_rewards, gamma=1.0, lam=1.0)
    advantages, returns = train_py.ppo_advantages(exp, shaped, 0.5, args)
    assert minrlhf.masked_mean(advantages, mask).item() == pytest.approx(0.0, abs=1e-6)  # the advantages: whitened
    assert minrlhf.masked_var(advantages, mask).item() == pytest.approx(1.0, rel=1e-4)
    summed = torch.where(mask.bool(), returns - torch.nn.functional.pad(returns[:, 1:], (0, 1)), 0.0)  # r_t
    rewards = minrlhf.kl_penalized_rewards(shaped, exp["logprobs"], exp["ref_logprobs"], mask, 0.5)
    assert minrlhf.masked_mean(summed, mask).item() == pytest.approx(minrlhf.masked_mean(rewards, mask).item(), abs=1e-5)
    if whiten_rewards:
        assert minrlhf.masked_var(summed, mask).item() == pytest.approx(1.0, rel=1e-4)
    else:
        torch.testing.assert_close(summed, torch.where(mask.bool(), rewards, 0.0))
        assert minrlhf.masked_var(summed, mask).item() > 5  # the scores' spread, not whitened


def test_missing_eos_penalty_comes_after_normalisation_where_eos_is_missing():
    args = train_py.parse_args(["--stage", "ppo", "--model", ROOT, "--dataset", "x.jsonl", "--reward-fn", "m:f"])
    assert args.missing_eos_penalty == 0.0  # not the offline example: off
    args.missing_eos_penalty = 1.5
    shaped = train_py.normalised_scores(torch.tensor([3.0, 3.0, 7.0]), torch.tensor([True, False, False]),
                                 {"mean": 3.0, "std": 2.0}, args)
    torch.testing.assert_close(shaped, torch.tensor([0.0, -1.5, 0.5]))  # in normalised units, whatever the scale


def test_reward_norm_waits_for_a_rollout_whose_scores_differ():
    """A 0/1 reward that is 0 for the whole first rollout has no scale: dividing by its std (0) would blow the
    next rollouts' scores up a million-fold and drown the KL penalty."""
    train_py.init_distributed()  # a world of one, for across_ranks' all_gather
    args = train_py.parse_args(["--stage", "grpo", "--model", ROOT, "--dataset", "x.jsonl", "--reward-fn", "m:f"])
    norm, ended = {}, torch.tensor([True] * 4)
    for tied in (0.0, 5.0, 0.1, 1 / 3):  # E[s²] - E[s]² in float32 is not 0 for the last two
        assert torch.equal(train_py.normalised_scores(torch.full((4,), tied), ended, norm, args), torch.full((4,), tied))
        assert norm == {}
    shaped = train_py.normalised_scores(torch.tensor([0.0, 1.0, 1.0, 0.0]), ended, norm, args)
    assert norm == {"mean": 0.5, "std": 0.5}
    torch.testing.assert_close(shaped, torch.tensor([-1.0, 1.0, 1.0, -1.0]))
    assert torch.equal(train_py.normalised_scores(torch.full((4,), 2.0), ended, norm, args), torch.full((4,), 3.0))  # kept
    barely, norm = torch.tensor([0.0, 0.0, 0.0, 1e-9]), {}  # a spread, but a std below the floor of 1e-6
    torch.testing.assert_close(train_py.normalised_scores(barely, ended, norm, args), (barely - barely.mean()) / 1e-6)


def test_ppo_defaults_a_critic_from_the_reward_model_else_the_value_head():
    """InstructGPT's critic, from the reward model, where there is one, with the lambda and value lr that made it
    learn on the offline example; the value head (cheaper) with a reward function or when asked for."""
    base = ["--stage", "ppo", "--model", ROOT, "--dataset", "x.jsonl"]
    args = train_py.parse_args([*base, "--reward-model", "rm_dir"])
    assert (args.critic_model, args.lam, args.value_lr, args.lr) == ("rm_dir", 0.95, 1e-4, 2e-5)
    for flags in (["--reward-fn", "m:f"], ["--reward-model", "rm_dir", "--critic-model", "head"]):
        args = train_py.parse_args([*base, *flags])
        assert (args.critic_model, args.lam, args.value_lr) == ("head", 1.0, None)  # None: the head learns at --lr
    args = train_py.parse_args([*base, "--reward-model", "rm_dir", "--lam", "0", "--value-lr", "1e-3"])
    assert (args.lam, args.value_lr) == (0.0, 1e-3)
    assert train_py.parse_args([*base, "--stage", "grpo", "--reward-fn", "m:f"]).critic_model is None


def test_online_defaults_and_the_mini_batch():
    """G = 4 samples per prompt for grpo and rloo (1 for ppo); --mini-batch-size sets --grad-accum."""
    base = ["--model", ROOT, "--dataset", "x.jsonl", "--reward-fn", "m:f"]
    assert [train_py.parse_args([*base, "--stage", s]).num_generations for s in ("ppo", "grpo", "rloo")] == [1, 4, 4]
    assert train_py.parse_args([*base, "--stage", "ppo", "--batch-size", "2", "--mini-batch-size", "8"]).grad_accum == 4
    # the rollout's responses, G per prompt, make whole mini-batches: 2 prompts x 2 samples, one mini-batch of 4
    grpo = train_py.parse_args([*base, "--stage", "grpo", "--rollout-batch-size", "2", "--num-generations", "2"])
    assert grpo.grad_accum == 1


def test_the_defaults_that_help_and_the_readme_promise():
    base = ["--model", ROOT, "--dataset", "x.jsonl"]
    online = {s: train_py.parse_args([*base, "--stage", s, "--reward-fn", "m:f"]) for s in ("ppo", "grpo", "rloo")}
    offline = {s: train_py.parse_args([*base, "--stage", s]) for s in ("sft", "rm", "dpo")}
    assert {s: a.lr for s, a in {**offline, **online}.items()} == {"sft": 1e-5, "rm": 5e-5, "dpo": 1e-5,
                                                                   "ppo": 2e-5, "grpo": 2e-5, "rloo": 2e-5}
    sft = offline["sft"]
    assert (sft.epochs, sft.save_every, sft.keep_checkpoints, sft.log_every, sft.grad_accum) == (1.0, 100, 2, 1, 1)
    assert [(a.ppo_epochs, a.rollout_batch_size, a.kl_coef, a.max_new_tokens) for a in online.values()] == [
        (2, 16, 0.1, 48), (1, 4, 0.1, 48), (1, 4, 0.1, 48)]
    assert (online["ppo"].vf_coef, online["ppo"].lam) == (0.1, 1.0)  # the value head's (no --reward-model here)
    assert {a.missing_eos_penalty for a in online.values()} == {0.0}  # 1 on the offline example's prompts alone


@pytest.mark.parametrize("name", ["max_steps", "epochs", "save_every", "keep_checkpoints", "log_every", "gold_fn",
                                  "skip_nonfinite", "gradient_checkpointing", "deepspeed_config"])
def test_resume_may_change_how_long_a_run_goes_logs_and_saves(tmp_path, name):
    """Each flag that the README says --resume may change, given another value, is accepted; another is not."""
    args = train_py.parse_args(["--stage", "sft", "--model", ROOT, "--dataset", "x.jsonl", "--output",
                                str(tmp_path)])
    saved = {**vars(args), "world_size": 1, name: "another value"}
    check_resume_flags(args, saved)  # no error
    with pytest.raises(SystemExit):
        check_resume_flags(args, {**saved, "batch_size": 99})


def test_resume_reads_the_runs_relative_paths_from_where_it_started(tmp_path, monkeypatch, capsys):
    """A relative --reward-model (--model, ...) names what it named where the run started (args.json's cwd):
    the same spelling from another folder is another model, refused; the path that reaches it is accepted."""
    for folder in ("a/rm", "b/rm"):
        (tmp_path / folder).mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "b")
    args = train_py.parse_args(["--stage", "ppo", "--model", ROOT, "--dataset", "x.jsonl", "--reward-model", "rm",
                                "--output", str(tmp_path / "out")])
    saved = {**vars(args), "world_size": 1, "cwd": str(tmp_path / "a")}
    with pytest.raises(SystemExit):
        check_resume_flags(args, saved)
    assert f"--reward-model is rm, where the checkpoints' run had {tmp_path / 'a' / 'rm'}" in capsys.readouterr().err
    args.reward_model = args.critic_model = "../a/rm"  # the critic: a copy of the reward model, by default
    check_resume_flags(args, saved)  # no error


def test_zero_stage_0_overrides_the_configs_stage(work):
    args = train_py.parse_args(["--stage", "sft", "--model", ROOT, "--dataset", "x.jsonl", "--zero-stage", "0",
                                "--deepspeed_config", str(work / "zero3.json")])
    assert deepspeed_config(args, 1)["zero_optimization"]["stage"] == 0


def test_the_batch_keys_count_every_rank_and_zero_stage_defaults_to_0(tmp_path):
    """DeepSpeed's train_batch_size is the global batch: --batch-size x --grad-accum x ranks. A config without a ZeRO
    stage runs without ZeRO, as DeepSpeed would."""
    (tmp_path / "ds.json").write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    args = train_py.parse_args(["--stage", "sft", "--model", ROOT, "--dataset", "x.jsonl", "--batch-size", "2",
                                "--grad-accum", "3", "--deepspeed_config", str(tmp_path / "ds.json")])
    cfg = deepspeed_config(args, 4)
    assert [cfg[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")] == [
        2, 3, 24]
    assert cfg["zero_optimization"]["stage"] == 0


def test_a_deepspeed_chat_config_passes_the_config_checks(tmp_path):
    """The checks for keys DeepSpeed never reads and values it reads unchecked refuse none of a real config's:
    DeepSpeed-Chat's training config (its fp16 section disabled), monitors, a null steps_per_print."""
    cfg = {"steps_per_print": None, "gradient_clipping": 1.0, "prescale_gradients": False, "wall_clock_breakdown": False,
           "zero_optimization": {"stage": 3, "offload_param": {"device": "none"}, "offload_optimizer": {"device": "none"},
                                 "stage3_param_persistence_threshold": 1e4, "stage3_max_live_parameters": 3e7,
                                 "stage3_prefetch_bucket_size": 3e7, "memory_efficient_linear": False},
           "fp16": {"enabled": False}, "hybrid_engine": {"enabled": False, "max_out_tokens": 512},
           "tensorboard": {"enabled": False, "output_path": str(tmp_path), "job_name": "x"},
           "activation_checkpointing": {"partition_activations": False}, "flops_profiler": {"enabled": False},
           "communication_data_type": None, "zero_allow_untested_optimizer": True,
           "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}}}
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    args = train_py.parse_args(["--stage", "sft", "--model", ROOT, "--dataset", "x.jsonl", "--deepspeed_config",
                                str(tmp_path / "ds.json")])
    assert deepspeed_config(args, 1)["zero_optimization"]["stage"] == 3


def test_the_fewest_training_rows_are_one_batch_of_every_rank(tmp_path, monkeypatch, capsys):
    """Two ranks: 64 rows are one step of --batch-size 8 x --grad-accum 4 x 2 ranks, exactly; not one of
    --grad-accum 8."""
    from argparse import Namespace
    import minrlhf.inputs
    monkeypatch.setattr(minrlhf.inputs, "dist", Namespace(get_world_size=lambda: 2, get_rank=lambda: 0))
    rows = [{"prompt": f"{s} was", "response": " great"} for s in SUBJECTS] * 8
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = Namespace(dataset=str(tmp_path / "sft.jsonl"), stage="sft", max_length=64, eval_fraction=0.0, batch_size=8,
                     grad_accum=4)
    assert len(minrlhf.inputs.load_examples(args, make_tokenizer())[0]) == 64
    with pytest.raises(SystemExit):
        minrlhf.inputs.load_examples(Namespace(**{**vars(args), "grad_accum": 8}), make_tokenizer())
    assert re.search(r"sft\.jsonl: 64 usable training rows .*; need at least one batch of 128 \(--batch-size x "
                     r"--grad-accum x ranks\)", capsys.readouterr().err)


def test_several_ranks_without_zero_keep_deepspeeds_gradient_all_reduce(tmp_path, monkeypatch):
    """One rank at ZeRO stage 0 turns DeepSpeed's all-reduce of the gradients off (nothing to average); on two ranks
    it must stay on, or each rank would step on its own gradients and their weights drift apart."""
    import minrlhf.engine
    from argparse import Namespace
    train_py.init_distributed()
    args = train_py.parse_args(["--stage", "sft", "--model", ROOT, "--dataset", "x.jsonl"])
    cfg = deepspeed_config(args, 1)
    path = save_tiny("llama", tmp_path)
    assert not build_engine(minrlhf.load_causal_lm(path), cfg, 1, args.deepspeed_config).enable_backward_allreduce
    monkeypatch.setattr(minrlhf.engine, "dist", Namespace(get_world_size=lambda: 2))
    assert build_engine(minrlhf.load_causal_lm(path), cfg, 1, args.deepspeed_config).enable_backward_allreduce


def test_only_trainable_weights_reach_the_optimizer(tmp_path):
    """LoRA: Adam state (and bf16's fp32 master copies) for the adapters alone, not the frozen base."""
    model = minrlhf.load_causal_lm(save_tiny("llama", tmp_path))
    add_lora(model, 4, 8)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in param_groups(model)) == trainable < sum(p.numel() for p in model.parameters())


def test_evaluate_leaves_the_model_training(tmp_path):
    """transformers checkpoints activations only in training mode: after an evaluation, the run trains on."""
    from argparse import Namespace
    train_py.init_distributed()
    model = minrlhf.load_causal_lm(save_tiny("llama", tmp_path)).train()
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}] * 3
    stats = train_py.evaluate(model, rows, train_py.sft_loss, minrlhf.collate_sft,
                              Namespace(batch_size=2, stage="sft"), 0, "cpu")
    assert model.training and "eval/loss" in stats


def test_epochs_count_optimizer_steps_of_the_whole_batch(work):
    """--epochs 1 over N rows with micro-batches of 2 accumulated twice: N // 4 steps, the last one logged
    whatever --log-every says."""
    rows = sum(1 for _ in open(work / "pref.jsonl"))
    log = train(work, "--stage", "sft", "--epochs", 1, "--batch-size", 2, "--grad-accum", 2, "--eval-fraction", 0,
                "--log-every", 5, "--save-every", 0, output="epochs")
    assert [m["step"] for m in log] == [*range(5, rows // 4, 5), rows // 4]


ONLINE_PPO = ["--stage", "ppo", "--max-new-tokens", 8, "--rollout-batch-size", 16, "--batch-size", 8,
              "--temperature", 1.0, "--lr", 3e-3, "--lam", 0.95]
CRITIC_PPO = [*ONLINE_PPO, "--reward-model", "random_rm", "--critic-model", "random_rm"]


def test_ppo_critic_from_the_reward_model_learns(work):
    """--critic-model: a network of its own, with its own optimizer, saved in every checkpoint; its explained
    variance of the returns rises above 0.5."""
    learnable = ["--reward-fn", "rewards:prompt_length", "--critic-model", "random_rm",  # a score it can predict
                 "--value-lr", 3e-3]
    log = train(work, *ONLINE_PPO, *learnable, "--max-steps", 12, output="critic")
    variance = [m["ppo/val/explained_variance"] for m in log]
    assert max(variance[-4:]) > 0.5, variance
    assert os.path.isdir(work / "critic" / "checkpoints" / "step12" / "critic")
    assert not os.path.exists(work / "critic" / "value_head.pt")
    saved = AutoModelForSequenceClassification.from_pretrained(work / "critic" / "critic").state_dict()
    trained = checkpoint_weights(work / "critic" / "checkpoints" / "step12" / "critic")  # a reward model's again
    assert all(torch.equal(w, trained["reward_model." + k]) for k, w in saved.items())


@pytest.mark.parametrize("critic", [[], ["--critic-model", "random_rm"]])
def test_value_lr_is_the_value_functions_own(work, critic):
    """--value-lr: Adam moves each weight by about its lr per update, so after 4 updates at --lr 1e-6 the policy's
    weights moved < 1e-5, the value head's (or the separate critic's) by more than 1e-3 at --value-lr 1e-2."""
    out = "value_lr" + ("_critic" if critic else "")
    train(work, *PPO, "--lr", 1e-6, "--value-lr", 1e-2, "--max-steps", 1, *critic, output=out)
    ckpt = work / out / "checkpoints" / "step1"
    policy = checkpoint_weights(ckpt)
    base = AutoModelForCausalLM.from_pretrained(work / "model").state_dict()
    assert max((policy["backbone." + k] - w).abs().max() for k, w in base.items()) < 1e-5
    if critic:
        value = checkpoint_weights(ckpt / "critic")
        start = AutoModelForSequenceClassification.from_pretrained(work / "random_rm").state_dict()
        moved = max((value["reward_model." + k] - w).abs().max() for k, w in start.items())
    else:
        moved = policy["value_head.weight"].abs().max()  # from zero
    assert moved > 1e-3


def test_ppo_in_bf16_with_a_critic_and_a_reward_model(work):
    """--bf16 (the README's x4 runs): the frozen reference and reward model are loaded in bf16 as the policy
    is, the weights but not the buffers (RoPE's inv_freq stays float32), so before the first update the
    policy's log-probs are the reference's to the bit (KL exactly 0). Policy and critic train in bf16."""
    log = train(work, *CRITIC_PPO, "--max-steps", 2, "--bf16", output="ppo_bf16")
    assert log[0]["kl"] == 0.0
    assert all(math.isfinite(m["reward"]) and math.isfinite(m["ppo/loss/value"]) for m in log)
    step = work / "ppo_bf16" / "checkpoints" / "step2"
    for weights in (checkpoint_weights(step), checkpoint_weights(step / "critic")):
        assert {w.dtype for k, w in weights.items() if k.endswith("weight")} == {torch.bfloat16}
    AutoModelForCausalLM.from_pretrained(work / "ppo_bf16")
    AutoModelForSequenceClassification.from_pretrained(work / "ppo_bf16" / "critic")


def test_zero3_bf16_reference_is_cast_as_the_policy(work):
    """ZeRO-3 partitions the frozen reference in an engine of its own, loaded in bf16 as the policy: before the
    first update their log-probs agree to the bit (KL exactly 0), as without ZeRO."""
    log = train(work, *PPO, "--max-steps", 1, "--bf16", "--deepspeed_config", work / "zero3.json", output="z3_bf16")
    assert log[0]["kl"] == 0.0


def test_critic_resume_reproduces_the_uninterrupted_run(work):
    """With the adaptive KL coefficient, which the checkpoint carries; the critic from the reward model scores in
    the units of the normalised scores (`Critic.set_normalisation`), which the checkpoint carries too."""
    assert_resume_reproduces(work, [*CRITIC_PPO, "--target-kl", 0.01], "critic")
    step = work / "critic_whole" / "checkpoints" / "step4"
    norm = torch.load(step / "mp_rank_00_model_states.pt", weights_only=False)["reward_norm"]
    critic = checkpoint_weights(step / "critic")
    assert (critic["shift"].item(), critic["scale"].item()) == pytest.approx((norm["mean"], norm["std"]))
    assert norm["std"] != 1.0


def test_frozen_models_offload_under_zero3_with_offload(work):
    """--offload under ZeRO-3 puts the frozen models' weights (reference, reward model) on the CPU too, as the
    policy's; their outputs stay the model's. The config's other ZeRO settings hold for them too (here a
    persistence threshold: which weights every rank keeps whole), the optimizer's offload aside."""
    from minrlhf.engine import frozen
    train_py.init_distributed()
    ids = torch.tensor([[1, 2, 3]])
    offload = {"offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"},
               "stage3_param_persistence_threshold": 0}
    for zero in (offload, {}):
        model = AutoModelForCausalLM.from_pretrained(work / "model")
        expected = model(ids).logits
        cfg = {"zero_optimization": {"stage": 3, **zero}, "train_micro_batch_size_per_gpu": 1,
               "gradient_accumulation_steps": 1, "train_batch_size": 1}
        engine = frozen(model, cfg, torch.device("cpu"))
        assert (engine.zero_offload_param() is not None) == bool(zero)
        assert engine.zero_param_persistence_threshold() == (0 if zero else 1e5)
        torch.testing.assert_close(engine(ids).logits, expected)


def test_under_zero3_models_load_straight_into_partitions(tmp_path):
    """Within `partitioned_loading` under ZeRO-3 every weight is a partition from the start (no rank holds the
    whole model in float32 until deepspeed.initialize); a reward model's new head is drawn as without ZeRO (std
    1/sqrt(H+1), not a partition alone left at transformers' 0.02); LoRA wraps partitioned layers at their
    width. After it, models load whole again."""
    import deepspeed
    from minrlhf.engine import partitioned_loading, writable
    train_py.init_distributed()
    path = save_tiny("llama", tmp_path)
    cfg = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "train_batch_size": 1}
    torch.manual_seed(0)
    whole = minrlhf.load_reward_model(path, 0, whole=writable)
    torch.manual_seed(0)
    with partitioned_loading(cfg):
        rm, lm = minrlhf.load_reward_model(path, 0, whole=writable), minrlhf.load_causal_lm(path)
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in [*rm.parameters(), *lm.parameters()])
    with deepspeed.zero.GatheredParameters(list(rm.parameters())):
        assert all(torch.equal(a, b) for a, b in zip(rm.parameters(), whole.parameters()))
    assert add_lora(lm, 4, 8) == 14  # 2 layers x 7 projections
    assert lm.model.layers[0].mlp.down_proj.lora_A.shape == (4, lm.config.intermediate_size)
    assert not any(hasattr(p, "ds_id") for p in minrlhf.load_causal_lm(path).parameters())

def test_resume_with_more_steps_reschedules_the_critics_lr(work, monkeypatch):
    """--resume with a longer --max-steps: the separate critic's lr, as the policy's, is where the new schedule puts
    it at the checkpoint's step, not where the checkpoint's run left it (0, at its end). Unchanged, the schedule
    gives each lr the checkpoint holds: a resumed run reproduces the uninterrupted one without this."""
    from minrlhf.run import Run
    flags = [*CRITIC_PPO, "--save-every", 0]
    train(work, *flags, "--max-steps", 2, output="critic_longer")  # 2 iterations of 4 updates: its lr ends at 0
    resume, lrs = Run.resume, []

    def resume_and_look(run):  # each engine's lr once resumed, which the first update after the checkpoint uses
        done = resume(run)
        lrs.append((run.engine.get_lr(), run.critic.get_lr()))
        return done
    monkeypatch.setattr(Run, "resume", resume_and_look)
    log = train(work, *flags, "--max-steps", 4, "--resume", output="critic_longer")
    assert [m["step"] for m in log] == [1, 2, 3, 4]
    assert lrs == [(pytest.approx([3e-3 * (1 - 8 / 16)]), pytest.approx([1e-4 * (1 - 8 / 16)]))]  # --value-lr's


def test_zero3_generation_matches_plain(work):
    """ZeRO-3 partitions the weights; gathered for generation, it must sample the very same tokens (here with
    --offload: the policy's, the reference's and the reward model's weights on the CPU)."""
    plain = train(work, *PPO, "--max-steps", 1, output="z0")
    zero3 = train(work, *PPO, "--max-steps", 1, "--deepspeed_config", work / "zero3.json", "--offload", output="z3")
    for key in ("reward", "kl", "response_length"):  # same samples, same log-probs
        assert zero3[0][key] == pytest.approx(plain[0][key], rel=1e-4, abs=1e-5), key
    for key in ("ppo/loss/policy", "ppo/loss/value"):  # partitioned updates sum gradients in another order
        assert zero3[0][key] == pytest.approx(plain[0][key], rel=1e-2), key


@pytest.mark.parametrize("flags", [["--zero-stage", 1, "--bf16"], ["--zero-stage", 2, "--offload"],
                                   ["--zero-stage", 3, "--bf16", "--offload"]])
def test_sft_under_zero_bf16_and_offload(work, flags):
    name = "z" + "".join(map(str, flags)).replace("-", "")
    log = train(work, "--stage", "sft", "--max-steps", 6, "--lr", 1e-3, "--batch-size", 8, *flags, output=name)
    losses = [m["loss"] for m in log]  # each step lower: an optimizer that updated nothing would hold it
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.97 * losses[0]
    AutoModelForCausalLM.from_pretrained(work / name)
    states, = (work / name / "checkpoints" / "step6").glob("*model_states.pt")
    saved = torch.load(states, weights_only=False)
    dtypes = {t.dtype for t in saved["module"].values() if t.is_floating_point()}  # ZeRO-3: placeholders
    assert dtypes == ({torch.bfloat16} if "--bf16" in flags else {torch.float32})  # the engine's weights
    zero = saved["ds_config"]["zero_optimization"]  # the config the engine ran under
    assert zero["stage"] == flags[1]
    assert zero.get("offload_optimizer") == ({"device": "cpu"} if "--offload" in flags else None)
    assert zero.get("offload_param") == ({"device": "cpu"} if "--offload" in flags and flags[1] == 3 else None)


@pytest.mark.parametrize("stage", ["rm", "ppo", "dpo", "grpo", "critic"])  # rloo: grpo's loop, another advantage
def test_two_ranks_zero3(work, stage):
    pref = (work / "pref.jsonl").read_text().splitlines(keepends=True)
    (work / "pref_63.jsonl").write_text("".join(pref[:-1]))  # "the show was" 7 times: held out at 0.11
    flags = {"ppo": PPO + ["--epochs", 1, "--target-kl", 0.05],  # 64 prompts, 16 a rank: 2 iterations
             "grpo": ["--stage", "grpo", *GROUP, "--max-steps", 2],
             "critic": CRITIC_PPO + ["--max-steps", 2],
             # 7 held-out pairs: 3 a rank, the 7th on rank 0 (rank 1 reads one that weighs 0: ZeRO-3's forwards)
             "rm": ["--dataset", work / "pref_63.jsonl", "--stage", "rm", "--max-steps", 6, "--lr", 1e-3,
                    "--batch-size", 3, "--eval-fraction", 0.11],
             }.get(stage, ["--stage", stage, "--max-steps", 6, "--lr", 1e-3])
    log = train(work, *flags, "--deepspeed_config", work / "zero3.json", output=f"{stage}_2ranks",
                launcher=TWO_RANKS)
    steps = 2 if stage == "ppo" else flags[flags.index("--max-steps") + 1]
    assert [m["step"] for m in log] == list(range(1, steps + 1))  # every step, logged once: by rank 0 alone
    if stage == "ppo":  # the KL coefficient of the mean KL of all ranks' samples, the same on each rank
        step = work / "ppo_2ranks" / "checkpoints" / "step2"  # ZeRO-3: each rank saves its own client state
        coefs = [torch.load(step / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt", weights_only=False)["kl_coef"]
                 for r in (0, 1)]
        error = log[-1]["kl"] / 0.05 - 1  # not clipped: ranks whose KLs differ would adapt it differently
        assert abs(error) < 0.2 and coefs[0] == coefs[1] == pytest.approx(log[-1]["kl_coef"] * (1 + 0.1 * error))
    assert json.loads((work / f"{stage}_2ranks" / "args.json").read_text())["world_size"] == 2  # --resume checks it
    if stage == "rm":  # every held-out pair counts, as on one rank with the same global batch
        one = train(work, *flags[:-4], "--batch-size", 6, "--eval-fraction", 0.11, "--deepspeed_config",
                    work / "zero3.json", output="rm_1rank")
        assert log[-1]["eval/loss"] == pytest.approx(one[-1]["eval/loss"], rel=1e-4)
    loader = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
    loader.from_pretrained(work / f"{stage}_2ranks")


def test_resume_a_finished_run_then_train_longer(work, tmp_path):
    """Resumed for more steps, the run's step-4 final model is no longer its model: while the run trains, the
    folder holds no config.json, so that a run cut short leaves no step-4 model for the next stage to take."""
    from argparse import Namespace
    from types import SimpleNamespace
    from minrlhf.run import Run
    flags = ["--stage", "sft", "--lr", 1e-3, "--save-every", 2]
    done = train(work, *flags, "--max-steps", 4, output="longer")
    assert train(work, *flags, "--max-steps", 4, "--resume", output="longer") == done  # nothing to do, nothing lost
    shutil.copytree(work / "longer", tmp_path / "longer")  # what Run does as it starts, on a copy
    saved = json.loads((tmp_path / "longer" / "args.json").read_text())
    args = Namespace(output=str(tmp_path / "longer"), resume=True, dataset=saved["dataset"],
                     deepspeed_config=saved["deepspeed_config"])
    train_py.init_distributed()
    for start, kept in ((4, True), (3, False)):  # 4 of 4: the final model is this run's; 3 of 4: trains again
        Run.open_metrics(SimpleNamespace(args=args, start=start, total=4)).close()
        assert (tmp_path / "longer" / "config.json").exists() == kept
    assert (tmp_path / "longer" / "model.safetensors").exists()
    log = train(work, *flags, "--max-steps", 8, "--resume", output="longer")
    assert [m["lr"] for m in log[4:6]] == pytest.approx([1e-3 * (1 - 4 / 8), 1e-3 * (1 - 5 / 8)])  # the new schedule


def test_resume_refuses_a_model_trained_again_in_its_folder(work):
    """--resume loads --model (the reference's source), --ref-model, --reward-model and the critic's start from
    their folders anew, as the checkpoint holds only what trains: one trained again there since (its files' sizes
    or times) is another model, refused; the same files resume."""
    shutil.copytree(work / "model", work / "retrained")
    flags = ["--stage", "sft", "--model", work / "retrained", "--save-every", 1]
    train(work, *flags, "--max-steps", 2, output="fingerprinted")
    weights = work / "retrained" / "model.safetensors"
    stat = os.stat(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # written again, the same size
    error = resume_fails(work, "fingerprinted", *flags, "--max-steps", 3)
    assert re.search(r"--resume: --model .*retrained has changed since the checkpoints' run read it \(its files' "
                     r"sizes or times\)", error)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert [m["step"] for m in train(work, *flags, "--max-steps", 3, "--resume", output="fingerprinted")] == [1, 2, 3]


def resume_fails(work, output, *flags):
    """A --resume that must fail: -> its stderr (one error line)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", work / "model", "--dataset", work / "pref.jsonl",
           "--output", work / output, "--stage", "sft", "--resume", *flags]
    proc = subprocess.run(list(map(str, cmd)), cwd=work, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr.strip()


@pytest.mark.parametrize("flags", [["--zero-stage", 2, "--bf16"], ["--zero-stage", 3, "--deepspeed_config", "zero3.json",
                                                                    "--offload"]], ids=["zero2-bf16", "zero3-offload"])
def test_resume_under_zero_reproduces_the_uninterrupted_run(work, flags):
    """DeepSpeed's partitioned optimizer state (ZeRO-2, bf16 with fp32 master weights; ZeRO-3 with the weights and
    Adam on the CPU) saved and loaded: the resumed run gives the uninterrupted one's metrics, bit for bit."""
    assert_resume_reproduces(work, ["--stage", "sft", "--lr", 1e-3, "--batch-size", 4, *flags], f"resume_z{flags[1]}")


def test_bf16_without_zero_trains_as_under_zero(work):
    """DeepSpeed's bf16 optimizer without ZeRO steps AdamW once on zero gradients as it starts; with that step
    counted, the first updates were 0.73x, 0.85x, ... those of ZeRO 1-3 (Adam's bias correction)."""
    flags = ["--stage", "sft", "--lr", 1e-3, "--max-steps", 3, "--bf16", "--save-every", 0]
    zero0, zero1 = (train(work, *flags, "--zero-stage", z, output=f"bf16_z{z}") for z in (0, 1))
    assert [row["loss"] for row in zero0] == pytest.approx([row["loss"] for row in zero1], rel=1e-3)


def test_resume_refuses_an_edited_deepspeed_config(work):
    """The file --deepspeed_config names, edited between the run and its --resume (here its gradient clipping,
    which would change every later update): one line, not a resumed run that differs from the uninterrupted one."""
    config = work / "edited_ds.json"
    config.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}, "gradient_clipping": 1.0}))
    train(work, "--stage", "sft", "--max-steps", 2, "--deepspeed_config", config, output="edited_ds")
    config.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}, "gradient_clipping": 0.1}))
    assert resume_fails(work, "edited_ds", "--max-steps", 4, "--deepspeed_config", config).endswith(
        f"error: --resume: --deepspeed_config {config} differs from the file the checkpoints' run read (kept in its "
        f"args.json); only how long it runs, logs and saves may change")


def test_resume_refuses_fewer_steps_and_a_damaged_checkpoint(work):
    train(work, "--stage", "sft", "--max-steps", 4, "--save-every", 2, output="damaged")
    assert resume_fails(work, "damaged", "--max-steps", 3).endswith(
        "error: --resume: the checkpoint is at step 4, past this run's last step 3 (--max-steps or --epochs)")
    os.remove(work / "damaged" / "checkpoints" / "step4" / "rng_rank0.pt")
    assert re.search(r"error: --resume: cannot load .*step4 \(FileNotFoundError: .*\); remove it to "
                                   r"resume from step2$", resume_fails(work, "damaged", "--max-steps", 4))
    shutil.rmtree(work / "damaged" / "checkpoints" / "step4")  # emptied: DeepSpeed's assert, without a message
    os.mkdir(work / "damaged" / "checkpoints" / "step4")
    assert re.search(r"error: --resume: cannot load .*step4 \(AssertionError\(\)\); remove it",
                     resume_fails(work, "damaged", "--max-steps", 4))
    shutil.rmtree(work / "damaged" / "checkpoints" / "step2")  # no checkpoint before it: removing it loses the run
    assert resume_fails(work, "damaged", "--max-steps", 4).endswith(
        "; it is the run's only checkpoint: start the run again in another --output")


def test_resume_reads_the_same_deepspeed_config_from_another_path(work):
    """A moved checkout (the default --deepspeed_config is an absolute path) or a copy of the file: what counts
    is its contents, kept in args.json."""
    for name in ("ds_here.json", "ds_moved.json"):
        (work / name).write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    train(work, "--stage", "sft", "--max-steps", 2, "--deepspeed_config", work / "ds_here.json", output="moved")
    log = train(work, "--stage", "sft", "--max-steps", 3, "--deepspeed_config", work / "ds_moved.json", "--resume",
                output="moved")
    assert [row["step"] for row in log] == [1, 2, 3]


@pytest.mark.parametrize("what", ["checkpoint", "final", "first", "metrics"])
def test_a_full_disk_is_one_line_and_keeps_the_checkpoints_before(work, what):
    """The disk fills at step 3's checkpoint (after those of steps 1 and 2; "first": the run's only one, at its
    end), at metrics.jsonl's line of step 3, or at the final model: safetensors' own error, after config.json
    was written, which the output must not show (the next stage would take the folder for a model)."""
    cmd = [sys.executable, work / "disk_full.py", os.path.join(ROOT, "train.py"), "--model", work / "model",
           "--dataset", work / "pref.jsonl", "--output", work / f"full_{what}", "--stage", "sft",
           *(["--max-steps", 3, "--save-every", 0] if what == "first" else ["--max-steps", 4, "--save-every", 1]),
           "--keep-checkpoints", 5]
    proc = subprocess.run(list(map(str, cmd)), cwd=work, env=ENV | {"FULL_AT": what.replace("first", "checkpoint")},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = {"checkpoint": "cannot write checkpoints there ([Errno 28] No space left on device); the newest complete "
                          "one is whole",
            "first": "cannot write checkpoints there ([Errno 28] No space left on device); no complete one yet",
            "final": "cannot write the final model (Error while serializing: I/O error: File too large (os error 27)); "
                     "its last checkpoint holds it, and --resume writes it",
            "metrics": "cannot write metrics.jsonl there ([Errno 28] No space left on device); --resume goes on from "
                       "the newest complete checkpoint"}[what]
    assert f"error: --output {work / f'full_{what}'}: {line}\n" in proc.stderr, proc.stderr[-2000:]
    kept = {"checkpoint": ["step1", "step2", "step3.tmp"], "first": ["step3.tmp"],
            "final": ["step1", "step2", "step3", "step4"], "metrics": ["step1", "step2"]}[what]
    assert sorted(os.listdir(work / f"full_{what}" / "checkpoints")) == kept
    assert not (work / f"full_{what}" / "config.json").exists()
    if what == "final":  # as the line says: --resume writes it, from the last checkpoint
        train(work, "--stage", "sft", "--max-steps", 4, "--save-every", 1, "--keep-checkpoints", 5, "--resume",
              output="full_final")
        AutoModelForCausalLM.from_pretrained(work / "full_final")
        assert not (work / "full_final" / "final.tmp").exists()


def test_a_write_or_load_error_on_one_rank_is_that_ranks_line_first(work):
    """One rank alone meets a full disk (rank 1 at step 3's checkpoint, rank 0 at the final model) or a damaged
    checkpoint (rank 1's ZeRO-3 shard gone): its own line comes first, and no rank hangs in DeepSpeed's
    collectives or prints a traceback; the other rank adds at most a line that it stops too."""
    def launch(output, *flags, **env):
        cmd = [DEEPSPEED, "--num_gpus", "2", work / "disk_full.py", os.path.join(ROOT, "train.py"), "--model",
               work / "model", "--dataset", work / "pref.jsonl", "--output", work / output, "--stage", "sft",
               "--deepspeed_config", work / "zero3.json", "--save-every", 1, "--keep-checkpoints", 5, *flags]
        proc = subprocess.run(list(map(str, cmd)), cwd=work, env=ENV | env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = re.findall(r"error: .*", proc.stderr)  # after a progress bar, maybe, on the same line
        assert all(e.endswith(": another rank ended (its line, if it printed one, says why); this one stops too")
                   for e in errors[1:]), errors
        return errors
    errors = launch("rank1_disk", "--max-steps", 4, FULL_AT="checkpoint", FULL_RANK="1")
    assert errors[0] == (f"error: rank 1: --output {work / 'rank1_disk'}: cannot write checkpoints there ([Errno 28] "
                         f"No space left on device); the newest complete one is whole"), errors
    saved = sorted(n for n in os.listdir(work / "rank1_disk" / "checkpoints") if n.startswith("step"))
    assert saved == ["step1", "step2", "step3.tmp"]
    next((work / "rank1_disk" / "checkpoints" / "step2").glob("zero_pp_rank_1_*optim_states.pt")).unlink()
    errors = launch("rank1_disk", "--max-steps", 4, "--resume")
    assert re.fullmatch(r"error: rank 1: --resume: cannot load .*step2 \(FileNotFoundError: .*zero_pp_rank_1_.*\); "
                        r"remove it to resume from step1", errors[0]), errors
    errors = launch("rank0_disk", "--max-steps", 2, FULL_AT="final", FULL_RANK="0")
    assert errors == [f"error: rank 0: --output {work / 'rank0_disk'}: cannot write the final model (Error while "
                      f"serializing: I/O error: File too large (os error 27)); its last checkpoint holds it, and --resume "
                      f"writes it"], errors


def test_a_reference_and_a_critic_are_resized_by_their_own_tokenizers(work):
    """A base whose tokenizer has no pad token gets '<|pad|>' and one more embedding row when train.py loads it;
    a policy saved by an earlier stage has both already. Either may be the other's reference, or its critic."""
    nopad = save_tiny("llama", work / "nopad", pad=False)
    tokenizer = AutoTokenizer.from_pretrained(nopad)
    assert minrlhf.ensure_pad_token(tokenizer)  # added: the base's 400 rows are one short
    padded = minrlhf.load_causal_lm(nopad)
    padded.resize_token_embeddings(len(tokenizer))
    padded.save_pretrained(work / "nopad_sft")
    tokenizer.save_pretrained(work / "nopad_sft")
    minrlhf.load_reward_model(nopad, None).save_pretrained(work / "nopad_rm")  # its tokenizer: no pad token
    AutoTokenizer.from_pretrained(nopad).save_pretrained(work / "nopad_rm")
    for policy, other in ((work / "nopad_sft", nopad), (nopad, work / "nopad_sft")):
        log = train(work, "--stage", "dpo", "--model", policy, "--ref-model", other, "--max-steps", 1,
                    output=f"ref_{os.path.basename(policy)}")
        assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # a reference equal to the policy
    train(work, *PPO, "--model", work / "nopad_sft", "--critic-model", work / "nopad_rm", "--max-steps", 1,
          output="critic_nopad")


def test_a_critic_saved_by_ppo_keeps_its_values_scale(tmp_path, capsys):
    """--critic-model OUTPUT/critic of an earlier PPO run: its values are in the units of that run's normalised
    scores, by the mean and std saved beside it (CRITIC_NORMALISATION), not raw reward-model scores."""
    from argparse import Namespace
    from minrlhf.inputs import load_critic
    from minrlhf.run import CRITIC_NORMALISATION
    path, tokenizer = save_tiny("llama", tmp_path / "model"), make_tokenizer()
    minrlhf.load_reward_model(path, tokenizer.pad_token_id).save_pretrained(tmp_path / "critic")
    tokenizer.save_pretrained(tmp_path / "critic")
    torch.save({"mean": 2.0, "std": 4.0}, tmp_path / "critic" / CRITIC_NORMALISATION)
    args = Namespace(critic_model=str(tmp_path / "critic"), longest=8, lora_rank=0, lora_alpha=None,
                     lora_targets="all-linear", gradient_checkpointing=False, bf16=False)
    critic = load_critic(args, tokenizer, minrlhf.load_causal_lm(path))
    assert (critic.shift.item(), critic.scale.item()) == (2.0, 4.0)
    (tmp_path / "critic" / CRITIC_NORMALISATION).write_bytes(b"")  # cut short: one line, not EOFError's traceback
    with pytest.raises(SystemExit):
        load_critic(args, tokenizer, minrlhf.load_causal_lm(path))
    assert re.search(r"--critic-model .*critic: value_normalisation\.pt is unreadable \(EOFError", capsys.readouterr().err)


def test_a_signal_on_the_last_step_still_saves_the_model(work):
    train(work, *PPO, "--max-steps", 3, "--save-every", 0, "--reward-fn", "rewards:interrupt_on_third_call",
          output="last_signal")
    assert (work / "last_signal" / "config.json").exists()


def test_a_signal_to_one_rank_stops_every_rank_with_one_checkpoint(work):
    """SIGTERM to rank 1 alone, in iteration 2 of 4: every rank finishes that step, they checkpoint it together
    and exit 0, without a final model (the other rank, going on alone, would wait in a collective for ever)."""
    cmd = [*TWO_RANKS, os.path.join(ROOT, "train.py"), "--model", work / "model", "--dataset", work / "pref.jsonl",
           "--output", work / "rank1_sigterm", *PPO, "--max-steps", 4, "--save-every", 0, "--reward-fn",
           "rewards:terminated_on_rank1"]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=work, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    finally:  # the launcher and both ranks, should one hang
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    assert [m["step"] for m in metrics(work / "rank1_sigterm")] == [1, 2]
    assert os.listdir(work / "rank1_sigterm" / "checkpoints") == ["step2"]
    assert not (work / "rank1_sigterm" / "config.json").exists()


def test_ctrl_c_while_loading_exits_quietly(work):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", work / "model", "--dataset", work / "pref.jsonl",
           "--output", work / "ctrl_c", *PPO, "--reward-fn", "interrupt:f"]
    proc = subprocess.run(list(map(str, cmd)), cwd=work, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("delay", [0.1, 0.5, 1.0])
def test_ctrl_c_while_importing_exits_quietly(tmp_path, delay):
    """Within a second train.py is still importing torch and the rest (seconds): the system ends it on SIGINT,
    as a shell's Ctrl-C does (status -2; 130 to the shell), without a traceback. Were the signal missed, the
    run would stop at once on its missing model (status 2)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--stage", "sft", "--model",
                             str(tmp_path / "no_model"), "--output", str(tmp_path / "out")], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGINT and stderr == "", (proc.returncode, stderr[-2000:])


def test_a_gold_judge_that_draws_random_numbers_changes_no_training(work):
    plain = train(work, *PPO, "--max-steps", 1, output="judge_none")
    judged = train(work, *PPO, "--max-steps", 1, "--gold-fn", "rewards:random_judge", output="judge_random")
    assert [{k: v for k, v in m.items() if k != "gold"} for m in measured(judged)] == measured(plain)


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(work):
    flags = [*PPO, "--max-steps", 8, "--save-every", 1, "--keep-checkpoints", 3]
    whole = train(work, *flags, output="whole")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", str(work / "model"), "--dataset",
           str(work / "pref.jsonl"), "--output", str(work / "cut"), *map(str, flags)]
    proc = subprocess.Popen(cmd, cwd=work, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (work / "cut" / "checkpoints" / "step3").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "cut" / "checkpoints" / "step8").exists(), "the run ended before it could be killed"
    resumed = train(work, *flags, "--resume", output="cut")
    assert [m["step"] for m in resumed] == list(range(1, 9))
    assert measured(whole) == measured(resumed)  # bit for bit: weights, optimizer, scheduler, RNG, data position
    rng = torch.load(work / "cut" / "checkpoints" / "step8" / "rng_rank0.pt", weights_only=False)
    assert set(rng) == {"torch", "numpy", "python", "accelerator"}  # the accelerator's: a GPU's own generator


@pytest.mark.parametrize("flags", [["--stage", "sft", "--lr", 1e-2], PPO], ids=["sft", "ppo"])
def test_same_seed_same_metrics(work, flags):
    """As a process and in this process (as `train` runs one rank): the same numbers."""
    stage = flags[1]
    first = train(work, *flags, "--max-steps", 5, output=f"det1_{stage}", launcher=[sys.executable])
    again = train(work, *flags, "--max-steps", 5, output=f"det2_{stage}")
    assert measured(first) == measured(again)


def test_sigint_checkpoints_and_exits_cleanly(work):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", str(work / "model"), "--dataset",
           str(work / "pref.jsonl"), "--output", str(work / "sigint"), *map(str, PPO), "--max-steps", 50,
           "--save-every", 0]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=work, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while not (work / "sigint" / "metrics.jsonl").exists() or not metrics(work / "sigint"):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-2000:]
    steps = [m["step"] for m in metrics(work / "sigint")]
    assert os.listdir(work / "sigint" / "checkpoints") == [f"step{steps[-1]}"] and steps[-1] < 50
    resumed = train(work, *PPO, "--max-steps", 50, "--save-every", 0, "--resume", "--ppo-epochs", 2, output="sigint")
    assert [m["step"] for m in resumed] == list(range(1, 51))


def test_divergence_stops_before_a_nan_checkpoint(work):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", str(work / "model"), "--dataset",
           str(work / "pref.jsonl"), "--output", str(work / "nan"), "--stage", "sft", "--max-steps", 30,
           "--lr", 30, "--save-every", 1, "--keep-checkpoints", 100]
    proc = subprocess.run(list(map(str, cmd)), cwd=work, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert re.search(r"error: step (\d+): non-finite (\S*loss|gradient|weights)", proc.stderr), proc.stderr[-2000:]
    assert os.listdir(work / "nan" / "checkpoints")  # it ran a little before diverging
    for ckpt in os.listdir(work / "nan" / "checkpoints"):
        state = checkpoint_weights(work / "nan" / "checkpoints" / ckpt)
        assert all(torch.isfinite(t).all() for t in state.values()), ckpt


def test_non_finite_weights_after_finite_stats_stop_before_a_checkpoint(work, capsys):
    """An lr past float32's range: step 1's loss and gradient are finite, the update it makes is not. The
    weights are checked before the checkpoint, which is not written (no held-out set: its loss would be inf)."""
    argv = ["--model", str(work / "model"), "--dataset", str(work / "pref.jsonl"), "--output", str(work / "inf_weights"),
            "--stage", "sft", "--max-steps", 2, "--save-every", 1, "--lr", 1e39, "--eval-fraction", 0]
    with pytest.raises(SystemExit) as exit_info:
        in_process(work, list(map(str, argv)))
    assert exit_info.value.code == 2
    assert "error: step 1: non-finite weights after the update; stopped without writing a checkpoint" in (
        capsys.readouterr().err)
    assert [m["step"] for m in metrics(work / "inf_weights")] == [1]  # its stats were finite, and logged
    assert not checkpoints(str(work / "inf_weights"))


def test_a_failed_rewrite_leaves_the_old_file_whole(tmp_path):
    """args.json and metrics.jsonl (cut back on --resume) are rewritten whole or not at all: a write that fails
    midway, here on text that cannot be encoded, as on a full disk, leaves the file as it was."""
    path = str(tmp_path / "metrics.jsonl")
    write_atomically(path, '{"step": 1}\n')
    with pytest.raises(UnicodeEncodeError):
        write_atomically(path, '{"step": 1}\n{"step": "\ud800"}\n')
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no metrics.jsonl.tmp left
    write_atomically(path, '{"step": 2}\n')
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 2}\n'


def test_synced_flushes_every_file_and_folder_below(tmp_path, monkeypatch):
    """Checkpoints, the final model and args.json are fsync'd before they are renamed complete (a crash of the
    machine could otherwise leave the new name on files whose data never reached the disk)."""
    from minrlhf.cli import synced
    (tmp_path / "step3.tmp" / "critic").mkdir(parents=True)
    for name in ("step3.tmp/model.pt", "step3.tmp/critic/model.pt"):
        (tmp_path / name).write_text("weights")
    flushed = []
    monkeypatch.setattr(os, "fsync", lambda fd: flushed.append(os.readlink(f"/proc/self/fd/{fd}")))
    assert synced(str(tmp_path / "step3.tmp"), below=True) == str(tmp_path / "step3.tmp")
    assert sorted(os.path.relpath(p, tmp_path) for p in flushed) == [
        "step3.tmp", "step3.tmp/critic", "step3.tmp/critic/model.pt", "step3.tmp/model.pt"]
    flushed.clear()
    synced(str(tmp_path))  # a folder alone: its entries (a rename in it), not what is below
    assert flushed == [str(tmp_path)]


def test_an_old_checkpoint_that_cannot_be_removed_is_a_note(tmp_path, monkeypatch, capsys):
    """--keep-checkpoints: each old checkpoint is renamed before it is removed, so one removed halfway is no
    checkpoint for --resume; one that cannot be removed is named in a note, and the run goes on."""
    from types import SimpleNamespace
    import minrlhf.run
    for step in (1, 2, 3):
        (tmp_path / "checkpoints" / f"step{step}").mkdir(parents=True)
    calls, remove = [], shutil.rmtree

    def rmtree(path):  # the first removal fails
        calls.append(path)
        if len(calls) == 1:
            raise OSError(f"cannot remove {path}")
        remove(path)
    monkeypatch.setattr(minrlhf.run.shutil, "rmtree", rmtree)
    run = SimpleNamespace(args=SimpleNamespace(output=str(tmp_path), keep_checkpoints=1))
    minrlhf.run.Run.remove_old_checkpoints(run)
    assert [os.path.basename(p) for p in checkpoints(str(tmp_path))] == ["step3"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step1.old", "step3"]
    assert re.search(r"note: --output .*: cannot remove the old checkpoint .*step1 \(cannot remove", capsys.readouterr().err)


def test_nan_gradient_stops_the_run_naming_it(work):
    cmd = [sys.executable, work / "nan_gradient.py", os.path.join(ROOT, "train.py"), "--model", work / "model",
           "--dataset", work / "pref.jsonl", "--output", work / "nan_grad", "--stage", "sft", "--max-steps", 4]
    proc = subprocess.run(list(map(str, cmd)), cwd=work, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "error: step 2: non-finite gradient;" in proc.stderr, proc.stderr[-2000:]
    assert not (work / "nan_grad" / "checkpoints").exists()


@pytest.mark.parametrize("flags", [[], ["--zero-stage", 2], ["--zero-stage", 3], ["--bf16"]])
def test_skip_nonfinite_skips_a_nan_gradient_and_counts_it(work, flags):
    out = "skip" + "".join(map(str, flags)).replace("-", "")
    log = train(work, "--stage", "sft", "--max-steps", 4, "--lr", 1e-3, "--skip-nonfinite", *flags, output=out,
                launcher=[sys.executable, work / "nan_gradient.py"])
    assert [m["skipped_steps"] for m in log] == [0, 1, 1, 1]
    assert log[2]["lr"] == log[1]["lr"] < log[0]["lr"]  # step 2 did not advance the schedule either
    model = AutoModelForCausalLM.from_pretrained(work / out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_nonfinite_step_drops_an_inf_gradient_and_moves_no_weight():
    """The fp32 optimizer's pre-hook: an inf gradient, as a NaN, skips the update. The gradients are dropped, not
    zeroed: AdamW's momentum would move a weight on a zero gradient."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, weight_decay=0.0)
    weight.grad = torch.ones(3)
    optimizer.step()  # some momentum
    optimizer.register_step_pre_hook(skip_nonfinite_step)
    before = weight.detach().clone()
    weight.grad = torch.tensor([0.0, float("inf"), 0.0])
    optimizer.step()
    assert optimizer.overflow and weight.grad is None and torch.equal(weight, before)
    weight.grad = torch.ones(3)
    optimizer.step()
    assert not optimizer.overflow and not torch.equal(weight, before)


def test_skip_nonfinite_skips_a_nan_reward(work):
    log = train(work, *PPO, "--max-steps", 3, "--skip-nonfinite", "--reward-fn", "rewards:nan_on_second_call",
                output="skip_ppo")
    updates = 2 * 16 // 8  # --ppo-epochs x --rollout-batch-size / --batch-size
    assert [m["skipped_steps"] for m in log] == [0, updates, updates]
    assert "reward" in log[0] and "reward" not in log[1] and "reward" in log[2]


def test_a_reward_error_on_one_rank_stops_every_rank_with_its_message(work):
    """The failing rank prints its line; the other does not wait in a collective for it, nor print a traceback."""
    cmd = [DEEPSPEED, "--num_gpus", "2", os.path.join(ROOT, "train.py"), "--model", work / "model", "--dataset",
           work / "pref.jsonl", "--output", work / "rank1", *PPO, "--max-steps", 3, "--reward-fn", "rewards:fail_on_rank1"]
    proc = subprocess.run(list(map(str, cmd)), cwd=work, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: rank 1: --reward-fn rewards:fail_on_rank1 raised RuntimeError: rank one is broken" in proc.stderr
    assert "Traceback" not in proc.stderr and "error: rank 0" not in proc.stderr, proc.stderr[-3000:]


def test_a_rank_killed_mid_run_ends_the_others_with_one_line_at_most(work):
    """The killed rank prints nothing; the other's next collective cannot reach it: that rank says it stops
    too (unless the launcher has stopped it first), without a traceback."""
    cmd = [DEEPSPEED, "--num_gpus", "2", os.path.join(ROOT, "train.py"), "--model", work / "model", "--dataset",
           work / "pref.jsonl", "--output", work / "killed", *PPO, "--max-steps", 3, "--reward-fn", "rewards:killed_on_rank1"]
    proc = subprocess.run(list(map(str, cmd)), cwd=work, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert set(re.findall(r"error: .*", proc.stderr)) <= {  # rank 0's, without a prefix
        "error: another rank ended (its line, if it printed one, says why); this one stops too"}, proc.stderr[-3000:]


def test_a_reward_model_reads_re_encoded_text_within_its_positions(work):
    """Sampled tokens, decoded and encoded again for the reward model, may come out longer: with prompt and
    response filling GPT-2's 32 learned positions, the reward model keeps the last 32 (past them: an IndexError)."""
    save_tiny("gpt2", work / "gpt2_32", config={"n_positions": 32})
    minrlhf.load_reward_model(str(work / "gpt2_32"), make_tokenizer().pad_token_id).save_pretrained(work / "gpt2_32_rm")
    make_tokenizer().save_pretrained(work / "gpt2_32_rm")
    prompt = "the film was great and the food was great and"
    P = len(make_tokenizer()(prompt)["input_ids"])
    assert P < 32  # with --max-new-tokens 32 - P the run's sequences fit: the check before training passes
    (work / "prompts_32.jsonl").write_text((json.dumps({"prompt": prompt}) + "\n") * 2)
    log = train(work, "--stage", "ppo", "--model", work / "gpt2_32", "--reward-model", work / "gpt2_32_rm",
                "--critic-model", "head", "--dataset", work / "prompts_32.jsonl", "--max-new-tokens", 32 - P,
                "--rollout-batch-size", 2, "--batch-size", 1, "--temperature", 1.0, "--max-steps", 2, output="reencode")
    assert len(log) == 2


def test_reward_norm_far_from_zero():
    """The scores' normalisation makes PPO blind to an affine change of the reward, also one far from 0 (float32
    E[s^2] - E[s]^2 gave scores + 1e4 a std of 1e-6)."""
    from argparse import Namespace
    train_py.init_distributed()
    args = Namespace(reward_norm=True, missing_eos_penalty=0.0)
    scores, ended = torch.tensor([0.5, 2.0, 1.25, 0.0, 3.0, 1.0, 0.75, 2.5]), torch.ones(8, dtype=torch.bool)
    shaped = train_py.normalised_scores(scores, ended, {}, args)
    torch.testing.assert_close(train_py.normalised_scores(scores + 1e4, ended, {}, args), shaped)
    torch.testing.assert_close(shaped, (scores - scores.mean()) / scores.std(unbiased=False))


TWO_ROLLOUTS = [  # rank 0's and rank 1's (B = 2, R = 3): ranks whose own scores tie, [0, 0] and [1, 1]
    {"scores": [0.0, 0.0], "mask": [[1, 1, 0], [1, 0, 0]], "values": [[0.5, 1.0, 0.0], [2.0, 9.0, 9.0]],
     "returns": [[1.0, 2.0, 0.5], [3.0, 9.0, 9.0]], "advantages": [0.3, -1.0]},
    {"scores": [1.0, 1.0], "mask": [[1, 1, 0], [1, 1, 1]], "values": [[-1.0, 0.0, 9.0], [0.0, 1.5, 2.0]],
     "returns": [[-2.0, 1.0, 9.0], [0.5, 1.0, 4.0]], "advantages": [2.0, 0.1]},
]


def rollout_of(columns):
    """A rollout of TWO_ROLLOUTS' columns -> its scores, and its stats as PPO (a critic) and GRPO (groups of 2)
    log them."""
    scores, mask, values, returns, advantages = (torch.tensor(columns[k]) for k in TWO_ROLLOUTS[0])
    exp = {"mask": mask, "logprobs": torch.zeros(mask.shape), "ref_logprobs": torch.zeros(mask.shape)}
    ppo = train_py.rollout_stats({**exp, "values": values, "returns": returns}, scores, scores, 0.1, 1)
    grpo = train_py.rollout_stats({**exp, "advantages": advantages[:, None].expand(mask.shape)}, scores, scores, 0.1,
                                  2)
    return scores, ppo, grpo


ACROSS_RANKS = """import json, sys, torch, torch.distributed as dist
from argparse import Namespace
sys.path.insert(0, sys.argv[3]); sys.path.insert(0, sys.argv[3] + "/tests")
import test_train
rank = int(sys.argv[2])
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=rank, world_size=2)
scores, ppo, grpo = test_train.rollout_of(test_train.TWO_ROLLOUTS[rank])
norm = {}
shaped = test_train.train_py.normalised_scores(scores, torch.ones(2, dtype=torch.bool), norm,
                                               Namespace(reward_norm=True, missing_eos_penalty=0.0))
print(json.dumps([norm, shaped.tolist(), ppo, grpo]))
"""


def test_rollout_statistics_of_all_ranks_together(tmp_path):
    """On N ranks, the reward normalisation and the logged stats that are not means of equal parts (the critic's
    explained variance, the returns' token mean, the advantages' std) are of every rank's rollout together: on 2
    ranks what one rank computes from both rollouts. Ranks whose own scores tie, [0, 0] and [1, 1], have spread 1
    and std 0.5 together."""
    train_py.init_distributed()  # a world of one, for the expected numbers
    _, ppo, grpo = rollout_of({k: TWO_ROLLOUTS[0][k] + TWO_ROLLOUTS[1][k] for k in TWO_ROLLOUTS[0]})
    procs = [subprocess.Popen([sys.executable, "-c", ACROSS_RANKS, str(tmp_path / "rendezvous"), str(rank), ROOT],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for rank in (0, 1)]
    try:
        outs = [proc.communicate(timeout=300) for proc in procs]
    finally:  # one rank failed: the other would wait for it
        for proc in procs:
            proc.kill()
    logged = [json.loads(out.splitlines()[-1]) for out, _ in outs]  # after a banner
    assert [norm for norm, *_ in logged] == [{"mean": 0.5, "std": 0.5}] * 2, outs[0][1][-2000:]
    assert [shaped for _, shaped, *_ in logged] == [[-1.0, -1.0], [1.0, 1.0]]
    for rank_ppo, rank_grpo in (entry[2:] for entry in logged):
        for key in ("ppo/val/explained_variance", "ppo/returns/mean"):
            assert rank_ppo[key] == pytest.approx(ppo[key]), key
        assert rank_grpo["advantage_std"] == pytest.approx(grpo["advantage_std"])
    each = [rollout_of(columns)[1:] for columns in TWO_ROLLOUTS]  # what each rank's own rollout gives
    for key in ("ppo/val/explained_variance", "ppo/returns/mean"):  # not the mean of each rank's
        assert abs(ppo[key] - (each[0][0][key] + each[1][0][key]) / 2) > 0.05, key
    assert abs(grpo["advantage_std"] - (each[0][1]["advantage_std"] + each[1][1]["advantage_std"]) / 2) > 0.05


def test_no_reward_norm_ignores_statistics_from_a_resumed_checkpoint():
    args = train_py.parse_args(["--stage", "ppo", "--model", "m", "--dataset", "d.jsonl", "--reward-fn", "x:y",
                             "--no-reward-norm"])
    scores = torch.tensor([1.0, 3.0])
    norm = {"mean": 2.0, "std": 0.5}  # as restored from a run that normalised
    assert torch.equal(train_py.normalised_scores(scores, torch.tensor([True, True]), norm, args), scores)


def test_an_sft_step_is_a_token_level_mean_over_micro_batches_and_ranks(work):
    """--batch-size 1 x --grad-accum 2 on each of 2 ranks takes the step --batch-size 4 takes on one: every
    label token weighs alike, however the rows (of unlike lengths) are split."""
    rows = [{"prompt": f"{s} was", "response": " great" + " and I loved it, the food was great" * (i % 4)}
            for i, s in enumerate(SUBJECTS * 2)]
    (work / "sft_lengths.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = ["--stage", "sft", "--dataset", work / "sft_lengths.jsonl", "--eval-fraction", 0, "--max-steps", 3,
             "--lr", 1e-3]
    whole = train(work, *flags, "--batch-size", 4, output="sft_whole")
    split = train(work, *flags, "--batch-size", 1, "--grad-accum", 2, output="sft_split",
                  launcher=TWO_RANKS)
    assert [m["loss"] for m in split] == pytest.approx([m["loss"] for m in whole], rel=1e-6)
    a, b = (AutoModelForCausalLM.from_pretrained(work / out).state_dict() for out in ("sft_whole", "sft_split"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # a mean of micro-batch means: 4e-3 apart


def test_sft_eval_loss_is_a_token_level_mean(work):
    """eval/loss weighs every label token alike, across batches of rows of different lengths."""
    rows = [{"prompt": f"{s} was", "response": " great" + " and I loved it, the food was great" * (i % 3)}
            for i, s in enumerate(SUBJECTS * 2)]
    (work / "sft_mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = train(work, "--stage", "sft", "--dataset", work / "sft_mixed.jsonl", "--eval-fraction", 0.5,
                "--batch-size", 2, "--max-steps", 10, "--lr", 1e-2, output="sft_eval")
    tokenizer = AutoTokenizer.from_pretrained(work / "sft_eval")
    model = AutoModelForCausalLM.from_pretrained(work / "sft_eval").eval()
    examples, _ = minrlhf.tokenize(rows, "sft", tokenizer, 512)
    losses = []  # (mean loss, label tokens) of each held-out row, in order
    with torch.no_grad():
        for e in minrlhf.data.held_out(examples, 0.5)[1]:  # 8 rows: 4 subjects' prompts hash below 0.5
            loss = model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss.item()
            losses.append((loss, sum(label != -100 for label in e["labels"][1:])))
    token_mean = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    assert log[-1]["eval/loss"] == pytest.approx(token_mean, rel=1e-4)
    batches = [losses[i:i + 2] for i in range(0, 8, 2)]  # what weighing each batch's mean by its rows gives:
    row_weighted = sum(sum(loss * n for loss, n in b) / sum(n for _, n in b) * len(b) for b in batches) / 8
    assert row_weighted != pytest.approx(token_mean, rel=1e-4)  # so the check above tells them apart


def test_a_held_out_evaluation_is_logged_whatever_log_every(work):
    """--save-every 3 evaluates at steps 3 and 6 (and the last, 8); --log-every 2 would have dropped step 3's."""
    log = train(work, "--stage", "sft", "--max-steps", 8, "--save-every", 3, "--log-every", 2, "--lr", 1e-3,
                output="sft_log_every")
    assert [m["step"] for m in log] == [2, 3, 4, 6, 8]
    assert [m["step"] for m in log if "eval/loss" in m] == [3, 6, 8]


def test_prompts_cut_to_max_length_are_counted(work, capsys):
    """The online stages keep a long prompt's last --max-length tokens (where the answer begins): a line counts them,
    as the other stages count the rows they drop."""
    train(work, *PPO, "--max-length", 2, "--max-steps", 1, output="ppo_cut")
    out = capsys.readouterr().out
    assert re.search(r"pref\.jsonl: \d+ of 64 prompts longer than --max-length 2: the policy reads their last 2 "
                     r"tokens, the reward the whole prompt", out)
    assert "holds out none" not in out  # the online stages hold out no rows, whatever --eval-fraction's default


def test_an_eval_fraction_that_holds_out_no_row_says_so(work, capsys):
    """None of the 8 prompts of 16 rows hashes below 0.05: a line says so, where the log would just lack eval/*."""
    rows = [{"prompt": f"{s} was", "response": " great"} for s in SUBJECTS * 2]
    (work / "sft_16.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = train(work, "--stage", "sft", "--dataset", work / "sft_16.jsonl", "--eval-fraction", 0.05,
                "--max-steps", 1, output="sft_no_eval")
    assert "sft_16.jsonl: --eval-fraction 0.05 of 16 usable rows holds out none: no held-out evaluation" in (
        capsys.readouterr().out)
    assert not any(k.startswith("eval/") for k in log[0])


CPU_ALL_REDUCE = """import sys, torch, torch.distributed as dist
dist.init_process_group(sys.argv[1], init_method="file://" + sys.argv[2], rank=0, world_size=1)
flag = torch.ones(1)  # a stop flag or a stat: a CPU tensor
dist.all_reduce(flag)
print(flag.item())
"""


@pytest.mark.parametrize("device, backend, works", [("cpu", "ccl", True), ("cuda", "gloo", True), (None, None, False)])
def test_cpu_collectives_beside_an_accelerators_backend(tmp_path, device, backend, works):
    """The run's small all-reduces are of CPU tensors. On an accelerator, NCCL alone cannot reduce them: the
    process group must carry gloo beside it. ("cuda", "gloo") stands in for ("cuda", "nccl"), which cannot start
    without a GPU; the last case is the accelerator's backend alone, as DeepSpeed's default picks it."""
    from minrlhf.engine import process_group_backend
    assert process_group_backend("cuda", "nccl") == "cpu:gloo,cuda:nccl" and process_group_backend("cpu", "ccl") == "gloo"
    group = process_group_backend(device, backend) if device else "cuda:gloo"
    done = subprocess.run([sys.executable, "-c", CPU_ALL_REDUCE, group, str(tmp_path / "rendezvous")],
                          capture_output=True, text=True)
    assert (done.returncode == 0 and done.stdout.strip() == "1.0") == works, done.stderr[-300:]


def test_same_path_however_spelled(tmp_path, monkeypatch):
    """The critic from --reward-model takes the scores' normalisation when both flags name one folder, however
    written (`--critic-model ./runs/rm --reward-model runs/rm/`); --output may be none of the inputs; --resume
    takes `--dataset ./d.jsonl` for the `d.jsonl` of args.json."""
    from minrlhf.cli import same_path
    (tmp_path / "rm").mkdir()
    monkeypatch.chdir(tmp_path)
    assert same_path("./rm", "rm/") and same_path("rm", str(tmp_path / "rm")) and same_path("./d.jsonl", "d.jsonl")
    assert not same_path("rm", "rm2") and not same_path("rm", None)


def test_a_lock_left_by_a_killed_op_build_is_named(tmp_path, monkeypatch, capsys):
    """torch waits silently on an op's build lock; a killed build leaves it behind: the run names it first."""
    from minrlhf.engine import warn_build_locks
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / "py311_cpu" / "cpu_adam").mkdir(parents=True)
    warn_build_locks()
    assert capsys.readouterr().err == ""
    (tmp_path / "py311_cpu" / "cpu_adam" / "lock").touch()
    warn_build_locks()
    assert capsys.readouterr().err.splitlines() == [
        f"note: {tmp_path / 'py311_cpu' / 'cpu_adam' / 'lock'} exists: another process is building that DeepSpeed "
        f"op, or a build killed midway left it; if this run waits here and no build is running, remove the file"]
