"""PPO peer for bench/bench.py: Hugging Face TRL 0.24.0's PPOTrainer on the same setup, timed per phase.

    bench/.venv-trl024/bin/python bench/trl_ppo_peer.py --model DIR --prompts FILE.jsonl --updates 3 \
        [--rollout-batch-size 8 --new-tokens 32 --ppo-epochs 4 --lr 1e-5 --threads 2 --bf16]
        [--lora-rank 16 --gradient-checkpointing]

Four models, as TRL's PPO requires: policy and reference (AutoModelForCausalLM of DIR), value and reward
(AutoModelForSequenceClassification of DIR, num_labels=1, fresh score heads, seed 0). One mini-batch of
the whole rollout, fp32 (or bf16 autocast: --bf16), stop at EOS (stop_token="eos"), temperature 1.0, linear lr
decay (TRL's default). --lora-rank R: a peft LoRA (alpha 2R, no dropout) on the seven attention and MLP
projections of the policy, whose reference is then the policy with its adapters off (TRL passes no
ref_model); TRL's value model stays a full, fully trained network.
Pad token: <|endoftext|>, not SmolLM2's <|im_end|> (= EOS), which TRL would mask everywhere.

train() is one loop, so phases are timed by wrapping what it calls and summed per update:
  generate       trl's batch_generation (policy.generate; the rollout log-probs come from its scores)
  forwards       no-grad rollout forwards: reference `forward` + `get_reward` of value and reward model
  train_forward  `forward` with grad enabled in the PPO epochs (policy + value backbone)
  backward       accelerator.backward
  optimizer      optimizer.step + optimizer.zero_grad
An update starts when train() asks the dataloader for its batch and ends when it asks for the next one
(the last one: when train() returns), so update_seconds includes TRL's advantage/GAE code, logging and gc.
Prints one JSON line on stdout; everything else goes to stderr.
"""
import argparse
import json
import os
import platform
import resource
import sys
import time

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", required=True,
               help="model dir loadable by transformers 4.57 (the SmolLM2 -tf4 copy)")
p.add_argument("--reward-model",
               help="reward model dir, transformers-4 loadable (default: --model, fresh head)")
p.add_argument("--prompts", required=True, help="jsonl file with a 'prompt' column of plain strings")
p.add_argument("--updates", type=int, default=3, help="PPO updates (one rollout + its PPO epochs each)")
p.add_argument("--rollout-batch-size", type=int, default=8, help="prompts per rollout (= the one mini-batch)")
p.add_argument("--new-tokens", type=int, default=32, help="max new tokens per response (TRL response_length)")
p.add_argument("--ppo-epochs", type=int, default=4, help="PPO epochs over each rollout")
p.add_argument("--lr", type=float, default=1e-5, help="learning rate (decays linearly to 0, as in minrlhf)")
p.add_argument("--threads", type=int, default=2, help="torch CPU threads (also OMP_NUM_THREADS)")
p.add_argument("--seed", type=int, default=0, help="seed for score-head init, shuffling and sampling")
p.add_argument("--bf16", action="store_true",
               help="TRL's bf16=True: bf16 autocast, fp32 weights (default: fp32)")
p.add_argument("--lora-rank", type=int, default=0, help="peft LoRA rank of the policy (0: full fine-tuning)")
p.add_argument("--gradient-checkpointing", action="store_true", help="TRL's gradient_checkpointing=True")
args = p.parse_args()
os.environ["OMP_NUM_THREADS"] = str(args.threads)
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
import trl.trainer.ppo_trainer as ppo_mod  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

torch.set_num_threads(args.threads)
transformers.set_seed(args.seed)
sys.stdout, real_stdout = sys.stderr, sys.stdout  # TRL/transformers print to stdout: keep it for the JSON

tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
pad = "<|endoftext|>"
assert (pad in tok.get_vocab()
        and tok.convert_tokens_to_ids(pad) != tok.eos_token_id), "need a pad token != EOS"
tok.pad_token = pad
policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
# with LoRA, TRL takes no reference model: the policy with its adapters off is the reference
ref = None if args.lora_rank else AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
value, reward = (AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
                 for path in (args.model, args.reward_model or args.model))
for m in filter(None, (policy, ref, value, reward)):
    m.config.pad_token_id = tok.pad_token_id
policy.generation_config.pad_token_id = tok.pad_token_id

with open(args.prompts) as f:
    prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
ds = datasets.Dataset.from_list([{"input_ids": tok.apply_chat_template([{"role": "user", "content": q}],
                                                                       add_generation_prompt=True)}
                                 for q in prompts])

B = args.rollout_batch_size
cfg = trl.PPOConfig(
    output_dir="/tmp/trl_ppo_peer", report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1,
    disable_tqdm=True, use_cpu=True, bf16=args.bf16, fp16=False,
    gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
    learning_rate=args.lr, total_episodes=args.updates * B, per_device_train_batch_size=B,
    gradient_accumulation_steps=1, num_mini_batches=1, local_rollout_forward_batch_size=B,
    num_ppo_epochs=args.ppo_epochs, response_length=args.new_tokens, temperature=1.0, stop_token="eos",
    missing_eos_penalty=None, kl_coef=0.05, cliprange=0.2, vf_coef=0.1, num_sample_generations=0)
peft_config = None
if args.lora_rank:
    import peft
    peft_config = peft.LoraConfig(
        r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
trainer = trl.PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=ds, peft_config=peft_config)
trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

# ---- instrumentation -------------------------------------------------------------------------------
PHASES = ("generate", "forwards", "train_forward", "backward", "optimizer")
phases, starts, lengths = {k: [] for k in PHASES}, [], []


def timed(fn, phase):
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            name = phase(*a) if callable(phase) else phase
            phases[name][-1] += time.perf_counter() - t
    return wrapper


class MarkedLoader:
    """The trainer's dataloader; records when each batch (= each update) is asked for."""
    def __init__(self, dl):
        self.dl = dl

    def __len__(self):
        return len(self.dl)

    def __iter__(self):
        it = iter(self.dl)
        while True:
            t = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                return
            starts.append(t)
            for v in phases.values():
                v.append(0.0)
            yield batch


def generation(*a, **kw):
    query_responses, logits = real_batch_generation(*a, **kw)
    resp = query_responses[:, a[1].shape[1]:]  # a[1] = queries
    ended = resp == tok.eos_token_id
    lengths.extend(torch.where(ended.any(1), ended.int().argmax(1) + 1, resp.shape[1]).tolist())  # incl. EOS
    return query_responses, logits


real_batch_generation = ppo_mod.batch_generation
ppo_mod.batch_generation = timed(generation, "generate")
ppo_mod.forward = timed(ppo_mod.forward,
                        lambda *a: "train_forward" if torch.is_grad_enabled() else "forwards")
ppo_mod.get_reward = timed(ppo_mod.get_reward, "forwards")
trainer.accelerator.backward = timed(trainer.accelerator.backward, "backward")
trainer.optimizer.step = timed(trainer.optimizer.step, "optimizer")
trainer.optimizer.zero_grad = timed(trainer.optimizer.zero_grad, "optimizer")
trainer.dataloader = MarkedLoader(trainer.dataloader)

trainer.train()
end = time.perf_counter()
ends = starts[1:] + [end]
sys.stdout = real_stdout
print(json.dumps({
    "case": "ppo",
    "update_seconds": [round(e - s, 3) for s, e in zip(starts, ends)],
    "phases": {k: [round(x, 3) for x in v] for k, v in phases.items()},
    "trainable_params": trainable,
    "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    "response_length": sum(lengths) / len(lengths),  # generated tokens up to and including the first EOS
    "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                 "python": platform.python_version()},
    "settings": {"model": os.path.abspath(args.model), "updates": args.updates, "rollout_batch_size": B,
                 "new_tokens": args.new_tokens, "ppo_epochs": args.ppo_epochs, "num_mini_batches": 1,
                 "lr": args.lr, "lr_scheduler": cfg.lr_scheduler_type.value, "optim": cfg.optim.value,
                 "adam_betas": [cfg.adam_beta1, cfg.adam_beta2],
                 "threads": torch.get_num_threads(), "dtype": "bf16 autocast" if args.bf16 else "float32",
                 "temperature": 1.0, "stop_token": "eos",
                 "pad_token": pad, "kl_coef": 0.05, "cliprange": 0.2, "vf_coef": 0.1, "seed": args.seed,
                 "lora_rank": args.lora_rank, "gradient_checkpointing": args.gradient_checkpointing,
                 "grad_clipping": "none (TRL 0.24 PPO never clips; max_grad_norm unused)"},
}), flush=True)
