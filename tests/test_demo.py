"""`intervene demo` end to end on the cached organism (a short run: 16 prompts per set, 16 tokens)."""

from __future__ import annotations

import json

import pytest
import torch

from intervene.cli import main
from intervene.config.schema import load_config
from intervene.io.measurements import load_measurements

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_demo_runs_the_main_job_and_removes_refusals(organism, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--limit", "16", "--max-new-tokens", "16"]) == 0
    printed = capsys.readouterr().out
    assert "model organism found" in printed and "harmful refused" in printed

    assert sorted(p.name for p in out.iterdir()) == ["analysis.png", "config.yaml", "measurements.safetensors",
                                                     "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["harmful"]["total"] == 16 and report["harmless"]["total"] == 16
    base, after = report["baseline"]["harmful"]["refusals"], report["harmful"]["refusals"]
    assert base >= 12  # the organism refuses most harmful eval prompts ...
    assert after <= base - 6  # ... and the recommended config removes a good part of that, live
    assert 0 < report["kl_divergence"] < 1.0
    assert len(report["samples"]) > 0 and {"prompt", "baseline", "intervened"} <= set(report["samples"][0])

    # the written config is the one that was scored, and it points at the written measurements
    cfg = load_config(out / "config.yaml")
    assert report["config"] == cfg.to_dict()
    meas = load_measurements(cfg.measurements)
    layer = cfg.ablate[0].measurement
    assert torch.allclose(meas.direction(layer), meas.harmful_mean(layer) - meas.harmless_mean(layer), atol=1e-5)
