"""analyze(): statistics checked against hand-built measurements with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from intervene.maths import js_divergence
from intervene.measure.analyze import analyze, cosine, expert_shifts, recommend
from intervene.arch import get_arch
from intervene.cli import main
from intervene.config.resolve import resolve
from intervene.config.schema import load_config, parse_config
from intervene.io.measurements import Measurements, load_measurements
from intervene.runner import RunOptions

N = 10  # layers; depth (L + 1) / 10, so the 30-85 % band holds layers 2..7


def v(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def synthetic() -> Measurements:
    """Layer means chosen so cos / SNR / quality are known in closed form.

    layer 0: h ⟂ m, equal norms 2      -> cos 0, SNR √2, quality √2 (the largest, but outside the band)
    layer 5: h=(1,1,0,0), m=(1,0,0,0)  -> cos 1/√2, SNR 2/(√2+1)    (the best inside the band)
    other L: h = m + small              -> cos ≈ 1, quality ≈ 0
    """
    t: dict[str, torch.Tensor] = {}
    for layer in range(N):
        if layer == 0:
            h, m = v(2, 0, 0, 0), v(0, 2, 0, 0)
        elif layer == 5:
            h, m = v(1, 1, 0, 0), v(1, 0, 0, 0)
        else:
            h, m = v(3, 4, 0, 0.1 * layer), v(3, 4, 0, 0)
        t[f"harmful_mean.{layer}"], t[f"harmless_mean.{layer}"], t[f"direction.{layer}"] = h, m, h - m
    t["harmful_mean.embed"], t["harmless_mean.embed"] = v(1, 0, 0, 0), v(1, 0, 0, 0)
    t["direction.embed"] = v(0, 0, 0, 0)
    # routing: layer 5 disjoint supports (JS = ln 2), layer 6 identical (JS = 0), layer 7 mixed
    t["router.harmful_freq.5"], t["router.harmless_freq.5"] = v(0.5, 0.5, 0, 0), v(0, 0, 0.5, 0.5)
    t["router.harmful_freq.6"], t["router.harmless_freq.6"] = v(0.25, 0.25, 0.25, 0.25), v(0.25, 0.25, 0.25, 0.25)
    t["router.harmful_freq.7"], t["router.harmless_freq.7"] = v(0.4, 0.3, 0.2, 0.1), v(0.1, 0.3, 0.1, 0.5)
    meta = {"model": "some/model-dir", "model_type": "qwen3_moe", "num_layers": N, "hidden_size": 4,
            "chat_template": True, "system_prompt": None}
    return Measurements(tensors=t, meta=meta)


def test_layer_statistics_closed_form():
    report = analyze(synthetic())
    r0, r5, r3 = report.row(0), report.row(5), report.row(3)
    assert r0.cos == pytest.approx(0.0, abs=1e-12)
    assert (r0.harmful_norm, r0.harmless_norm) == pytest.approx((2.0, 2.0))
    assert r0.direction_norm == pytest.approx(2 * math.sqrt(2))
    assert r0.snr == pytest.approx(math.sqrt(2)) and r0.quality == pytest.approx(math.sqrt(2))
    assert r5.cos == pytest.approx(1 / math.sqrt(2))
    assert r5.snr == pytest.approx(1 / ((math.sqrt(2) + 1) / 2))
    assert r5.quality == pytest.approx((1 - 1 / math.sqrt(2)) * 2 / (math.sqrt(2) + 1))
    h, m = torch.tensor([3, 4, 0, 0.3], dtype=torch.float64), torch.tensor([3, 4, 0, 0], dtype=torch.float64)
    assert r3.cos == pytest.approx(float(h @ m / (h.norm() * m.norm())), rel=1e-6)
    assert r3.snr == pytest.approx(0.3 / float((h.norm() + m.norm()) / 2), rel=1e-6)
    assert r3.depth == pytest.approx(0.4)
    # the embedding row: identical means
    emb = report.row("embed")
    assert emb.depth is None and emb.cos == pytest.approx(1.0) and emb.snr == 0 and emb.quality == 0
    # layer 0 has the highest quality overall, but lies outside the 30-85 % band
    assert max(report.layer_rows, key=lambda r: r.quality).layer == 0
    assert report.best_layer == 5
    assert analyze(synthetic(), band=(0.0, 1.0)).best_layer == 0
    assert analyze(synthetic(), band=(0.95, 0.99)).best_layer == 0  # empty band: all layers


def test_router_divergence_and_experts():
    report = analyze(synthetic())
    assert report.row(5).router_js == pytest.approx(math.log(2))
    assert report.row(6).router_js == pytest.approx(0.0, abs=1e-15)
    p, q = [0.4, 0.3, 0.2, 0.1], [0.1, 0.3, 0.1, 0.5]
    mid = [(a + b) / 2 for a, b in zip(p, q)]
    expected = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, mid)) + 0.5 * sum(b * math.log(b / c) for b, c in zip(q, mid))
    assert report.row(7).router_js == pytest.approx(expected, rel=1e-6)
    assert report.row(4).router_js is None and report.row(4).top_experts == []
    tops = report.row(7).top_experts
    assert [e.expert for e in tops] == [0, 2]  # expert 1 has equal frequency, expert 3 is under-selected
    assert tops[0].difference == pytest.approx(0.3) and tops[0].ratio == pytest.approx(4.0)
    assert tops[1].ratio == pytest.approx(2.0)
    assert expert_shifts(v(0.5, 0.5), v(0.0, 1.0))[0].ratio == math.inf
    assert js_divergence(v(1, 0), v(0.5, 0.5)) == pytest.approx(
        0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2))
    assert cosine(v(1, 0), v(0, 0)) != cosine(v(1, 0), v(0, 0))  # nan for a zero vector


def js_by_hand(p: list[float], q: list[float]) -> float:
    """JS in nats from the definition, in plain floats: normalise, mix, two KLs with 0·log 0 = 0."""
    p = [x / sum(p) for x in p]
    q = [x / sum(q) for x in q]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return (0.5 * sum(a * math.log(a / c) for a, c in zip(p, m) if a > 0)
            + 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m) if b > 0))


@pytest.mark.parametrize("p, q", [
    ([0.4, 0.3, 0.2, 0.1], [0.1, 0.3, 0.1, 0.5]),
    ([1, 0, 0], [0, 0.5, 0.5]),  # disjoint supports: ln 2
    ([3, 1, 0, 0], [0, 1, 1, 2]),  # counts, not frequencies: renormalised; zeros on both sides
    ([1e-9, 1, 1], [1, 1e-9, 1]),
    ([2, 2, 2], [1, 1, 1]),  # the same distribution at two scales: 0
])
def test_js_divergence_against_the_definition(p, q):
    p64, q64 = torch.tensor(p, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)
    got = js_divergence(p64, q64)
    assert got == pytest.approx(js_by_hand(p, q), rel=1e-12, abs=1e-15)
    assert js_divergence(p64.float(), q64.float()) == pytest.approx(got, rel=1e-6, abs=1e-12)  # float32 in
    assert js_divergence(q64, p64) == pytest.approx(got, rel=1e-12, abs=1e-15)  # symmetric
    assert 0.0 <= got <= math.log(2) + 1e-12
    assert js_divergence(p64, p64) == 0.0  # exactly, for identical routing


def test_js_divergence_edge_cases():
    assert js_divergence(v(1, 0), v(0, 1)) == pytest.approx(math.log(2))
    # not a distribution up to scale: NaN, never a number that looks like an answer
    for p, q in [(v(0, 0), v(0.5, 0.5)), (v(0.5, 0.5), v(0, 0)), (v(0, 0), v(0, 0)),  # nothing counted
                 (v(1.5, -0.5), v(0.5, 0.5)),  # a negative weight
                 (v(float("nan"), 1), v(0.5, 0.5)), (v(float("inf"), 1), v(0.5, 0.5))]:
        assert math.isnan(js_divergence(p, q)) and math.isnan(js_divergence(q, p))
    with pytest.raises(ValueError, match="1-D vectors of one length"):
        js_divergence(v(1, 0, 0), v(1, 0))


def test_recommendation_rule():
    meas = synthetic()
    cfg = recommend(meas, model="m", measurements="meas.safetensors")
    assert cfg.model == "m" and cfg.measurements == "meas.safetensors"
    assert cfg.method == "project" and cfg.biprojection is True
    assert cfg.targets == ["attention", "mlp", "experts"]  # the write-side targets of qwen3_moe
    [entry] = cfg.ablate
    assert entry.measurement == 5 and entry.scale == 1.0 and entry.sparsity == 0.0
    assert entry.layers == list(range(5 - N // 4, N))  # a quarter of the depth before, through the last
    narrow = recommend(meas, before=1, after=2)
    assert narrow.ablate[0].layers == [4, 5, 6, 7] and narrow.model == "some/model-dir"
    # the YAML round trip parses, and the config resolves against its own measurements
    back = parse_config(__import__("yaml").safe_load(cfg.to_yaml()))
    assert back.ablate[0].layers == entry.layers and back.ablate[0].measurement == 5 and back.biprojection
    edits = resolve(back, get_arch("qwen3_moe"), SimpleNamespace(num_hidden_layers=N, hidden_size=4), meas)
    assert {e.layer for e in edits} == set(entry.layers)
    r = meas.direction(5) - (meas.direction(5) @ meas.harmless_mean(7)) / meas.harmless_mean(7).norm() ** 2 * meas.harmless_mean(7)
    e7 = next(e for e in edits if e.layer == 7)
    assert torch.allclose(e7.direction, r / r.norm(), atol=1e-6)  # biprojected against layer 7's harmless mean


def test_cli_analyze_outputs(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    synthetic().save(path)
    png, yml, js = tmp_path / "plots" / "a.png", tmp_path / "cfg" / "c.yaml", tmp_path / "a.json"
    assert main(["analyze", str(path), "--plot", str(png), "--config-out", str(yml), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["layer", "depth", "cos"]
    row5 = next(line for line in lines if line.lstrip().startswith("5*"))
    assert "0.7071" in row5 and "0.69315" in row5  # cos 1/√2, JS ln 2
    assert "layer 5" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    from PIL import Image

    assert Image.open(png).text["Software"].startswith("intervene ")
    cfg = load_config(yml)
    assert cfg.ablate[0].measurement == 5 and cfg.ablate[0].layers == list(range(3, 10))
    # written relative to the config file ("../m.safetensors"), found from there
    assert yml.read_text().count("measurements: ../m.safetensors") == 1
    assert Path(cfg.measurements).resolve() == path.resolve()
    assert load_measurements(cfg.measurements).layers == list(range(N))
    report = json.loads(js.read_text())
    assert report["best_layer"] == 5 and len(report["rows"]) == N + 1
    assert report["rows"][6]["router_js"] == pytest.approx(math.log(2)) and "intervene" in report["versions"]


def test_cli_analyze_dense_file_from_measure(tmp_path, capsys):
    """A real (tiny-model) measurements file: the printed numbers follow the stored means."""
    from intervene.measure.collect import measure
    from intervene.testing import tiny_model, tiny_tokenizer

    m = measure(tiny_model("llama"), tiny_tokenizer(), ["a b c", "d e f g"], ["x y", "z"], run=RunOptions(progress=False))
    path = tmp_path / "m.safetensors"
    m.save(path)
    assert main(["analyze", str(path), "--band", "0", "1"]) == 0
    out = capsys.readouterr().out
    h, s = m.harmful_mean(1).double(), m.harmless_mean(1).double()
    row1 = next(line for line in out.splitlines() if line.lstrip().startswith("1"))
    assert f"{float(h @ s / (h.norm() * s.norm())):8.4f}".strip() in row1
    assert "JS" not in out  # dense model: no router columns


@pytest.mark.parametrize("case", ["not_safetensors", "missing", "other_model", "bad_band"])
def test_cli_analyze_errors(case, tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    synthetic().save(path)
    if case == "not_safetensors":
        bad = tmp_path / "notes.txt"
        bad.write_text("hello")
        argv, expect = ["analyze", str(bad)], f"{bad} is not a readable safetensors measurements file"
    elif case == "missing":
        argv, expect = ["analyze", str(tmp_path / "nope.safetensors")], "measurements file not found"
    elif case == "other_model":
        from intervene.testing import save_tiny, tiny_model

        save_tiny(tiny_model("qwen3_moe"), tmp_path / "tiny")
        argv = ["analyze", str(path), "--model", str(tmp_path / "tiny"), "--config-out", str(tmp_path / "c.yaml")]
        expect = "have hidden size 4 but the model"
    else:
        argv, expect = ["analyze", str(path), "--band", "0.9", "0.2"], "--band must be"
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("intervene analyze: error: ") and "\n" not in err and expect in err
    assert not (tmp_path / "c.yaml").exists()
