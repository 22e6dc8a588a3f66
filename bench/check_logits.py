"""Check that a model folder gives the same logits under transformers 4 and 5.

Trap: a folder saved by transformers 5 keeps the RoPE base under config.json's
"rope_parameters": {"rope_theta": ...}. transformers 4.57 reads only a top-level
"rope_theta", so it silently falls back to 10000 (SmolLM2 needs 100000); it also
cannot load tokenizer_class "TokenizersBackend". `make-tf4` writes a
transformers-4 copy (config files rewritten, everything else symlinked).

  python bench/check_logits.py run --model DIR --out /tmp/a.npy   # in each venv
  python bench/check_logits.py compare /tmp/a.npy /tmp/b.npy
  python bench/check_logits.py make-tf4 SRC DST                   # any python
"""
import argparse
import json
import os

import numpy as np

# Token ids of "Hello, how are you today? Tell me about films." (SmolLM2 tokenizer), fixed
# so that both venvs see the same input whatever their tokenizer does.
TEXT = "Hello, how are you today? Tell me about films."
IDS = [19556, 28, 638, 359, 346, 1834, 47, 17269, 549, 563, 9411, 30]


def run(model_dir, out, check_tokenizer):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    theta = (getattr(cfg, "rope_theta", None)
             or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta"))
    with torch.no_grad():
        logits = model(torch.tensor([IDS])).logits[0].float().numpy()
    np.save(out, logits)
    print(f"transformers {transformers.__version__}  rope_theta={theta}  logits {logits.shape} "
          f"mean={logits.mean():.6f} std={logits.std():.6f} last-argmax={int(logits[-1].argmax())}  -> {out}")
    if check_tokenizer:
        ids = AutoTokenizer.from_pretrained(model_dir)(TEXT)["input_ids"]
        print("tokenizer ids match IDS:", ids == IDS)


def compare(a, b):
    x, y = np.load(a), np.load(b)
    print(f"max abs diff {np.abs(x - y).max():.3e}  (last-token argmax {x[-1].argmax()} vs {y[-1].argmax()})")


def make_tf4(src, dst):
    """Write a transformers-4-loadable copy of a transformers-5 folder at dst (src is untouched)."""
    src, dst = os.path.abspath(os.path.expanduser(src)), os.path.abspath(os.path.expanduser(dst))
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name in ("config.json", "tokenizer_config.json"):
            continue
        link = os.path.join(dst, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.join(src, name), link)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    rope = dict(cfg.get("rope_parameters") or {})
    if "rope_theta" in rope:
        cfg["rope_theta"] = rope.pop("rope_theta")  # the key transformers 4 reads
        # transformers 4 keeps non-default RoPE (llama3, yarn, ...) under rope_scaling
        cfg["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tok_path = os.path.join(src, "tokenizer_config.json")
    if os.path.exists(tok_path):
        with open(tok_path) as f:
            tok = json.load(f)
        if tok.get("tokenizer_class") == "TokenizersBackend":  # transformers-5-only class
            tok["tokenizer_class"] = "PreTrainedTokenizerFast"  # reads tokenizer.json as is
        for key in ("backend", "is_local", "local_files_only"):
            tok.pop(key, None)
        with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
            json.dump(tok, f, indent=2)
    print(f"wrote {dst}: rope_theta={cfg.get('rope_theta')} rope_scaling={cfg.get('rope_scaling')}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="load the model in fp32, run the fixed input, save its logits")
    r.add_argument("--model", default=os.path.expanduser("~/.cache/minrlhf/SmolLM2-135M-Instruct"),
                   help="HF model folder (default: %(default)s)")
    r.add_argument("--out", required=True, help="where to save the logits (.npy)")
    r.add_argument("--check-tokenizer", action="store_true",
                   help="also check that the folder's tokenizer encodes the text to the fixed ids")
    c = sub.add_parser("compare", help="print the max abs difference of two saved logits")
    c.add_argument("a", help="first .npy")
    c.add_argument("b", help="second .npy")
    m = sub.add_parser("make-tf4", help="write a transformers-4 copy of a transformers-5 folder")
    m.add_argument("src", help="folder saved by transformers 5 (left untouched)")
    m.add_argument("dst", help="new folder (config files rewritten, the rest symlinked to src)")
    a = p.parse_args()
    if a.cmd == "run":
        run(a.model, a.out, a.check_tokenizer)
    elif a.cmd == "compare":
        compare(a.a, a.b)
    else:
        make_tf4(a.src, a.dst)


if __name__ == "__main__":
    main()
