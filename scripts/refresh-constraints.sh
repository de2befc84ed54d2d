#!/usr/bin/env bash
# Moves the pinned environment to today's newest releases, on purpose: installs everything unpinned into
# a fresh venv, runs the whole test suite there, and only if it passes rewrites constraints.txt from that
# venv. Review the diff (`git diff constraints.txt`), re-measure what the README quotes if a package that
# computes (torch, transformers, peft, ...) moved, and commit. Takes as long as CI (~25 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
VENV="$WORK/venv" CONSTRAINTS= bash scripts/setup.sh
"$WORK/venv/bin/python" -m pytest -q
{
  echo "# Exact versions scripts/setup.sh installs (and so CI). Written by scripts/refresh-constraints.sh on"
  echo "# $(date -u +%Y-%m-%d) after the whole suite passed with them, Python $("$WORK/venv/bin/python" -c 'import platform; print(platform.python_version())')."
  echo "# torch is pinned by setup.sh itself (TORCH_SPEC, CPU or CUDA build); intervene is this checkout."
  "$WORK/venv/bin/python" -m pip freeze --all --exclude-editable | grep -viE '^(torch|intervene)==' | sort -f
} > "$WORK/constraints.txt"
mv "$WORK/constraints.txt" constraints.txt
echo "constraints.txt rewritten; review it with: git diff constraints.txt"
