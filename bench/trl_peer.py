"""Hugging Face TRL peer for minrlhf's benchmarks (CPU, fp32). Run inside bench/.venv-trl:

    PY=bench/.venv-trl/bin/python M=~/.cache/minrlhf/SmolLM2-135M-Instruct
    $PY bench/trl_peer.py sft --model $M --data sft.jsonl --steps 3   # rows {"text"}
    $PY bench/trl_peer.py rm  --model $M --data rm.jsonl  --steps 3   # rows {"prompt", "chosen", "rejected"}
    $PY bench/trl_peer.py rm-hh --model $M --hh /work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz

sft/rm time each optimizer step (SFTTrainer / RewardTrainer) with a callback; rm-hh trains a reward model for
one epoch on HH-RLHF pairs and scores held-out pairs before and after. Each prints ONE JSON line on stdout
(logs: stderr). TRL configs default to bf16=True and gradient_checkpointing=True even on CPU, so every setting
is given explicitly: fp32, or bf16 autocast with --bf16 (weights stay fp32; held-out pairs are scored in fp32
either way).
"""
import argparse
import gzip
import json
import resource
import sys
import tempfile
import time

OUT, sys.stdout = sys.stdout, sys.stderr  # stdout carries only the JSON line; HF/TRL prints go to stderr

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer  # noqa: E402


class StepTimer(TrainerCallback):
    """Wall time and non-pad tokens (TRL's own attention_mask count) of each optimizer step."""

    def __init__(self):
        self.seconds, self.tokens, self.trainer, self._seen = [], [], None, 0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(round(time.perf_counter() - self._t0, 4))
        total = self.trainer._total_train_tokens  # summed attention_mask of the step's batch, kept by TRL
        self.tokens.append(total - self._seen)
        self._seen = total


def tokenizer_for(model_dir):
    """The model's tokenizer with a pad token distinct from EOS (<|endoftext|> if pad == EOS; no resize)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad_was_eos = tok.pad_token is None or tok.pad_token_id == tok.eos_token_id
    if pad_was_eos:
        if "<|endoftext|>" not in tok.get_vocab():
            sys.exit("pad token equals EOS and <|endoftext|> is not in the vocab")
        tok.pad_token = "<|endoftext|>"
    return tok, {"pad_token": tok.pad_token, "pad_id": tok.pad_token_id, "eos_token": tok.eos_token,
                 "eos_id": tok.eos_token_id, "pad_was_eos": pad_was_eos}


def config_kwargs(args, max_steps):
    """Settings shared by SFTConfig and RewardConfig, all explicit (TRL's defaults differ from Trainer's)."""
    return dict(output_dir=tempfile.mkdtemp(prefix="trl-peer-"), use_cpu=True, bf16=args.bf16, fp16=False,
                gradient_checkpointing=False, per_device_train_batch_size=args.batch_size,
                gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="linear",
                warmup_steps=0, optim=args.optim, weight_decay=0.0, max_grad_norm=1.0, seed=0, data_seed=0,
                num_train_epochs=1, max_steps=max_steps if max_steps else -1, max_length=args.max_length,
                dataloader_num_workers=0, report_to="none", eval_strategy="no", save_strategy="no",
                logging_steps=1, disable_tqdm=True)


def settings(trainer, model, extra):
    a = trainer.args
    keys = ["bf16", "fp16", "gradient_checkpointing", "per_device_train_batch_size",
            "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_steps", "optim",
            "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "seed", "max_steps",
            "num_train_epochs", "max_length", "use_cpu", "dataloader_num_workers", "packing", "padding_free",
            "truncation_mode", "loss_type", "disable_dropout"]
    out = {k: str(getattr(a, k)) if k in ("optim", "lr_scheduler_type") else getattr(a, k)
           for k in keys if hasattr(a, k)}
    out.update(param_dtype=str(next(model.parameters()).dtype),
               attn_implementation=model.config._attn_implementation,
               device=str(a.device), threads=torch.get_num_threads(), **extra)
    return out


def train(trainer, timer):
    timer.trainer = trainer
    trainer.add_callback(timer)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


def encode(tok, text, max_length):
    """Token ids of text + EOS keeping the LAST max_length (the reward is read at the end)."""
    return (tok(text)["input_ids"] + [tok.eos_token_id])[-max_length:]


def reward_trainer(args, tok, pairs, max_steps):
    """RewardTrainer on pre-tokenized pairs: `chosen_ids`/`rejected_ids` columns skip TRL's own tokenization
    (which keeps the start and then DROPS any pair longer than max_length instead of truncating it)."""
    torch.manual_seed(0)  # the score head is freshly initialised
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id  # seq-cls reads the score at the last non-pad token
    data = datasets.Dataset.from_dict({"chosen_ids": [encode(tok, c, args.max_length) for c, _ in pairs],
                                       "rejected_ids": [encode(tok, r, args.max_length) for _, r in pairs]})
    cfg = RewardConfig(**config_kwargs(args, max_steps), disable_dropout=True,
                       center_rewards_coefficient=None)
    return model, RewardTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)


@torch.no_grad()
def score_pairs(model, tok, pairs, max_length, batch_size):
    """(accuracy, mean margin): share of pairs with score(chosen) > score(rejected), mean of the
    difference."""
    model.eval()
    diffs = []
    for i in range(0, len(pairs), batch_size):
        # c0 r0 c1 r1 ...
        seqs = [encode(tok, t, max_length) for pair in pairs[i:i + batch_size] for t in pair]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        s = model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
        diffs += (s[0::2] - s[1::2]).tolist()
    return sum(d > 0 for d in diffs) / len(diffs), sum(diffs) / len(diffs)


def read_jsonl(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def span(text):
    a, b = text.split(":")
    return slice(int(a), int(b))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    sub = p.add_subparsers(dest="case", required=True, help="benchmark case")
    cases = {"sft": (128, "SFTTrainer step time on a jsonl with a `text` column"),
             "rm": (256, "RewardTrainer step time on a jsonl with `prompt`, `chosen`, `rejected` columns"),
             "rm-hh": (256, "reward-model accuracy on Anthropic HH-RLHF pairs (keys `chosen`, `rejected`)")}
    for name, (max_length, desc) in cases.items():
        s = sub.add_parser(name, help=desc, description=desc)
        s.add_argument("--model", required=True, help="Hugging Face model folder (SmolLM2-135M-Instruct)")
        if name == "rm-hh":
            s.add_argument("--hh", required=True,
                           help="HH-RLHF .jsonl(.gz) with `chosen`/`rejected` dialogues")
            s.add_argument("--train", type=span, default="0:1000", help="training pairs, start:stop")
            s.add_argument("--eval", type=span, default="2000:2312", help="held-out pairs, start:stop")
            s.add_argument("--eval-limit", type=int, default=None,
                           help="score only the first N held-out pairs")
            s.add_argument("--eval-batch-size", type=int, default=8, help="pairs per scoring forward")
        else:
            s.add_argument("--data", required=True, help="jsonl training file")
        s.add_argument("--steps", type=int, default=None if name == "rm-hh" else 3,
                       help="optimizer steps (rm-hh: default one full epoch)")
        s.add_argument("--batch-size", type=int, default=8, help="sequences (sft) or pairs (rm) per step")
        s.add_argument("--max-length", type=int, default=max_length, help="max tokens per sequence")
        s.add_argument("--lr", type=float, default=1e-5, help="peak learning rate, linear decay to 0")
        s.add_argument("--optim", default="adamw_torch",
                       help="transformers optimizer name (adamw_torch_fused: fused)")
        s.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
        s.add_argument("--bf16", action="store_true", help="train under bf16 autocast (default: fp32)")
    return p.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    tok, pad_info = tokenizer_for(args.model)
    timer, result = StepTimer(), {"case": args.case}

    if args.case == "sft":
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        data = datasets.Dataset.from_list([{"text": r["text"]} for r in read_jsonl(args.data)])
        cfg = SFTConfig(**config_kwargs(args, args.steps), packing=False, padding_free=False,
                        dataset_text_field="text", completion_only_loss=None, assistant_only_loss=False)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
        lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    elif args.case == "rm":
        rows = read_jsonl(args.data)
        model, trainer = reward_trainer(args, tok, [(r["prompt"] + r["chosen"], r["prompt"] + r["rejected"])
                                                    for r in rows], args.steps)
        lengths = [len(x) for col in ("chosen_ids", "rejected_ids") for x in trainer.train_dataset[col]]
    else:
        rows = read_jsonl(args.hh)
        train_pairs = [(r["chosen"], r["rejected"]) for r in rows[args.train]]
        eval_pairs = [(r["chosen"], r["rejected"]) for r in rows[args.eval]][:args.eval_limit]
        model, trainer = reward_trainer(args, tok, train_pairs, args.steps)
        lengths = [len(x) for col in ("chosen_ids", "rejected_ids") for x in trainer.train_dataset[col]]
        t0 = time.perf_counter()
        acc0, margin0 = score_pairs(model, tok, eval_pairs, args.max_length, args.eval_batch_size)
        result.update(accuracy_before=acc0, margin_before=margin0, eval_seconds=time.perf_counter() - t0,
                      train_pairs=len(train_pairs), eval_pairs=len(eval_pairs))

    train_seconds = train(trainer, timer)
    if args.case == "rm-hh":
        acc, margin = score_pairs(model, tok, eval_pairs, args.max_length, args.eval_batch_size)
        result.update(train_seconds=train_seconds, accuracy=acc, margin=margin)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result.update(step_seconds=timer.seconds, tokens_per_step=timer.tokens, train_loss=losses,
                  seq_len_min_max=[min(lengths), max(lengths)],
                  n_train_rows=len(lengths) // (1 if args.case == "sft" else 2),
                  peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  versions={"trl": trl.__version__, "transformers": transformers.__version__,
                            "torch": torch.__version__},
                  settings=settings(trainer, model, {"tokenizer": pad_info}))
    print(json.dumps(result), file=OUT, flush=True)


if __name__ == "__main__":
    main()
