#!/usr/bin/env bash
# Create the two Hugging Face TRL peer venvs for the benchmarks (CPU only):
#   bench/.venv-trl024  trl 0.24.0 (last release with PPOTrainer) on transformers 4.x
#   bench/.venv-trl     newest trl on PyPI on transformers 5 (same as the project's .venv)
# Usage: bash bench/setup_trl.sh   (re-running is safe; pip only fills in what is missing)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$ROOT/bench"

# Same interpreter as the project's .venv (Python 3.11); else python3.
if [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY="$("$ROOT/.venv/bin/python" -c 'import sys; print(sys._base_executable)')"
else
  PY="${PYTHON:-python3}"
fi
echo "using $PY ($("$PY" -V))"

# torch is pinned to the CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
COMMON=(torch==2.13.0 accelerate==1.15.0 psutil==7.2.2 numpy==2.4.6)

make_venv() {  # make_venv DIR PKG...
  local dir="$1"; shift
  [[ -x "$dir/bin/python" ]] || "$PY" -m venv "$dir"
  "$dir/bin/python" -m pip install -q "$@"
  "$dir/bin/python" -c "import trl, transformers, torch; print('$(basename "$dir"):', trl.__version__, transformers.__version__, torch.__version__)"
}

# trl 0.24 + transformers 4.57: datasets 5.0.1 is the newest that allows huggingface_hub<1.0; peft 0.17.1
# (TRL 0.24's contemporary) for the LoRA PPO peer.
# Models saved by transformers 5 need a tf4 copy first (rope_theta): see bench/check_logits.py.
make_venv "$BENCH/.venv-trl024" "${COMMON[@]}" \
  trl==0.24.0 transformers==4.57.6 datasets==5.0.1 peft==0.17.1

# Newest trl (1.16.0, no PPOTrainer any more) accepts transformers 5.24.0.
make_venv "$BENCH/.venv-trl" "${COMMON[@]}" \
  trl==1.16.0 transformers==5.24.0 datasets==5.2.0
