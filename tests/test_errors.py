"""Bad input: one clear line on stderr and exit status 2, before any training step."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
import torch

import eval as eval_py
import train
import minrlhf.offline
from minrlhf import load_reward_model
from minrlhf.inputs import RewardFunction, load_model
from test_train import ENV
from tiny import STRICT_TEMPLATE, make_causal_lm, make_tokenizer, save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REWARDS = """
def boom(prompts, responses):
    return [1 / 0 for _ in responses]
def short(prompts, responses):
    return [1.0]
def text(prompts, responses):
    return ["x" for _ in responses]
def nan(prompts, responses):
    return [float("nan") for _ in responses]
def inf(prompts, responses):
    return [0.0, float("inf")] + [0.0] * (len(responses) - 2)
def leave(prompts, responses):
    import sys
    sys.exit("bye")
def forgot(prompts, responses):
    scores = [1.0 for _ in responses]
threshold = 0.5  # a module's setting, not a function
"""
EXITS = "import sys\nsys.exit('usage: exits.py [-h]')\n"  # a script with argparse, imported


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    save_tiny("llama", d / "model")
    load_reward_model(str(d / "model"), make_tokenizer().pad_token_id).save_pretrained(d / "rm")
    make_tokenizer().save_pretrained(d / "rm")
    shutil.copytree(d / "model", d / "bad_template")  # a chat template with a syntax error
    (d / "bad_template" / "chat_template.jinja").write_text("{{ m['content'] }")
    shutil.copytree(d / "rm", d / "critic")  # a PPO run's critic: a reward model's files, and its values' scale
    torch.save({"mean": 0.0, "std": 1.0}, d / "critic" / "value_normalisation.pt")
    short = save_tiny("llama", d / "short", config={"max_position_embeddings": 16})
    # more token embeddings than its tokenizer has tokens (as Qwen's, padded): it can sample ids past them
    save_tiny("llama", d / "wide", config={"vocab_size": len(make_tokenizer()) + 64})
    save_tiny("llama", d / "narrow", config={"vocab_size": len(make_tokenizer()) - 1})
    load_reward_model(short, make_tokenizer().pad_token_id).save_pretrained(d / "short_rm")
    make_tokenizer().save_pretrained(d / "short_rm")
    tied = save_tiny("llama", d / "tied", config={"tie_word_embeddings": True})  # no LM head of its own
    load_reward_model(tied, make_tokenizer().pad_token_id).save_pretrained(d / "tied_rm")
    make_tokenizer().save_pretrained(d / "tied_rm")
    chat = save_tiny("llama", d / "chat_model", chat_template=True)  # another tokenizer than the policy's
    shutil.copytree(d / "model", d / "swapped_model")  # as many tokens as the policy's, two of them swapped
    with open(d / "swapped_model" / "tokenizer.json") as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    vocab["Ġthe"], vocab["Ġfilm"] = vocab["Ġfilm"], vocab["Ġthe"]
    (d / "swapped_model" / "tokenizer.json").write_text(json.dumps(spec))
    load_reward_model(chat, make_tokenizer(chat_template=True).pad_token_id).save_pretrained(d / "chat_rm")
    make_tokenizer(chat_template=True).save_pretrained(d / "chat_rm")
    strict = make_tokenizer(chat_template=True)  # Gemma's, Mistral's: no system turn
    strict.chat_template = STRICT_TEMPLATE
    shutil.copytree(chat, d / "strict_model")
    strict.save_pretrained(d / "strict_model")
    shutil.copytree(d / "rm", d / "strict_rm")
    strict.save_pretrained(d / "strict_rm")  # a reward model whose template refuses the policy's prompts
    shutil.copytree(d / "model", d / "cut_model")  # weights cut short: an interrupted copy
    with open(d / "cut_model" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    shutil.copytree(d / "model", d / "empty_bin", ignore=shutil.ignore_patterns("*.safetensors"))
    (d / "empty_bin" / "pytorch_model.bin").write_bytes(b"")  # torch.load: EOFError(), a message of no line
    shutil.copytree(d / "model", d / "other_config")  # a config.json that does not fit the weights
    config = json.loads((d / "other_config" / "config.json").read_text())
    (d / "other_config" / "config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}))
    shutil.copytree(d / "model", d / "typed_config")  # a config value of the wrong type: huggingface_hub's error
    (d / "typed_config" / "config.json").write_text(json.dumps({**config, "hidden_size": "wide"}))
    shutil.copytree(d / "model", d / "bad_tokenizer")  # tokenizer.json of the wrong shape: a bare Exception
    (d / "bad_tokenizer" / "tokenizer.json").write_text(json.dumps({"version": "1.0", "added_tokens": [],
                                                                    "model": {"type": "BPE", "vocab": 5}}))
    shutil.copytree(d / "model", d / "bad_config")
    (d / "bad_config" / "config.json").write_text('{"model_type": "llama", oops')
    no_eos = make_tokenizer()
    no_eos.eos_token = None
    no_eos.save_pretrained(d / "no_eos")
    os.makedirs(d / "empty_dir")  # not a model folder
    os.makedirs(d / "blocked_run" / "args.json.tmp")  # where args.json is written: a folder, as a full disk fails
    make_tokenizer().save_pretrained(d / "tokenizer_only")  # a tokenizer without a model's config.json
    # a model's config and weights alone: for a GPT-2 one transformers loads an empty tokenizer, for Llama none
    make_causal_lm("gpt2", len(make_tokenizer())).save_pretrained(d / "no_tokenizer")
    shutil.copytree(d / "model", d / "llama_no_tokenizer", ignore=shutil.ignore_patterns("tokenizer*"))
    shutil.copytree(d / "model", d / "hot_run")  # a policy whose train.py run's temperature is garbled
    (d / "hot_run" / "args.json").write_text(json.dumps({"stage": "ppo", "model": str(d / "model"),
                                                         "temperature": "hot"}))
    rows = [{"prompt": "the film was", "chosen": " great", "rejected": " awful"}] * 8
    files = {"pref.jsonl": "".join(json.dumps(r) + "\n" for r in rows), "rows.csv": "prompt\nhi\n",
             "bad.jsonl": '{"prompt": "a"}\n{"prompt": oops}\n', "empty.jsonl": "",
             "cols.jsonl": '{"question": "a", "answer": "b"}\n', "half.jsonl": '{"prompt": "a", "chosen": "b"}\n',
             "err_rewards.py": REWARDS, "exits.py": EXITS,
             "bad_ds.json": "{oops", "batch_ds.json": json.dumps({"train_micro_batch_size_per_gpu": 3}),
             "accum_ds.json": json.dumps({"gradient_accumulation_steps": 3}),
             "total_ds.json": json.dumps({"train_batch_size": 7}),
             "zero_ds.json": json.dumps({"zero_optimization": {"stage": 7}}),
             "bool_stage_ds.json": json.dumps({"zero_optimization": {"stage": True}}),
             "fp16_ds.json": json.dumps({"fp16": {"enabled": True}}),
             "sched_ds.json": json.dumps({"scheduler": {"type": "WarmupLR"}}),
             "ckpt_ds.json": json.dumps({"checkpoint": {"writer": {"decoupled": True}}}),
             "live_ds.json": json.dumps({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": "lots"}}),
             "bf16_on_ds.json": json.dumps({"bf16": {"enabled": True}}),
             "stage_ds.json": json.dumps({"zero_optimization": {"stage": "2"}}),
             "clip_ds.json": json.dumps({"gradient_clipping": "1.0"}),
             "typo_ds.json": json.dumps({"zero_optimisation": {"stage": 2}}),
             "offload_ds.json": json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}),
             "negative_clip_ds.json": '{"gradient_clipping": NaN}',
             "typeless_ds.json": json.dumps({"optimizer": {"params": {}}}),
             "betas_ds.json": json.dumps({"optimizer": {"type": "AdamW", "params": {"betas": "0.9"}}}),
             "decay_ds.json": json.dumps({"optimizer": {"type": "AdamW", "params": {"weight_decay": "0.1"}}}),
             "print_ds.json": json.dumps({"steps_per_print": "x"}),
             "prompt_text.jsonl": '{"prompt": "a", "text": "b"}\n' * 8,
             "columns.json": json.dumps({"prompt": ["the film was"] * 500, "response": [" great"] * 500}),
             "true_ds.json": json.dumps({"gradient_clipping": True}), "list_ds.json": "[]", "bf16_ds.json": json.dumps({"bf16": True}),
             "params_ds.json": json.dumps({"optimizer": {"type": "AdamW", "params": "x"}}),
             "lr_ds.json": json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 0.5}}}),
             "ten.jsonl": "".join(json.dumps(r) + "\n" for r in rows[:2] * 5),
             "null.jsonl": "".join(json.dumps(r) + "\n" for r in rows[:7] + [{**rows[0], "prompt": None}]),
             "null_response.jsonl": '{"prompt": "a", "response": " b"}\n{"prompt": "a", "response": null}\n',
             "system.jsonl": (json.dumps({"prompt": [{"role": "system", "content": "be kind"},
                                                     {"role": "user", "content": "hi"}]}) + "\n") * 2,
             "a_file": "not a directory", "list_line.jsonl": '{"prompt": "a"}\n["a", "b"]\n', "num_prompt.jsonl": '{"prompt": 4}\n{"prompt": 5}\n',
             "chat_prompt.jsonl": json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n", "notgz.jsonl.gz": '{"prompt": "a"}\n',
             "long.jsonl": "".join(json.dumps({**r, "prompt": "the film was great " * 80}) + "\n" for r in rows)}
    for name, text in files.items():
        (d / name).write_text(text)
    pyarrow.parquet.write_table(pyarrow.table({c: pyarrow.array([], pyarrow.string()) for c in rows[0]}),
                                d / "empty.parquet")
    (d / "bad.parquet").write_text("not parquet")
    (d / "latin1_ds.json").write_bytes('{"steps_per_print": "café"}'.encode("latin-1"))
    (d / "latin1.jsonl").write_bytes('{"prompt": "café", "chosen": " a", "rejected": " b"}\n'.encode("latin-1") * 8)
    os.makedirs(d / "sft_run")
    (d / "sft_run" / "args.json").write_text(json.dumps({"stage": "sft"}))
    os.makedirs(d / "ckpt_run" / "checkpoints" / "step1")  # also a run stopped before its final model
    os.makedirs(d / "finished_run")  # a finished sft run whose checkpoints were removed to save space
    (d / "finished_run" / "args.json").write_text(json.dumps({"stage": "sft"}))
    (d / "finished_run" / "config.json").write_text("{}")
    make_tokenizer().save_pretrained(d / "adapter")  # a PEFT adapter folder: adapters and tokenizer, no model
    (d / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    for name, saved in {"resume_run": {"batch_size": 4}, "ranks_run": {"world_size": 2},
                        "path_run": {"dataset": "pref.jsonl"}, "data_run": {"dataset_sha256": "0" * 64}}.items():
        os.makedirs(d / name / "checkpoints" / "step1")
        (d / name / "args.json").write_text(json.dumps({"stage": "sft", "max_steps": 1, **saved}))
    return d


PPO = ["--stage", "ppo", "--rollout-batch-size", 4, "--max-new-tokens", 2]
CASES = {  # name: (flags, the one line expected on stderr)
    "missing file": (["--dataset", "{w}/nope.jsonl"], r"nope\.jsonl: no such file"),
    "unknown extension": (["--dataset", "{w}/rows.csv"], r"rows\.csv: unknown file type; expected \.jsonl, \.json or \.parquet"),
    "malformed json": (["--dataset", "{w}/bad.jsonl"], r"bad\.jsonl: line 2: malformed JSON"),
    "missing columns": (["--dataset", "{w}/cols.jsonl", "--stage", "rm"],
                        r"cols\.jsonl: --stage rm needs columns \{prompt, chosen, rejected\}; found \['question', 'answer'\]"),
    "some columns": (["--dataset", "{w}/half.jsonl", "--stage", "rm"],
                     r"half\.jsonl: --stage rm needs columns \{prompt, chosen, rejected\}; found \['prompt', 'chosen'\]"),
    "empty data": (["--dataset", "{w}/empty.jsonl"], r"empty\.jsonl: the data set is empty"),
    "empty parquet": (["--dataset", "{w}/empty.parquet"], r"empty\.parquet: the data set is empty$"),
    "not parquet": (["--dataset", "{w}/bad.parquet"], r"bad\.parquet: .*(magic|Parquet)"),
    "all rows too long": (["--max-length", 3],
                          r"pref\.jsonl: 0 usable training rows \(8 dropped: an empty reply .*, no response token within "
                          r"--max-length 3 or a pair's replies alike\); need at least one batch"),
    "model missing": (["--model", "{w}/nope"], r"--model .*nope: cannot load its tokenizer"),
    "tokenizer without EOS": (["--model", "{w}/no_eos"], r"--model .*no_eos: unusable tokenizer \(.*has no EOS token\)"),
    "model not a causal LM": (["--model", "{w}/rm"], r"--model .*rm: cannot load as a causal LM \(not a causal LM "
                                                     r"checkpoint, weights missing: lm_head\.weight\)"),
    "tied reward model as policy": (["--model", "{w}/tied_rm"],
                                    r"--model .*tied_rm: cannot load as a causal LM \(not a causal LM checkpoint: "
                                    r"a reward model \(it has a score head\)\)"),
    "a critic as the reward model": (PPO + ["--reward-model", "{w}/critic"],
                                     r"--reward-model .*critic: a PPO critic \(value_normalisation\.pt beside it\): it "
                                     r"predicts returns, not rewards; pass a reward model"),
    "reward model without head": (PPO + ["--reward-model", "{w}/model"],
                                  r"--reward-model .*model: cannot load as a reward model \(not a reward model"),
    "past the positions": (["--dataset", "{w}/long.jsonl"], r"--model .*model: 256 positions, fewer than the \d+ tokens "
                                                            r"of the run's longest sequence; lower --max-length"),
    "past the positions, ppo": (PPO + ["--dataset", "{w}/long.jsonl", "--reward-fn", "vader", "--max-length", 255],
                                r"--model .*model: 256 positions, fewer than the 257 tokens of the run's longest"),
    "reference past its positions": (["--stage", "dpo", "--ref-model", "{w}/short", "--dataset", "{w}/long.jsonl",
                                      "--max-length", 24],
                                     r"--ref-model .*short: 16 positions, fewer than the \d+ tokens of the run's "
                                     r"longest sequence"),
    "reward model past its positions": (PPO + ["--reward-model", "{w}/short_rm", "--critic-model", "head",
                                               "--dataset", "{w}/long.jsonl", "--max-length", 24],
                                        r"--reward-model .*short_rm: 16 positions, fewer than the 26 tokens"),
    "reference without the policy's spare ids": (PPO + ["--model", "{w}/wide", "--ref-model", "{w}/model",
                                                        "--reward-fn", "vader"],
                                                 r"--ref-model .*model: (\d+) token embeddings, fewer than the \d+ "
                                                 r"token ids it reads \(the policy can sample\)"),
    "critic without the policy's spare ids": (PPO + ["--model", "{w}/wide", "--reward-model", "{w}/rm"],
                                              r"--critic-model .*rm: \d+ token embeddings, fewer than the \d+ token ids "
                                              r"it reads \(the policy can sample\)"),
    "fewer embeddings than tokens": (["--model", "{w}/narrow"], r"--model .*narrow: (\d+) token embeddings, fewer than "
                                                                r"the \d+ token ids it reads \(its tokenizer has\)"),
    "no reward": (PPO, r"--stage ppo needs exactly one of --reward-model DIR or --reward-fn MODULE:FUNCTION"),
    "reward fn not importable": (PPO + ["--reward-fn", "nosuch:f"], r"--reward-fn nosuch:f: cannot import \(ModuleNotFoundError"),
    "reward fn raises": (PPO + ["--reward-fn", "err_rewards:boom"], r"--reward-fn err_rewards:boom raised ZeroDivisionError"),
    "reward fn length": (PPO + ["--reward-fn", "err_rewards:short"], r"err_rewards:short returned 1 scores for 4 responses"),
    "reward fn text": (PPO + ["--reward-fn", "err_rewards:text"], r"err_rewards:text: score 0 is 'x'; expected a finite number"),
    "reward fn nan": (PPO + ["--reward-fn", "err_rewards:nan"], r"err_rewards:nan: score 0 is nan; expected a finite number"),
    "reward fn inf": (PPO + ["--reward-fn", "err_rewards:inf"], r"err_rewards:inf: score 1 is inf; expected a finite number"),
    "ds_config not json": (["--deepspeed_config", "{w}/bad_ds.json"], r"--deepspeed_config .*bad_ds\.json: Expecting"),
    "ds_config contradicts": (["--deepspeed_config", "{w}/batch_ds.json"],
                              r"batch_ds\.json: train_micro_batch_size_per_gpu=3 contradicts the flags \(4\)"),
    "ds_config contradicts accumulation": (["--deepspeed_config", "{w}/accum_ds.json"],
                                           r"accum_ds\.json: gradient_accumulation_steps=3 contradicts the flags \(1\)"),
    "ds_config contradicts batch": (["--deepspeed_config", "{w}/total_ds.json"],
                                    r"total_ds\.json: train_batch_size=7 contradicts the flags \(4\)"),
    "ds_config fp16": (["--deepspeed_config", "{w}/fp16_ds.json"],
                       r"--deepspeed_config .*fp16_ds\.json: fp16 is enabled; train\.py trains in fp32, or bf16 with "
                       r"--bf16 \(no loss scaling\)"),
    "ds_config invalid": (["--deepspeed_config", "{w}/zero_ds.json"],
                          r"--deepspeed_config .*zero_ds\.json: zero_optimization\.stage 7; expected 0, 1, 2 or 3"),
    "rollout not divisible": (PPO[:2] + ["--reward-fn", "err_rewards:boom", "--rollout-batch-size", 6],
                              r"--rollout-batch-size 6 is not a multiple of the mini-batch"),
    "mini-batch not divisible": (PPO + ["--reward-fn", "err_rewards:boom", "--mini-batch-size", 6],
                                 r"--mini-batch-size 6 is not a multiple of --batch-size 4"),
    "num generations 0": (["--stage", "grpo", "--num-generations", 0], r"argument --num-generations: 0: expected a "
                                                                         r"number >= 1 and <= 1024"),
    "num generations past memory": (["--stage", "grpo", "--num-generations", 10**9],  # was killed for memory
                                    r"argument --num-generations: 1000000000: expected a number >= 1 and <= 1024"),
    "rloo of one sample": (["--stage", "rloo", "--num-generations", 1, "--reward-fn", "err_rewards:boom"],
                           r"--num-generations 1: --stage rloo needs at least 2 samples per prompt"),
    "grpo rollout not divisible": (["--stage", "grpo", "--reward-fn", "err_rewards:boom", "--rollout-batch-size", 3,
                                    "--num-generations", 2],
                                   r"--rollout-batch-size 3 x --num-generations 2 is not a multiple of the mini-batch "
                                   r"\(--batch-size x --grad-accum = 4\)"),
    "a critic reading other tokens": (PPO + ["--reward-model", "{w}/chat_rm"],
                                      r"--critic-model .*chat_rm \(default: --reward-model\): a tokenizer other than "
                                      r"--model's, whose tokens a critic reads; pass --critic-model head"),
    "a reference reading tokens swapped": (["--stage", "dpo", "--ref-model", "{w}/swapped_model"],
                                           r"--ref-model .*swapped_model: a tokenizer other than --model's"),
    "a reference reading other tokens": (["--stage", "dpo", "--ref-model", "{w}/chat_model"],
                                         r"--ref-model .*chat_model: a tokenizer other than --model's, so its "
                                         r"log-probs would be of other tokens; pass a reference with --model's"),
    "critic for a critic-free stage": (["--stage", "grpo", "--reward-fn", "err_rewards:boom", "--critic-model", "{w}/rm"],
                                      r"--critic-model: --stage grpo does not use it \(a flag of ppo\)"),
    "GAE's lambda for rloo": (["--stage", "rloo", "--reward-fn", "err_rewards:boom", "--lam", "0.95"],
                              r"--lam: --stage rloo does not use it \(a flag of ppo\)"),
    "a value lr for grpo": (["--stage", "grpo", "--reward-fn", "err_rewards:boom", "--value-lr", "1e-3"],
                            r"--value-lr: --stage grpo does not use it \(a flag of ppo\)"),
    "a KL coefficient for sft": (["--stage", "sft", "--kl-coef", "0.5"],
                                 r"--kl-coef: --stage sft does not use it \(a flag of ppo, grpo, rloo\)"),
    "dpo's beta for rm": (["--stage", "rm", "--beta", "0.5"], r"--beta: --stage rm does not use it \(a flag of dpo\)"),
    "a reference for sft": (["--stage", "sft", "--ref-model", "{w}/rm"],
                            r"--ref-model: --stage sft does not use it \(a flag of dpo, ppo, grpo, rloo\)"),
    "scale rewards for rloo": (["--stage", "rloo", "--reward-fn", "err_rewards:boom", "--no-scale-rewards"],
                               r"--scale-rewards: --stage rloo does not use it \(a flag of grpo\)"),
    "resume without checkpoint": (["--resume"], r"--resume: no complete checkpoint in .*checkpoints"),
    "resume without checkpoint, before loading": (PPO + ["--resume", "--reward-model", "{w}/nosuch"],
                                                  r"--resume: no complete checkpoint in .*checkpoints"),
    "output of another stage": (["--stage", "rm", "--output", "{w}/sft_run"], r"sft_run holds a --stage sft run"),
    "checkpoints without resume": (["--output", "{w}/ckpt_run"], r"ckpt_run already holds checkpoints; pass --resume"),
    "a finished run's final model": (["--output", "{w}/finished_run"], r"finished_run holds the final model of a "
                                                                        r"finished run, which the run would write over"),
    "fewer prompts than a rollout": (PPO + ["--reward-fn", "err_rewards:boom", "--dataset", "{w}/ten.jsonl",
                                            "--rollout-batch-size", 16],
                                     r"ten\.jsonl: 10 usable training rows \(0 dropped: .*\); need at "
                                     r"least one batch of 16 \(--rollout-batch-size x ranks\)"),
    "null field": (["--dataset", "{w}/null.jsonl"], r"null\.jsonl: row 8: column 'prompt' is None; expected text"),
    "batch size 0": (["--batch-size", 0], r"argument --batch-size: 0: expected a number > 0"),
    "grad accum past the data": (["--grad-accum", 10**12],  # was 10**12 micro-batches for one step
                                 r"pref\.jsonl: \d+ usable training rows .*; need at least one batch of 4000000000000 "
                                 r"\(--batch-size x --grad-accum x ranks\); --eval-fraction holds out \d+"),
    "negative lr": (["--lr=-1e-5"], r"argument --lr: -1e-5: expected a number > 0"),
    "negative epochs": (["--epochs=-1"], r"argument --epochs: -1: expected a number > 0"),
    "log every 0": (["--log-every", 0], r"argument --log-every: 0: expected a number > 0"),
    "no new tokens": (PPO + ["--max-new-tokens", 0], r"argument --max-new-tokens: 0: expected a number > 0"),
    "ppo epochs 0": (PPO + ["--ppo-epochs", 0], r"argument --ppo-epochs: 0: expected a number > 0"),
    "lambda above 1": (["--lam", 1.5], r"argument --lam: 1.5: expected a number >= 0 and <= 1"),
    "max length 1": (["--max-length", 1], r"argument --max-length: 1: expected a number >= 2"),
    "lora targets absent": (["--lora-rank", 4, "--lora-targets", "nosuch_proj"],
                            r"--lora-targets nosuch_proj: no nn\.Linear or Conv1D layer of that name in the "
                            r"transformer body of --model .*model"),
    "lora targets, one absent": (["--lora-rank", 4, "--lora-targets", "q_proj, v_proj"],
                                 r"--lora-targets q_proj, v_proj: no nn\.Linear or Conv1D layer of that name in the "
                                 r"transformer body of --model .*model: ' v_proj'"),
    "lora rank past the layers": (["--lora-rank", 10**9],  # was an allocation of 10**9 x 32 weights per layer
                                  r"--lora-rank 1000000000: rank 1000000000 is above .*'s full rank, min\(in, out\) "
                                  r"= 16 in --model .*; LoRA's update is low-rank"),
    "lora alpha without rank": (["--lora-alpha", 8], r"--lora-alpha and --lora-targets shape LoRA adapters: pass "
                                                     r"--lora-rank R > 0 with them"),
    "negative lora rank": (["--lora-rank=-1"], r"argument --lora-rank: -1: expected a number >= 0"),
    "output not writable": (["--output", "{w}/a_file/run"], r"--output .*a_file/run: cannot write there \(Not a directory\)"),
    "resume, other batch": (["--output", "{w}/resume_run", "--resume", "--max-steps", 2, "--batch-size", 2],
                            r"--resume: --batch-size is 2, where the checkpoints' run had 4 \(.*resume_run/args\.json\); "
                            r"only how long it runs, logs and saves may change"),
    "resume, the data spelled otherwise": (["--output", "{w}/path_run", "--resume", "--dataset", "./pref.jsonl"],
                                           r"--resume: cannot load .*path_run/checkpoints/step1"),  # past the flags
    "resume, the data edited": (["--output", "{w}/data_run", "--resume"],
                                r"--resume: --dataset .*pref\.jsonl has changed since the checkpoints' run read it \(another "
                                r"sha256\), so its data order and held-out rows would not go on; resume with that data"),
    "resume without args.json": (["--output", "{w}/ckpt_run", "--resume"],
                                 r"--resume: .*ckpt_run/args\.json is missing or unreadable, so the checkpoints' "
                                 r"flags are unknown"),
    "resume, other ranks": (["--output", "{w}/ranks_run", "--resume"],
                            r"--resume: the number of ranks is 1, where the checkpoints' run had 2"),
    "not gzip": (["--dataset", "{w}/notgz.jsonl.gz"], r"notgz\.jsonl\.gz: cannot read it as UTF-8 text \(Not a "
                                                      r"gzipped file"),
    "dataset a directory": (["--dataset", "{w}/sft_run"], r"sft_run: a directory; expected \.jsonl, \.json or "
                                                           r"\.parquet"),
    "eval fraction 1": (["--eval-fraction", 1], r"pref\.jsonl: 0 usable training rows .*; --eval-fraction holds out 8"),
    "seed too large": (["--seed", 2**40], r"argument --seed: 1099511627776: expected a number >= 0 and <= 4294967295"),
    "not utf-8": (["--dataset", "{w}/latin1.jsonl"], r"latin1\.jsonl: 'utf-8' codec can't decode byte 0xe9"),
    "max steps and epochs": (["--max-steps", 2, "--epochs", 2],
                             r"--max-steps and --epochs both say how long to train; pass one of them"),
    "target kl without kl": (PPO + ["--reward-fn", "vader", "--kl-coef", 0, "--target-kl", 1],
                             r"--target-kl adapts --kl-coef by a factor at each iteration: it needs --kl-coef > 0"),
    "grad accum and mini batch": (PPO + ["--reward-fn", "vader", "--batch-size", 2, "--grad-accum", 4,
                                         "--mini-batch-size", 4],
                                  r"--grad-accum 4 x --batch-size 2 contradicts --mini-batch-size 4, which sets "
                                  r"--grad-accum; pass one of them"),
    "grad accum 1 and mini batch": (PPO + ["--reward-fn", "vader", "--batch-size", 2, "--grad-accum", 1,
                                           "--mini-batch-size", 4],  # 1 given, not the default: a contradiction
                                    r"--grad-accum 1 x --batch-size 2 contradicts --mini-batch-size 4, which sets "
                                    r"--grad-accum; pass one of them"),
    "vf coef with a critic": (PPO + ["--reward-model", "{w}/rm", "--vf-coef", 0.5],
                              r"--vf-coef weighs the value head's loss in the policy's; the critic of --critic-model "
                              r".*rm has a loss and optimizer of its own \(--value-lr\)"),
    "offload without zero": (["--offload"], r"--offload moves ZeRO's partitions to the CPU: it needs --zero-stage 1, "
                                            r"2 or 3"),
    "ds not UTF-8": (["--deepspeed_config", "{w}/latin1_ds.json"], r"latin1_ds\.json: 'utf-8' codec can't decode"),
    "ds stage a string": (["--deepspeed_config", "{w}/stage_ds.json", "--stage", "dpo"],  # dpo reads it first
                          r"stage_ds\.json: zero_optimization\.stage '2'; expected 0, 1, 2 or 3"),
    "ds clipping a string": (["--deepspeed_config", "{w}/clip_ds.json"],
                             r"clip_ds\.json: gradient_clipping '1\.0'; expected a number >= 0 \(0: none\)$"),
    "ds clipping a bool": (["--deepspeed_config", "{w}/true_ds.json"],
                           r"true_ds\.json: gradient_clipping True; expected a number >= 0"),
    "ds key misspelt": (["--deepspeed_config", "{w}/typo_ds.json"],
                        r"typo_ds\.json: zero_optimisation: not a key DeepSpeed reads \(a typo\? another kind of file\?\)"),
    "ds a model's config": (["--deepspeed_config", "{w}/model/config.json"],
                            r"config\.json: .*architectures.*: not a key DeepSpeed reads"),
    "ds offload at stage 0": (["--deepspeed_config", "{w}/offload_ds.json"],
                              r"offload_ds\.json: zero_optimization\.offload_optimizer at ZeRO stage 0, which has no "
                              r"partitions to offload; pass --zero-stage 1, 2 or 3"),
    "ds clipping NaN": (["--deepspeed_config", "{w}/negative_clip_ds.json"],
                        r"negative_clip_ds\.json: gradient_clipping nan; expected a number >= 0"),
    "ds optimizer without a type": (["--deepspeed_config", "{w}/typeless_ds.json"],
                                    r"typeless_ds\.json: optimizer type None; expected a name, e\.g\. \"AdamW\""),
    "ds betas": (["--deepspeed_config", "{w}/betas_ds.json"], r"betas_ds\.json: optimizer betas '0\.9'; expected two "
                                                             r"numbers in \[0, 1\)"),
    "ds weight decay": (["--deepspeed_config", "{w}/decay_ds.json"],
                        r"decay_ds\.json: optimizer weight_decay '0\.1'; expected a number >= 0"),
    "ds steps_per_print": (["--deepspeed_config", "{w}/print_ds.json"],
                           r"print_ds\.json: steps_per_print 'x'; expected a whole number > 0, or null"),
    "text beside a prompt": (["--dataset", "{w}/prompt_text.jsonl"],
                             r"prompt_text\.jsonl: row 1: a row with a 'prompt' needs its reply in 'response' \(or "
                             r"'chosen'\); 'text' is read only in rows without a prompt"),
    "a file of columns": (["--dataset", "{w}/columns.json"],  # its value cut short, not 500 prompts in one line
                          r"columns\.json: row 1: column 'prompt' is \['the film was', .{0,100}\.\.\.\]; expected text$"),
    "a template that does not parse": (["--model", "{w}/bad_template"],
                                       r"--model .*bad_template: cannot load its tokenizer \(its chat template does "
                                       r"not parse \(unexpected '}', line 1\)\)"),
    "ds scheduler": (["--deepspeed_config", "{w}/sched_ds.json"],
                     r"sched_ds\.json: a scheduler section; leave it out, train\.py's lr decays linearly to 0"),
    "ds checkpoint": (["--deepspeed_config", "{w}/ckpt_ds.json"],
                      r"ckpt_ds\.json: a checkpoint section; leave it out, train\.py writes each checkpoint under a "
                      r"temporary name"),
    "ds zero3 bad value": (["--deepspeed_config", "{w}/live_ds.json"],  # not "cannot load --model": its loading reads it
                           r"live_ds\.json: zero_optimization: stage3_max_live_parameters: Input should be a valid integer"),
    "stage flag at its default": (["--stage", "dpo", "--kl-coef", 0.1],  # a value that says nothing still
                                  r"--kl-coef: --stage dpo does not use it \(a flag of ppo, grpo, rloo\)"),
    "ds bf16 without --bf16": (["--deepspeed_config", "{w}/bf16_on_ds.json", "--stage", "dpo"],
                               r"bf16_on_ds\.json: bf16 is enabled; pass --bf16, which loads every model in bf16"),
    "ds not an object": (["--deepspeed_config", "{w}/list_ds.json"],
                         r"list_ds\.json: expected a JSON object, with objects for zero_optimization, optimizer, "
                         r"bf16, fp16 and optimizer\.params"),
    "ds bf16 not an object": (["--deepspeed_config", "{w}/bf16_ds.json", "--stage", "dpo"],
                              r"bf16_ds\.json: expected a JSON object, with objects for zero_optimization"),
    "ds params not an object": (["--deepspeed_config", "{w}/params_ds.json"],
                                r"params_ds\.json: expected a JSON object, with objects for .* and optimizer\.params"),
    "ds lr": (["--deepspeed_config", "{w}/lr_ds.json"],
              r"lr_ds\.json: optimizer lr 0\.5 contradicts --lr 1e-05; leave it out, train\.py fills it"),
    "output is the model": (["--output", "{w}/model"], r"--output .*model is the --model folder, which the run "
                                                         r"would write over; choose another --output"),
    "output is the reference": (["--stage", "dpo", "--ref-model", "{w}/rm", "--output", "{w}/rm"],
                                r"--output .*rm is the --ref-model folder, which the run would write over"),
    "output is the reward model": (PPO + ["--reward-model", "{w}/rm", "--output", "{w}/rm"],
                                   r"--output .*rm is the --reward-model folder, which the run would write over"),
    "output is the critic": (PPO + ["--reward-fn", "err_rewards:boom", "--critic-model", "{w}/rm", "--output", "{w}/rm"],
                             r"--output .*rm is the --critic-model folder, which the run would write over"),
    "output's args.json unwritable": (["--output", "{w}/blocked_run"], r"--output .*blocked_run: cannot write "
                                      r"args\.json and metrics\.jsonl there \(\[Errno 21\] Is a directory"),
    "output is a file": (["--output", "{w}/a_file"], r"--output .*a_file is a file; expected a directory"),
    "reward fn exits": (PPO + ["--reward-fn", "err_rewards:leave"], r"--reward-fn err_rewards:leave raised SystemExit: bye"),
    "reward fn without return": (PPO + ["--reward-fn", "err_rewards:forgot"],
                                 r"--reward-fn err_rewards:forgot returned None; expected a list of 4 numbers"),
    "reward fn module exits": (PPO + ["--reward-fn", "exits:f"],
                               r"--reward-fn exits:f: cannot import \(SystemExit: usage: exits\.py \[-h\]\)"),
    "not a number": (["--batch-size", "x"], r"argument --batch-size: invalid int value: 'x'"),
    "nan": (["--temperature", "nan"], r"argument --temperature: nan: expected a number >= 0\.001"),
    "temperature near 0": (PPO + ["--reward-fn", "vader", "--temperature", "1e-42"],
                           r"argument --temperature: 1e-42: expected a number >= 0\.001"),
    "a line not an object": (["--dataset", "{w}/list_line.jsonl"],
                             r"list_line\.jsonl: line 2: a JSON list; expected an object per line"),
    "inf": (["--epochs", "inf"], r"argument --epochs: inf: expected a number > 0"),
    "empty dataset name": (["--dataset", ""], r"argument --dataset: '': expected a path or name"),  # not the default
    "empty reward fn": (PPO + ["--reward-fn", ""], r"argument --reward-fn: '': expected a path or name"),
    "eval fraction for ppo": (PPO + ["--reward-fn", "vader", "--eval-fraction", 0.5],
                              r"--eval-fraction: --stage ppo does not use it \(a flag of sft, rm, dpo\)"),
    "null response": (["--dataset", "{w}/null_response.jsonl"],
                      r"null_response\.jsonl: row 2: column 'response' is None; expected text"),
    "a template refusing a system turn": (["--model", "{w}/strict_model", "--dataset", "{w}/system.jsonl",
                                           "--stage", "ppo", "--reward-fn", "vader", "--rollout-batch-size", 2,
                                           "--batch-size", 1],
                                          r"system\.jsonl: row 1: .*strict_model's chat template refuses these "
                                          r"messages \(System role not supported\)"),
    "a reward model's template refusing the prompts": (
        ["--model", "{w}/chat_model", "--dataset", "{w}/system.jsonl", "--stage", "ppo", "--reward-model",
         "{w}/strict_rm", "--critic-model", "head", "--rollout-batch-size", 2, "--batch-size", 1],
        r"system\.jsonl: --reward-model .*strict_rm: .*strict_rm's chat template refuses these messages \(System "
        r"role not supported\); the prompt: "),
    "model an unfinished run": (["--model", "{w}/ckpt_run"], r"--model .*ckpt_run: a train\.py run without its final "
                                                            r"model \(checkpoints only\); train\.py --resume finishes it"),
    "model a file": (["--model", "{w}/pref.jsonl"], r"--model .*pref\.jsonl: a file; expected a model folder or a Hub name"),
    "output a model": (["--output", "{w}/rm"], r"--output .*rm holds a model that no train\.py run wrote, which the "
                                                  r"run would write over; choose another --output"),
    "model a PEFT adapter": (["--model", "{w}/adapter"], r"--model .*adapter: a PEFT adapter, not a whole model; merge "
                                                         r"it into its base model .*and pass that folder"),
    "config of the wrong type": (["--model", "{w}/typed_config"], r"--model .*typed_config: .*\(Validation error for "
                                                                  r"field 'hidden_size': TypeError: Field "
                                                                  r"'hidden_size' expected int"),  # the line after
    "model an empty folder": (["--model", "{w}/empty_dir"], r"--model .*empty_dir: not a model folder \(no config\.json\)$"),
    "model a tokenizer alone": (["--model", "{w}/tokenizer_only"],
                                r"--model .*tokenizer_only: not a model folder \(no config\.json\)$"),
    "model without tokenizer files": (["--model", "{w}/no_tokenizer"],
                                      r"--model .*no_tokenizer: cannot load its tokenizer \(an empty tokenizer that "
                                      r"encodes text to no tokens: what transformers loads from a folder without "
                                      r"tokenizer files; expected tokenizer\.json, vocab\.json or the like\)$"),
    "config damaged": (["--model", "{w}/bad_config"], r"--model .*bad_config: cannot load its tokenizer \(It looks like "
                                                      r"the config file at .*config\.json' is not a valid JSON file"),
    "tokenizer damaged": (["--model", "{w}/bad_tokenizer"], r"--model .*bad_tokenizer: cannot load its tokenizer \(invalid type: "
                                                           r"integer `5`, expected a map"),
    "config not the weights": (["--model", "{w}/other_config"], r"--model .*other_config: cannot load as a causal LM "
                                                                r"\(You set `ignore_mismatched_sizes` to `False`"),
    "weights cut short": (["--model", "{w}/cut_model"], r"--model .*cut_model: cannot load as a causal LM \("),
    "ppo with one response per rank": (PPO + ["--reward-fn", "vader", "--rollout-batch-size", 1, "--batch-size", 1],
                                       r"--rollout-batch-size 1: --stage ppo whitens the advantages over each "
                                       r"rank's responses, at least 2 of them"),
    "weights an empty file": (["--model", "{w}/empty_bin"], r"--model .*empty_bin: cannot load as a causal LM "
                                                            r"\(EOFError\(\)\)"),
    "epochs past any step count": (["--epochs", "1e308"], r"argument --epochs: 1e308: expected a number > 0 and "
                                                          r"<= 1000000$"),
    "reward fn without a function": (PPO + ["--reward-fn", "err_rewards"],
                                     r"--reward-fn err_rewards: expected MODULE:FUNCTION \(or vader\)"),
    "reward fn without a name": (PPO + ["--reward-fn", "err_rewards:"],
                                 r"--reward-fn err_rewards:: expected MODULE:FUNCTION \(or vader\)"),
    "lora all-linear and names": (["--lora-rank", 2, "--lora-targets", "all-linear,q_proj"],
                                  r"--lora-targets all-linear,q_proj: all-linear adapts every projection; pass it "
                                  r"alone, or names alone"),
    "lora names and all-linear": (["--lora-rank", 2, "--lora-targets", "q_proj,all-linear"],  # not only first
                                  r"--lora-targets q_proj,all-linear: all-linear adapts every projection"),
    "lora targets without rank": (["--lora-targets", "q_proj"], r"--lora-alpha and --lora-targets shape LoRA adapters: "
                                                                r"pass --lora-rank R > 0 with them"),
    "both rewards": (PPO + ["--reward-model", "{w}/rm", "--reward-fn", "vader"],
                     r"--stage ppo needs exactly one of --reward-model DIR or --reward-fn MODULE:FUNCTION"),
    "whiten rewards for grpo": (["--stage", "grpo", "--reward-fn", "err_rewards:boom", "--whiten-rewards"],
                                r"--whiten-rewards: --stage grpo does not use it \(a flag of ppo\)"),
    "reward model tokenizer without EOS": (PPO + ["--reward-model", "{w}/no_eos"],
                                           r"--reward-model .*no_eos: unusable tokenizer \(.*has no EOS token\)"),
    "a LoRA policy's reference reading other tokens": (["--stage", "dpo", "--lora-rank", 2, "--ref-model",
                                                        "{w}/chat_model"],  # --ref-model, not the adapters off
                                                       r"--ref-model .*chat_model: a tokenizer other than --model's"),
    "critic without a score head": (PPO + ["--reward-fn", "vader", "--critic-model", "{w}/model"],
                                    r"--critic-model .*model: cannot load as a reward model \(not a reward model"),
    "reward fn not callable": (PPO + ["--reward-fn", "err_rewards:threshold"],
                               r"--reward-fn err_rewards:threshold: not callable$"),
    "ds stage a bool": (["--deepspeed_config", "{w}/bool_stage_ds.json"],  # True == 1, but no stage
                        r"bool_stage_ds\.json: zero_optimization\.stage True; expected 0, 1, 2 or 3"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_early_with_one_line(name, w, tmp_path, capsys, monkeypatch):
    flags, message = CASES[name]
    argv = ["--stage", "sft", "--model", "{w}/model", "--dataset", "{w}/pref.jsonl", "--output", str(tmp_path / "run")]
    argv += [str(f) for f in flags]
    monkeypatch.chdir(w)
    with pytest.raises(SystemExit) as exit_info:
        train.main([a.format(w=w) for a in argv])
    assert_one_error_line(exit_info, capsys, message)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")  # nothing was trained or saved


EVAL_CASES = {  # eval.py: name -> (flags, the one line expected on stderr), all before any sampling
    "policy missing": (["--policy", "{w}/nope"], r"--policy .*nope: "),
    "policy a reward model": (["--policy", "{w}/tied_rm"], r"--policy .*tied_rm: not a causal LM checkpoint: a reward "
                                                          r"model \(it has a score head\)"),
    "a critic as the reward model": (["--reward-model", "{w}/critic"], r"--reward-model .*critic: a PPO critic"),
    "reward model without head": (["--reward-model", "{w}/model"],
                                  r"--reward-model .*model: not a reward model: it has no trained score head"),
    "prompts without prompts": (["--prompts", "{w}/cols.jsonl"],
                                r"--prompts .*cols\.jsonl: expected \{prompt\} rows; found columns \['question', "
                                r"'answer'\]"),
    "base of other tokens": (["--base", "{w}/chat_model"], r"--base .*chat_model: a tokenizer other than --policy's, "
                                                           r"so the KL would compare log-probs of other tokens"),
    "prompt a number": (["--prompts", "{w}/num_prompt.jsonl"], r"--prompts .*num_prompt\.jsonl: row 1: the prompt is 4; "
                                                               r"expected text or chat messages"),
    "chat prompts, no template": (["--prompts", "{w}/chat_prompt.jsonl"],
                                  r"--prompts .*chat_prompt\.jsonl: --policy .*model: chat messages, but .*model has "
                                  r"no chat template to write them; the prompt: "),
    "base past its positions": (["--base", "{w}/short", "--max-new-tokens", "16"],
                                r"--base .*short: 16 positions, fewer than the \d+ tokens of the longest prompt and "
                                r"answer; lower --max-new-tokens or shorten the prompts"),
    "prompts missing": (["--prompts", "{w}/nope.jsonl"], r"--prompts .*nope\.jsonl: no such file"),
    "json the prompts": (["--json", "{w}/pref.jsonl"], r"--json .*pref\.jsonl is the --prompts file, which it would "
                                                       r"write over"),
    "empty json name": (["--json", ""], r"argument --json: '': expected a path or name"),
    "base narrower than the policy": (["--policy", "{w}/wide"], r"--base .*model: \d+ token embeddings, fewer than the "
                                                               r"\d+ token ids it reads \(the policy can sample\)"),
    "policy narrower than its tokenizer": (["--policy", "{w}/narrow", "--base", "{w}/narrow"],
                                           r"--policy .*narrow: \d+ token embeddings, fewer than .*its tokenizer has"),
    "no samples": (["--samples", "0"], r"argument --samples: 0: expected a number >= 1 and <= 1024"),
    "samples past memory": (["--samples", str(10**12)], r"--samples: 1000000000000: expected a number >= 1 and <= 1024"),
    "temperature near 0": (["--temperature", "1e-42"], r"argument --temperature: 1e-42: expected a number >= 0\.001"),
    "negative seed": (["--seed", "-1"], r"argument --seed: -1: expected a number >= 0 and <= 4294967295"),
    "json not writable": (["--json", "{w}/a_file/eval.json"], r"--json .*a_file/eval\.json: cannot write there "
                                                              r"\(Not a directory\)"),
    "json a directory": (["--json", "{w}"], r"--json .* is a directory; expected a file name"),
    "a template refusing a system turn": (["--policy", "{w}/strict_model", "--base", "{w}/strict_model", "--prompts",
                                           "{w}/system.jsonl"], r"--prompts .*system\.jsonl: --policy .*strict_model: "
                                                                r".*chat template refuses these messages"),
    "a reward model's template refusing the prompts": (
        ["--policy", "{w}/chat_model", "--base", "{w}/chat_model", "--prompts", "{w}/system.jsonl", "--reward-model",
         "{w}/strict_rm"], r"--prompts .*system\.jsonl: --reward-model .*strict_rm: .*refuses these messages"),
    "policy an unfinished run": (["--policy", "{w}/ckpt_run"], r"--policy .*ckpt_run: a train\.py run without its "
                                                               r"final model \(checkpoints only\)"),
    "policy a PEFT adapter": (["--policy", "{w}/adapter"], r"--policy .*adapter: a PEFT adapter, not a whole model"),
    "policy tokenizer damaged": (["--policy", "{w}/bad_tokenizer"], r"--policy .*bad_tokenizer: invalid type"),
    "weights cut short": (["--policy", "{w}/cut_model"], r"--policy .*cut_model: Error while deserializing header"),
    "json a policy's file": (["--json", "{w}/model/config.json"], r"--json .*model/config\.json: inside --policy "
                                                                  r".*model, where only eval\.json may be written; "
                                                                  r"choose another file"),
    "json in the base": (["--policy", "{w}/tied", "--json", "{w}/model/metrics.jsonl"],
                         r"--json .*model/metrics\.jsonl: inside --base .*model, which it only reads"),
    "json in the reward model": (["--reward-model", "{w}/rm", "--json", "{w}/rm/model.safetensors"],
                                 r"--json .*rm/model\.safetensors: inside --reward-model .*rm, which it only reads"),
    "policy without tokenizer files": (["--policy", "{w}/no_tokenizer", "--base", "{w}/no_tokenizer"],
                                       r"--policy .*no_tokenizer: an empty tokenizer that encodes text to no tokens: "
                                       r"what transformers loads from a folder without tokenizer files"),
    "policy without tokenizer files, llama": (["--policy", "{w}/llama_no_tokenizer"],  # the list after the colon
                                              r"--policy .*llama_no_tokenizer: Couldn't instantiate the backend "
                                              r"tokenizer from one of: \(1\) a `tokenizers` library serialization "
                                              r"file, .*\(3\) .*\.$"),
    "policy an empty folder": (["--policy", "{w}/empty_dir"], r"--policy .*empty_dir: not a model folder \(no "
                                                              r"config\.json\)$"),
    "base a tokenizer alone": (["--base", "{w}/tokenizer_only"], r"--base .*tokenizer_only: not a model folder \(no "
                                                                 r"config\.json\)$"),
    "the run's temperature garbled": (["--policy", "{w}/hot_run"], r".*hot_run/args\.json: temperature: invalid float "
                                                                   r"value: 'hot'; pass --temperature"),
}


@pytest.mark.parametrize("name", list(EVAL_CASES))
def test_eval_bad_input_fails_with_one_line(name, w, capsys, monkeypatch):
    flags, message = EVAL_CASES[name]
    argv = ["--policy", "{w}/model", "--base", "{w}/model", "--prompts", "{w}/pref.jsonl", *flags]
    monkeypatch.setattr(eval_py, "seeded_sample", None)  # reaching the sampling would be a TypeError
    with pytest.raises(SystemExit) as exit_info:
        eval_py.main([a.format(w=w) for a in argv])
    assert_one_error_line(exit_info, capsys, message)


def test_eval_as_a_process_prints_only_its_error_line(w):
    """No library banner before it: eval.py does not import deepspeed, whose import announces the accelerator."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--policy", str(w / "nope")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --policy {w / 'nope'}: " + proc.stderr.split(": ", 2)[2].strip()]
    assert proc.stdout == ""


def assert_one_error_line(exit_info, capsys, message):
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert __import__("re").search(message, err[0]), err[0]


def returning(out):
    """A reward function that returns `out`."""
    def fn(prompts, responses):
        return out
    return fn


def test_reward_function_scores_are_checked_one_by_one():
    """A reward function may return numbers of any kind, numpy's, or a tensor (of one-element tensors); not a
    dict (whose list is its keys), an int past any float, or a float past float32's range (the scores' dtype)."""
    reward = RewardFunction("--reward-fn", "vader")
    for returned in ([0.5, 2], np.array([0.5, 2.0]), torch.tensor([0.5, 2.0]), [torch.tensor(0.5), np.int64(2)],
                     torch.tensor([[0.5], [2.0]])):  # the last: one-element tensors of one dimension
        reward.fn = returning(returned)
        assert reward.checked_call(["a", "b"], ["x", "y"])[0].tolist() == [0.5, 2.0]
    for returned, error in [({0: 0.9, 1: 0.9}, r"returned \{0: 0\.9, 1: 0\.9\}; expected a list of 2 numbers"),
                            ({0.5, 2.0}, r"returned \{.*\}; expected a list of 2 numbers"),  # a set: in no order
                            ([0.5, 2.0, 1.0], r"returned 3 scores for 2 responses"),  # more is wrong too
                            ([True, 0.5], r"score 0 is True; expected a finite number"),  # not 1.0
                            ([10**400, 0], r"score 0 is 1000.*; expected a finite number"),
                            ([0, 1e39], r"score 1 is 1e\+39; expected a finite number \(float32: \|x\| < 3\.4e38\)"),
                            (torch.tensor(0.5), r"returned tensor\(0\.5000\); expected a list of 2 numbers"),  # 0-d
                            (np.array(0.5), r"returned array\(0\.5\); expected a list of 2 numbers")]:
        reward.fn = returning(returned)
        assert re.search(error, reward.checked_call(["a", "b"], ["x", "y"])[1])

    def two_lines(prompts, responses):
        raise ValueError("1 validation error for Scores\nscore: input should be a number")
    reward.fn = two_lines  # a message of several lines: one line, its first, joined at a colon
    assert reward.checked_call(["a"], ["x"])[1] == ("--reward-fn vader raised ValueError: 1 validation error for "
                                                     "Scores")


def test_a_longest_sequence_of_exactly_the_positions_fits(w, capsys):
    """A model of 16 positions reads a run whose longest sequence is 16 tokens; one of 17 is the one line."""
    from minrlhf.cli import quiet_libraries
    quiet_libraries()  # as train.py: no progress bars
    load_model("--model", str(w / "short"), make_tokenizer(), False, longest=16)
    with pytest.raises(SystemExit) as exit_info:
        load_model("--model", str(w / "short"), make_tokenizer(), False, longest=17)
    assert_one_error_line(exit_info, capsys, r"--model .*short: 16 positions, fewer than the 17 tokens of the run's "
                                             r"longest sequence")


def test_longrope_reads_its_original_range_alike_in_every_batch(tmp_path, capsys):
    """Phi-3.5's LongRoPE: transformers rotates every row of a batch by the long factors once one row is longer
    than the original range (4096 there, 16 here), so a short row's log-probs would depend on its neighbours
    (3.6e-4 in float64): a run longer than that range is refused, as one past a model's positions."""
    from minrlhf.cli import quiet_libraries
    quiet_libraries()  # as train.py: no progress bars
    path = save_tiny("phi3", tmp_path, config={"original_max_position_embeddings": 16, "rope_scaling": {
        "rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [4.0] * 4}})
    load_model("--model", path, make_tokenizer(), False, longest=16)
    with pytest.raises(SystemExit) as exit_info:
        load_model("--model", path, make_tokenizer(), False, longest=17)
    assert_one_error_line(exit_info, capsys, r"--model .*: 16 positions, fewer than the 17 tokens")


def test_a_template_that_parses_loads_whatever_it_refuses(tmp_path):
    """Loading renders the chat template once to find one that does not parse; one that refuses that user turn
    alone (it wants a system turn first) is the rows' to meet, not the tokenizer's fault."""
    from minrlhf.models import load_tokenizer_of
    tokenizer = make_tokenizer(chat_template=True)
    tokenizer.chat_template = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system turn first') }}"
                               "{% endif %}{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}")
    tokenizer.save_pretrained(tmp_path)
    assert load_tokenizer_of(str(tmp_path)).chat_template == tokenizer.chat_template


def test_quiet_libraries_silences_the_hub_clients_retry_warnings():
    """Offline, a --model name that is no local folder makes the Hub client log each retry on stderr."""
    code = ("from minrlhf.cli import quiet_libraries; quiet_libraries(); from huggingface_hub.utils import logging; "
            "logging.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


# a process's environment without the user's Hub choices (offline mode, proxies) or a run's rank (ENV)
NO_HUB_CHOICE = {k: v for k, v in ENV.items() if k not in minrlhf.offline.SET_BY_USER}


@pytest.mark.parametrize("endpoint, chosen, offline", [
    ("https://no-such-host.invalid", {}, "True"),  # .invalid never resolves (RFC 2606): no network to the Hub
    ("http://localhost:9", {}, "False"),  # resolves: the Hub client tries it as it would
    ("https://no-such-host.invalid", {"HF_HUB_OFFLINE": "0"}, "False"),  # the user's choice stands
    ("https://no-such-host.invalid", {"HTTPS_PROXY": "http://localhost:9"}, "False")])  # a proxy may reach it
def test_hub_offline_mode_where_the_hub_does_not_resolve(endpoint, chosen, offline):
    """Offline, huggingface_hub retries each request for ~23 s before the cache or an error: importing
    minrlhf turns its offline mode on first where the Hub's host does not resolve (minrlhf/offline.py)."""
    code = "import minrlhf, transformers, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**NO_HUB_CHOICE, "HF_ENDPOINT": endpoint, **chosen})
    assert proc.stdout.strip() == offline, proc.stderr


def test_a_hub_name_without_the_hub_is_one_line(tmp_path):
    """train.py with a --model that is no local folder and a Hub that does not resolve: the one line, from the
    cache lookup of offline mode (before: after ~46 s of retries)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--stage", "sft", "--model",
                           "no-such-org/no-such-model"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**NO_HUB_CHOICE, "HF_ENDPOINT": "https://no-such-host.invalid"})
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: --model no-such-org/no-such-model: cannot load its tokenizer ("), lines


PLOT_CASES = {  # plot.py: name -> (run folders, flags, the one line expected on stderr)
    "missing": (["missing"], [], r"missing/metrics\.jsonl: No such file or directory; expected the metrics of a "
                                 r"train\.py run"),
    "sft": (["sft"], [], r"sft: no reward, kl or gold logged; plot\.py draws the runs of --stage ppo, grpo or rloo"),
    "broken": (["broken"], [], r"broken/metrics\.jsonl: line 2: malformed JSON \(Expecting property name .*\); "
                               r"expected the metrics of a train\.py run"),
    "no step": (["no_step"], [], r"no_step/metrics\.jsonl: line 1: a line without a step"),
    "nothing logged yet": (["empty"], [], r"empty/metrics\.jsonl: no step logged yet"),
    "a value not a number": (["text_value"], [], r"text_value/metrics\.jsonl: line 2: a value that is not a number"),
    "default out a directory": (["png_dir"], [], r"png_dir/ppo\.png: cannot write the plot there \(Is a directory\); "
                                                 r"pass --out"),
    "a run without gold or eval.json": (["gold", "sft"], [], r"/sft: no gold logged and no \S*/sft/eval\.json; run "
                                                             r"eval\.py --policy \S*/sft --json \S*/sft/eval\.json first$"),
    "broken eval.json": (["bad_eval", "sft"], [], r"bad_eval/eval\.json: KeyError: 'kl'; expected the figures of "
                                                  r"eval\.py --json"),
    "eval.json of text": (["gold", "text_eval"], [], r"text_eval/eval\.json: kl '1e309', gold True; expected "
                                                      r"finite numbers, as eval\.py --json writes them$"),
    "eval.json of NaN": (["gold", "nan_eval"], [], r"nan_eval/eval\.json: kl nan, gold 0\.5; expected finite numbers"),
    "eval.json of another policy": (["gold", "other_eval"], [], r"other_eval/eval\.json: the figures of eval\.py "
                                                                r"--policy \S*/gold, not of \S*/other_eval; run "
                                                                r"eval\.py --policy \S*/other_eval --json"),
    "out not an image": (["sft"], ["--out", "x.txt"], r"--out x\.txt: expected an image file name ending in \.png"),
    "out not writable": (["sft"], ["--out", "{t}/a_file/x.png"], r"--out .*a_file/x\.png: cannot write there"),
}


@pytest.mark.parametrize("name", list(PLOT_CASES))
def test_plot_bad_input_fails_with_one_line(name, tmp_path, capsys):
    import plot
    metrics = {"sft": '{"step": 1, "loss": 2.0}\n', "broken": '{"step": 1, "kl": 1.0}\n{"step": 2, oops\n', "no_step": '{"loss": 2.0}\n',
               "bad_eval": '{"step": 1, "loss": 2.0}\n', "empty": "",
               "text_value": '{"step": 1, "reward": 1.0}\n{"step": 2, "reward": "1.0"}\n',
               "png_dir": '{"step": 1, "reward": 1.0}\n', "gold": '{"step": 1, "kl": 0.5, "gold": 0.5}\n',
               "other_eval": '{"step": 1, "kl": 0.5, "gold": 0.5}\n'}
    for run, text in metrics.items():
        os.makedirs(tmp_path / run)
        (tmp_path / run / "metrics.jsonl").write_text(text)
    (tmp_path / "bad_eval" / "eval.json").write_text('{"gold": 0.5}')
    for run, figures in {"text_eval": '{"kl": "1e309", "gold": true}', "nan_eval": '{"kl": NaN, "gold": 0.5}'}.items():
        os.makedirs(tmp_path / run)
        (tmp_path / run / "eval.json").write_text(figures)
    (tmp_path / "other_eval" / "eval.json").write_text(json.dumps({"policy": str(tmp_path / "gold"), "kl": 1.0,
                                                                   "gold": 0.6}))  # eval.py --json's of gold
    os.makedirs(tmp_path / "png_dir" / "ppo.png")
    (tmp_path / "a_file").write_text("not a directory")
    runs, flags, message = PLOT_CASES[name]
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(tmp_path / run) for run in runs] + [f.format(t=tmp_path) for f in flags])
    assert_one_error_line(exit_info, capsys, message)


def test_a_second_run_on_one_output_fails_with_one_line(tmp_path, capsys):
    from minrlhf.run import lock_output
    first = lock_output(str(tmp_path))  # as the run in that folder holds it
    with pytest.raises(SystemExit) as exit_info:
        lock_output(str(tmp_path))
    assert_one_error_line(exit_info, capsys, r"--output .*: another run is writing there; wait for it to end, or "
                                             r"choose another --output")
    first.close()  # that run ends: the folder is free
    lock_output(str(tmp_path)).close()
