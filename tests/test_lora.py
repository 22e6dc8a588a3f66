"""LoRA (minrlhf/lora.py) and gradient checkpointing: on every supported family against the plain model, then
train.py end to end (every stage, ZeRO-3 on 2 ranks, resume)."""
import math
from argparse import Namespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import train as train_py
from minrlhf import PolicyWithValueHead, load_causal_lm
from minrlhf.inputs import adapt, load_model, reference
from minrlhf.lora import LoRALinear, WithoutAdapters, add_lora, adapters_disabled, merged_state_dict
from test_train import (DEEPSPEED, PPO, assert_resume_reproduces, checkpoint_weights, measured, train,  # noqa: F401
                        work)
from tiny import FAMILIES, make_causal_lm, make_tokenizer, save_tiny


def trained_lora(family, rank=4, alpha=8.0):
    """A tiny model with adapters on every projection, B drawn at random as if trained, and its base."""
    model, base = make_causal_lm(family, 300).eval(), make_causal_lm(family, 300).eval()
    wrapped = add_lora(model, rank, alpha)
    torch.manual_seed(1)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            torch.nn.init.normal_(layer.lora_B, std=0.1)
    return model, base, wrapped


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_starts_at_the_base_and_merges_into_a_plain_model(family):
    model, base = make_causal_lm(family, 300).eval(), make_causal_lm(family, 300).eval()
    ids = torch.randint(3, 300, (2, 9))
    wrapped = add_lora(model, 4, 8.0)
    n_layers = model.config.get_text_config().num_hidden_layers
    assert wrapped >= 2 * n_layers  # the attention and MLP projections of every block, found by type
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    assert not model.get_output_embeddings().weight.requires_grad  # the LM head stays frozen, and unwrapped
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)  # B = 0: training starts at the base model
    model, base, _ = trained_lora(family)
    plain = make_causal_lm(family, 300, seed=7).eval()
    plain.load_state_dict(merged_state_dict(model, model.state_dict()))  # strict: the plain model's names
    with torch.no_grad():
        trained, merged = model(ids).logits, plain(ids).logits
        assert (trained - base(ids).logits).abs().max() > 0.01  # the adapters do change the output
        torch.testing.assert_close(merged, trained, rtol=1e-5, atol=1e-5)
        with adapters_disabled(model):  # the reference: the base model, bit for bit
            assert torch.equal(model(ids).logits, base(ids).logits)
        assert torch.equal(WithoutAdapters(model)(input_ids=ids).logits, base(ids).logits)
    assert torch.equal(model(ids).logits, trained)  # switched back on


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # GPT-2: Conv1D, its weight stored transposed
def test_merged_deltas_have_rank_r_and_nothing_else_moves(family):
    model, base, wrapped = trained_lora(family, rank=3)
    merged, original = merged_state_dict(model, model.state_dict()), base.state_dict()
    assert merged.keys() == original.keys()
    changed = [k for k in original if not torch.equal(merged[k], original[k])]
    assert len(changed) == wrapped
    for k in changed:
        assert torch.linalg.matrix_rank(merged[k] - original[k]).item() == 3, k


def test_lora_reference_is_the_policy_with_its_adapters_off():
    """One copy of the base weights, not two: the reference of the KL penalty and of DPO is the policy itself."""
    model = make_causal_lm("llama", 300)
    add_lora(model, 4, 8.0)
    ref = reference(model, Namespace(lora_rank=4, ref_model=None), cfg=None, device=None, tokenizer=None, resize=None)
    assert isinstance(ref, WithoutAdapters) and ref.model is model


def test_lora_targets_by_name_and_the_score_head_stays_out(tmp_path):
    model = make_causal_lm("llama", 300)
    assert add_lora(model, 2, 4.0, "q_proj,v_proj") == 2 * 2  # two layers
    wrapped = {n.rpartition(".")[0] for n, _ in model.named_parameters() if "lora_" in n}
    assert {n.split(".")[-1] for n in wrapped} == {"q_proj", "v_proj"}
    make_causal_lm("gpt2", 300).save_pretrained(tmp_path)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1)
    add_lora(classifier, 2, 4.0)
    assert not any("score" in n for n, p in classifier.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("lora", [0, 4])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(lora):
    ids = torch.randint(3, 300, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    grads = []
    for checkpointing in (False, True):
        model = make_causal_lm("llama", 300)  # train mode: where checkpointing acts (no dropout in llama)
        if lora:
            add_lora(model, lora, 8.0)
            for layer in model.modules():
                if isinstance(layer, LoRALinear):
                    torch.nn.init.normal_(layer.lora_B, std=0.1, generator=torch.Generator().manual_seed(1))
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        assert model.is_activation_checkpointing == checkpointing
        loss, _ = train_py.sft_loss(model, batch)
        loss.backward()
        grads.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss, plain), (loss_checkpointed, checkpointed) = grads
    torch.testing.assert_close(loss_checkpointed, loss)
    assert plain.keys() == checkpointed.keys() and all("lora_" in n for n in plain) == bool(lora)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["causal", "rm"])
def test_adapted_models_checkpoint_in_training(tmp_path, kind):
    """`adapt` (every trained model: policy, reward model, critic) leaves the model in training mode, where
    transformers recomputes each block in the backward: its forward runs twice per step."""
    args = Namespace(lora_rank=0, lora_alpha=None, lora_targets="all-linear", gradient_checkpointing=True, model="m")
    model = adapt(load_model("--model", save_tiny("llama", tmp_path), make_tokenizer(), False, kind), args)
    calls = []
    model.base_model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # inside the block
    ids = torch.randint(3, 60, (2, 6))
    model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
    assert model.training and len(calls) == 2  # the forward, and its recomputation in the backward


@pytest.mark.parametrize("kind", ["causal", "rm"])
def test_lora_trains_the_adapters_and_a_reward_models_score_head(tmp_path, kind):
    """Under --lora-rank only the adapters train, and a reward model's (or critic's) score head, which is new."""
    args = Namespace(lora_rank=4, lora_alpha=None, lora_targets="all-linear", gradient_checkpointing=False, model="m")
    model = adapt(load_model("--model", save_tiny("llama", tmp_path), make_tokenizer(), False, kind), args)
    trainable = {name.split(".")[-1] if "lora_" in name else name
                 for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"} | ({"score.weight"} if kind == "rm" else set())
    assert {m.scaling for m in model.modules() if isinstance(m, LoRALinear)} == {2.0}  # --lora-alpha's default 2r


def assert_same_numbers(plain, checkpointed, abs):
    """Two runs' metrics, less time and memory: the same keys and values, step by step."""
    assert len(plain) == len(checkpointed)
    for a, b in zip(measured(plain), measured(checkpointed)):
        assert b.keys() == a.keys() and all(b[k] == pytest.approx(a[k], rel=1e-4, abs=abs) for k in a)


LORA_PPO = [*PPO, "--model", "peaked", "--lora-rank", 4, "--lr", 3e-2]  # the flags' last --model, --lr win


def changed_weights(run_dir, base_dir):
    """{name: rank of the weight delta} of the saved model against its base; asserts the same names."""
    saved, base = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (run_dir, base_dir))
    assert saved.keys() == base.keys()
    return {k: torch.linalg.matrix_rank(saved[k] - base[k]).item() for k in base if not torch.equal(saved[k], base[k])}


def test_lora_ppo_trains_the_adapters_alone_and_saves_a_plain_model(work):
    log = train(work, *LORA_PPO, "--max-steps", 20, "--save-every", 20, output="ppo_lora")
    first, last = [sum(m["reward"] for m in part) / 5 for part in (log[:5], log[-5:])]
    assert last > first + 0.5, [m["reward"] for m in log]
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # B = 0 at first: the policy starts as the base
    ranks = changed_weights(work / "ppo_lora", work / "peaked")
    assert len(ranks) == 2 * 7 and set(ranks.values()) == {4}  # 7 projections x 2 blocks; all else bitwise equal
    # the checkpoint keeps the adapters apart: the training model it holds gives the saved model's logits
    policy = PolicyWithValueHead(load_causal_lm(work / "peaked"))
    add_lora(policy.backbone, 4, 8.0)
    policy.load_state_dict(checkpoint_weights(work / "ppo_lora" / "checkpoints" / "step20"))
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        trained = policy(ids, torch.ones_like(ids))[0]
        saved = AutoModelForCausalLM.from_pretrained(work / "ppo_lora")(input_ids=ids).logits
    torch.testing.assert_close(saved, trained, rtol=1e-4, atol=1e-4)  # merging sums in another order


def test_lora_reward_model_and_dpo(work):
    rm = train(work, "--stage", "rm", "--model", "peaked", "--lora-rank", 4, "--max-steps", 20, "--lr", 1e-2,
               "--batch-size", 8, "--eval-fraction", 0.25, output="rm_lora")
    assert rm[-1]["eval/accuracy"] == 1.0 and rm[-1]["eval/margin"] > 1.0  # the new score head trains whole
    classifier = AutoModelForSequenceClassification.from_pretrained(work / "rm_lora")
    assert classifier.score.weight.abs().sum() > 0
    dpo = train(work, "--stage", "dpo", "--model", "peaked", "--lora-rank", 4, "--max-steps", 12, "--lr", 1e-2,
                "--batch-size", 8, output="dpo_lora")
    assert dpo[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the reference: the adapters switched off
    assert dpo[-1]["loss"] < 0.3 and set(changed_weights(work / "dpo_lora", work / "peaked").values()) == {4}


def test_lora_ppo_with_a_critic_saves_it_merged(work):
    """A critic from a reward model under --lora-rank trains its adapters and score head; saved in OUTPUT/critic as a
    plain reward model, the adapters merged into its weights."""
    train(work, *LORA_PPO, "--critic-model", "random_rm", "--max-steps", 2, output="ppo_lora_critic")
    critic, info = AutoModelForSequenceClassification.from_pretrained(work / "ppo_lora_critic" / "critic",
                                                                      output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights: a plain model
    start = AutoModelForSequenceClassification.from_pretrained(work / "random_rm").state_dict()
    moved = {k for k, w in critic.state_dict().items() if not torch.equal(w, start[k])}
    assert "score.weight" in moved and any(k.endswith("q_proj.weight") for k in moved)  # head and merged adapters
    deltas = {k: critic.state_dict()[k] - start[k] for k in moved if k.endswith("proj.weight")}
    assert {torch.linalg.matrix_rank(d).item() for d in deltas.values()} == {4}  # the adapters trained, not the body


def test_gradient_checkpointing_changes_no_number(work):
    """The same run with activations recomputed in the backward: the same losses and statistics."""
    plain = train(work, *LORA_PPO, "--max-steps", 3, output="gc_off")
    checkpointed = train(work, *LORA_PPO, "--max-steps", 3, "--gradient-checkpointing", output="gc_on")
    assert_same_numbers(plain, checkpointed, abs=1e-6)


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_pair_stages_with_gradient_checkpointing(work, stage):
    """The same numbers with activations recomputed; the reward model's pairs then run in full, as
    checkpointing turns the KV cache off in training."""
    flags = ["--stage", stage, "--model", "peaked", "--max-steps", 3, "--lr", 1e-2, "--batch-size", 8,
             "--eval-fraction", 0.25, "--save-every", 3]
    plain = train(work, *flags, output=f"{stage}_gc_off")
    checkpointed = train(work, *flags, "--gradient-checkpointing", output=f"{stage}_gc_on")
    assert_same_numbers(plain, checkpointed, abs=1e-5)


def test_lora_resume_reproduces_the_uninterrupted_run(work):
    assert_resume_reproduces(work, LORA_PPO, "lora")


def test_lora_and_checkpointing_on_two_ranks_zero3(work):
    """ZeRO-3 partitions base weights and adapters alike; saving gathers and merges them."""
    log = train(work, *LORA_PPO, "--max-steps", 2, "--gradient-checkpointing", "--deepspeed_config",
                work / "zero3.json", output="lora_2ranks", launcher=[DEEPSPEED, "--num_gpus", "2"])
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert set(changed_weights(work / "lora_2ranks", work / "peaked").values()) == {4}


@pytest.mark.parametrize("flags", [["--zero-stage", 1, "--bf16"], ["--zero-stage", 2, "--bf16", "--offload"],
                                   ["--zero-stage", 3, "--bf16"]])  # ZeRO-3: adapters on zero.Init's partitions
def test_lora_sft_with_checkpointing_under_zero_and_bf16(work, flags):
    name = "lora_sft" + "".join(map(str, flags)).replace("-", "")
    log = train(work, "--stage", "sft", "--model", "peaked", "--lora-rank", 4, "--gradient-checkpointing",
                "--max-steps", 6, "--lr", 1e-2, "--batch-size", 8, *flags, output=name)
    losses = [m["loss"] for m in log]  # below the first: adapters that learned nothing would hold it (each
    assert max(losses[1:]) < losses[0] and losses[-1] < 0.9 * losses[0]  # step's batch has other rows)
    # the saved model is the trained one: its bf16 weights W and the adapters merged in float32 (in a bf16
    # sum most of (alpha / r) B A rounds away), and it loads in float32 by transformers' default
    saved = AutoModelForCausalLM.from_pretrained(work / name).state_dict()
    assert {v.dtype for v in saved.values()} == {torch.float32}
    if flags[1] == 3:  # its checkpoint holds placeholders in the engine's dtype, adapters' too (the merge under
        states, = (work / name / "checkpoints" / "step6").glob("*model_states.pt")  # ZeRO-3: the 2-rank test)
        module = torch.load(states, weights_only=False)["module"]
        assert {t.dtype for t in module.values() if t.is_floating_point()} == {torch.bfloat16}
        return
    trained = checkpoint_weights(work / name / "checkpoints" / "step6")
    layers = [k.removesuffix(".lora_A") for k in trained if k.endswith(".lora_A")]
    assert layers
    for layer in layers:
        W, A, B = (trained[f"{layer}.{key}"].float() for key in ("base.weight", "lora_A", "lora_B"))
        torch.testing.assert_close(saved[f"{layer}.weight"], W + 8 / 4 * B @ A, rtol=1e-6, atol=1e-7)
