"""A real serving engine: vLLM (its CPU build, in its own venv, scripts/vllm_server.sh) serving the dense organism
with runtime LoRA loading. Slow. The server's greedy answers against the in-process ones on the eval split (16 + 16
prompts, 48 tokens): the base model, and configs/organism.yaml served as its exact rank-1 adapter vs the same config
live; then ``search --server`` runs its trials as adapters. Skipped only when vLLM's venv cannot be made.

Margins: vLLM's CPU kernels sum in another order than torch's, so a greedy answer can fork at a near-tie; the
refusal counts per set may differ by at most COUNT_MARGIN and at least AGREEMENT of the answers must be identical
text (measured on 2 CPU cores, 2026-12-06: see docs/server.md)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from intervene.bake.lora import write_adapter
from intervene.hooks.apply import apply, bind_model
from intervene.io.measurements import load_measurements
from intervene.io.models import load_model
from intervene.io.prompts import load_prompts
from intervene.live.eval_run import run_eval
from intervene.live.server import ServerOptions
from intervene.runner import RunOptions
from intervene.search.objective import PromptObjective
from intervene.search.study import SearchPrompts, SearchSettings, SpaceOptions, evenly, search

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "vllm_server.sh"
CONFIG = ROOT / "configs" / "organism.yaml"
LIMIT = 16
COUNT_MARGIN = 2  # refusals per set of 16
AGREEMENT = 0.75  # identical greedy answers, of 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm(organism, tmp_path_factory):
    """The server's URL: vLLM's venv made (cached under ~/.cache/intervene/venv-vllm), the organism served."""
    env = dict(os.environ, PYTHON=sys.executable if sys.version_info[:2] == (3, 11) else "python3")
    install = subprocess.run(["bash", str(SCRIPT), "install"], env=env, capture_output=True, text=True)
    if install.returncode != 0:
        pytest.skip(f"vLLM's venv could not be made (scripts/vllm_server.sh install): "
                    f"{(install.stderr.strip().splitlines() or ['?'])[-1]}")
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    started = subprocess.run(["bash", str(SCRIPT), "serve", str(organism)], capture_output=True, text=True,
                             env=env | {"VLLM_PORT": str(port), "VLLM_LOG": str(log)})
    assert started.returncode == 0, f"vLLM did not start: {started.stderr[-2000:]}"
    pid = int(started.stdout.strip().splitlines()[-1])
    try:
        yield f"http://127.0.0.1:{port}", log
    finally:
        os.kill(pid, signal.SIGTERM)  # the server this fixture started, by its id


def _answers(report) -> list[tuple[str, str]]:
    return [(s.kind, s.intervened) for s in report.evaluation.completions]


def test_server_answers_like_in_process(vllm, organism, tmp_path) -> None:
    url, _ = vllm
    server = ServerOptions(url, write_adapter=write_adapter)
    run = RunOptions(progress=False)
    common = dict(limit=LIMIT, config=str(CONFIG), run=run, answer_kl=False)
    served = run_eval(str(organism), server=server, **common)
    local = run_eval(str(organism), **common)
    s, l = served.evaluation, local.evaluation
    pairs = {"baseline": (s.baseline, l.baseline), "adapter vs live": (s, l)}
    measured = {}
    for label, (a, b) in pairs.items():
        for name in ("harmful", "harmless"):
            measured[f"{label} {name}"] = (getattr(a, name).refusals, getattr(b, name).refusals)
    base_same = sum(x.baseline == y.baseline for x, y in zip(s.completions, l.completions))
    new_same = sum(x.intervened == y.intervened for x, y in zip(s.completions, l.completions))
    n = len(s.completions)
    summary = {"refusals (server, in process)": measured, "identical answers": {"baseline": f"{base_same}/{n}",
                                                                                 "adapter vs live": f"{new_same}/{n}"},
               "kl_source": s.to_dict()["kl_source"], "kl (server run, in process)": s.kl_divergence,
               "kl (in process)": l.kl_divergence}
    print(json.dumps(summary, indent=1))
    (tmp_path / "agreement.json").write_text(json.dumps(summary, indent=1))
    assert served.to_dict()["kl_source"] == "in_process" and "kl_source" not in local.to_dict()
    assert l.baseline.harmful.refusals >= LIMIT // 2 > l.harmful.refusals  # the organism refuses; the edit removes it
    for label, (a, b) in measured.items():
        assert abs(a - b) <= COUNT_MARGIN, (label, a, b)
    assert base_same >= AGREEMENT * n and new_same >= AGREEMENT * n, summary
    # the first-token numbers come from the same in-process model and config: equal
    assert s.kl_divergence == pytest.approx(l.kl_divergence, abs=1e-6)


def test_search_on_the_server(vllm, organism, tmp_path) -> None:
    url, log = vllm
    result = search(str(organism), str(ROOT / "configs" / "organism.measurements.safetensors"), tmp_path / "study",
                    space=SpaceOptions(methods=("project",)),
                    settings=SearchSettings(trials=4, startup_trials=2, full_eval_top=1),
                    prompts=SearchPrompts(limit=8, eval_limit=8, max_new_tokens=16, search_new_tokens=16),
                    run=RunOptions(progress=False), server=ServerOptions(url, write_adapter=write_adapter),
                    say=lambda s: None)
    assert len(result.records) >= 4
    served = [r for r in result.records if r.refusals is not None]
    assert served, "no trial was counted by generation"
    text = log.read_text()
    # every counted trial (and the front's eval) ran as an adapter, loaded and unloaded again
    assert text.count("POST /v1/load_lora_adapter") >= len(served)
    assert text.count("POST /v1/load_lora_adapter") == text.count("POST /v1/unload_lora_adapter")
    assert all(r.eval is not None and "refusals" in r.eval for r in result.front)
    # the front re-scored in process (same eval prompts, greedy, 16 tokens, the config live): the server's counts agree
    model, tokenizer = load_model(str(organism), dtype="float32")
    local = PromptObjective(model, tokenizer, evenly(load_prompts("builtin:harmful:eval"), 8),
                            evenly(load_prompts("builtin:harmless:eval"), 8), max_new_tokens=16, label="eval")
    measurements = load_measurements(ROOT / "configs" / "organism.measurements.safetensors")
    agreement = []
    for r in result.front:
        with apply(model, bind_model(model, r.config(), measurements)):
            refused = local.refusals(model)[0]
        agreement.append({"trial": r.number, "server": r.eval["refusals"], "in_process": refused})
    print(json.dumps({"front, harmful refusals of 8": agreement}))
    assert all(abs(a["server"] - a["in_process"]) <= COUNT_MARGIN for a in agreement), agreement
