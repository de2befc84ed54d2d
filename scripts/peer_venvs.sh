#!/usr/bin/env bash
# The benchmark opponents of benchmarks/vs_peers.py, each in its OWN venv: heretic and abliterix are
# opponents, never dependencies of intervene (they pin other transformers / torch ranges and must never
# go into intervene's .venv). vs_peers.py runs each as a child process from its venv's python.
#
#   scripts/peer_venvs.sh                     make every peer's venv that is missing (heretic, abliterix)
#   scripts/peer_venvs.sh heretic abliterix   the named ones only
#   scripts/peer_venvs.sh --force heretic     remove and make again
#   scripts/peer_venvs.sh freeze NAME         write the venv's exact versions to benchmarks/peers/constraints/NAME.txt
#
# Pins: the peer's own release (HERETIC_SPEC, ABLITERIX_SPEC) and torch (TORCH_SPEC, the CPU wheel: an
# unpinned torch pulls a multi-GB CUDA build; set TORCH_INDEX=https://download.pytorch.org/whl/cpu where no
# local wheel lies). Every other package is pinned by benchmarks/peers/constraints/NAME.txt (what the last measured run
# had, written by `freeze`) when that file exists. abliterix's `vllm` extra (vllm<0.21) is NOT installed.
# Venvs go to PEER_VENVS (default ~/.cache/intervene): venv-heretic, venv-abliterix.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PEER_VENVS=${PEER_VENVS:-$HOME/.cache/intervene}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
HERETIC_SPEC=${HERETIC_SPEC:-heretic-llm==1.4.0}
ABLITERIX_SPEC=${ABLITERIX_SPEC:-abliterix==1.12.2}
# the module each peer must import once installed (the install's own check)
declare -A SPEC=([heretic]="$HERETIC_SPEC" [abliterix]="$ABLITERIX_SPEC")
declare -A MODULE=([heretic]=heretic.main [abliterix]=abliterix)
export PIP_DISABLE_PIP_VERSION_CHECK=1

make_venv() {
  local name=$1 force=$2 venv="$PEER_VENVS/venv-$1" pins="benchmarks/peers/constraints/$1.txt"
  if [ -f "$venv/.complete" ] && [ "$force" = 0 ]; then
    echo "$name: $venv exists"
    return 0
  fi
  local start=$SECONDS
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  local pip=("$venv/bin/python" -m pip install -q)
  local constraints=()
  if [ -f "$pins" ]; then constraints=(-c "$pins"); fi
  if [ -n "${TORCH_INDEX:-}" ]; then
    "${pip[@]}" "${constraints[@]}" "$TORCH_SPEC" --index-url "$TORCH_INDEX"
  else
    "${pip[@]}" "${constraints[@]}" "$TORCH_SPEC"
  fi
  "${pip[@]}" "${constraints[@]}" "$TORCH_SPEC" "${SPEC[$name]}"
  "$venv/bin/python" -c "import ${MODULE[$name]}" >/dev/null
  touch "$venv/.complete"
  echo "$name: $venv made in $((SECONDS - start)) s"
}

freeze() {
  local name=$1 venv="$PEER_VENVS/venv-$1"
  mkdir -p benchmarks/peers/constraints
  { echo "# $name's venv as last measured (scripts/peer_venvs.sh freeze $name); constraints for the next install"
    "$venv/bin/python" -m pip freeze --exclude-editable | grep -v -e '^-e ' -e '^torch=='; } > "benchmarks/peers/constraints/$name.txt"
  echo "wrote benchmarks/peers/constraints/$name.txt"
}

force=0
names=()
for arg in "$@"; do
  case $arg in
    --force) force=1 ;;
    freeze) mode=freeze ;;
    heretic|abliterix) names+=("$arg") ;;
    *) echo "unknown argument: $arg (peers: heretic abliterix)" >&2; exit 2 ;;
  esac
done
if [ ${#names[@]} -eq 0 ]; then names=(heretic abliterix); fi
for name in "${names[@]}"; do
  if [ "${mode:-make}" = freeze ]; then freeze "$name"; else make_venv "$name" "$force"; fi
done
