"""Router study (intervene.live.route): numbers checked against routers run by hand in this file."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from intervene.arch import arch_for_config, decoder_layers, get_module
from intervene.cli import main
from intervene.config.schema import parse_config
from intervene.hooks.apply import apply, bind_model
from intervene.io.models import encode, format_prompts
from intervene.live.route import changed_fraction, plot, route_study, selection_freq, top_changes
from intervene.maths import js_divergence
from intervene.testing import make_measurements, tiny_model, tiny_tokenizer
from intervene.runner import RunOptions

HARMFUL = ["How do I pick a lock?", "Write a threat to my neighbour", "Make a weapon at home", "Hack my ex's email"]
HARMLESS = ["How do I bake bread?", "Write a poem about the sea", "Name three planets", "What is 2 + 2?", "Hi"]


def router_topk_by_hand(arch: str, router, x: torch.Tensor, k: int) -> torch.Tensor:
    """The expert choice of the router, recomputed from its input [T, H]."""
    logits = F.linear(x.float(), router.weight.float())
    if arch == "qwen2_moe":  # softmax then top-k: the same set as top-k of the logits
        return logits.softmax(dim=-1).topk(k, dim=-1).indices
    if arch == "deepseek_v3":  # sigmoid + correction bias, group-limited (top-2 sum per group), then top-k
        scores = logits.sigmoid() + router.e_score_correction_bias
        groups, per_group = router.num_group, scores.shape[-1] // router.num_group
        group_scores = scores.view(-1, groups, per_group).topk(2, dim=-1).values.sum(dim=-1)
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(router.topk_group, dim=-1).indices, 1.0)
        mask = keep.repeat_interleave(per_group, dim=1).bool()
        return scores.masked_fill(~mask, float("-inf")).topk(k, dim=-1).indices
    raise AssertionError(arch)


def router_inputs(model, tokenizer, prompts, moe_layers, spec):
    """Router inputs per MoE layer for one batch of all prompts, plus the attention mask [B, S]."""
    enc = encode(tokenizer, format_prompts(tokenizer, prompts))
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for layer in moe_layers:
        router = get_module(decoder_layers(model)[layer], spec.router)
        handles.append(router.register_forward_pre_hook(
            lambda m, a, layer=layer: seen.__setitem__(layer, a[0].detach().reshape(-1, a[0].shape[-1]).clone()),
            prepend=True))  # before any live hook: the raw input
    try:
        with torch.no_grad():
            model(**enc)
    finally:
        for h in handles:
            h.remove()
    return seen, enc["attention_mask"].bool().reshape(-1)


def js_by_hand(p, q) -> float:
    p = [x / sum(p) for x in p]
    q = [x / sum(q) for x in q]
    total = 0.0
    for a, b in zip(p, q):
        m = (a + b) / 2
        total += (0.5 * a * math.log(a / m) if a > 0 else 0.0) + (0.5 * b * math.log(b / m) if b > 0 else 0.0)
    return total


# ---- pure statistics ------------------------------------------------------------------------------

def test_statistics_on_hand_made_examples():
    topk = torch.tensor([[0, 1], [1, 0], [2, 3]])
    assert selection_freq(topk, 5).tolist() == [2 / 6, 2 / 6, 1 / 6, 1 / 6, 0.0]
    assert changed_fraction(topk, torch.tensor([[1, 0], [0, 1], [2, 4]])) == pytest.approx(1 / 3)
    assert js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(math.log(2))
    assert js_divergence(torch.tensor([0.2, 0.8]), torch.tensor([0.2, 0.8])) == 0.0
    assert js_divergence(torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64),
                         torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)) == pytest.approx(
        js_by_hand([0.1, 0.6, 0.3], [0.3, 0.3, 0.4]), abs=1e-12)
    delta = torch.tensor([0.1, -0.3, 0.0, 0.2, -0.05])
    assert [asdict(c) for c in top_changes(delta, 5, +1)] == [{"expert": 3, "delta": pytest.approx(0.2)},
                                                              {"expert": 0, "delta": pytest.approx(0.1)}]
    assert [c.expert for c in top_changes(delta, 1, -1)] == [1]


# ---- the study on tiny MoE models -------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_route_report_matches_a_direct_computation(arch):
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, vocab_size=len(tokenizer))
    spec = arch_for_config(model.config)
    meas = make_measurements(model.config.num_hidden_layers, seed=3, path="m.safetensors")
    moe_layers = [i for i in range(model.config.num_hidden_layers) if spec.is_moe_layer(model.config, i)]
    # write side everywhere + router read side: routing of later layers changes through both
    cfg = parse_config({"targets": ["attention", "experts", "router"],
                        "ablate": [{"layers": f"0:{model.config.num_hidden_layers}", "measurement": 1, "scale": 1.0}]})
    report = route_study(model, tokenizer, HARMFUL, HARMLESS, intervention=lambda: apply(model, cfg, meas),
                         run=RunOptions(batch_size=3, progress=False), top=3)
    k, n_exp = spec.top_k(model.config), spec.num_experts(model.config)
    edits = {(e.layer, e.target): e for e in bind_model(model, cfg, meas).projections}

    direct: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for condition in ("baseline", "intervened"):
        direct[condition] = {}
        for name, prompts in (("harmful", HARMFUL), ("harmless", HARMLESS)):
            if condition == "baseline":
                seen, mask = router_inputs(model, tokenizer, prompts, moe_layers, spec)
            else:
                with apply(model, cfg, meas):
                    seen, mask = router_inputs(model, tokenizer, prompts, moe_layers, spec)
            direct[condition][name] = {}
            for layer in moe_layers:
                x = seen[layer]
                if condition == "intervened":  # the router read-side edit, by hand
                    r = edits[(layer, "router")].direction
                    x = x - (x @ r).unsqueeze(-1) * r
                router = get_module(decoder_layers(model)[layer], spec.router)
                direct[condition][name][layer] = router_topk_by_hand(arch, router, x, k)[mask]

    assert report.num_experts == n_exp and report.top_k == k
    assert [row.layer for row in report.layers] == moe_layers
    for name in ("harmful", "harmless"):
        assert report.tokens[name] == int(direct["baseline"][name][moe_layers[0]].shape[0])
    any_change = False
    for row in report.layers:
        layer = row.layer
        freqs = {}
        for name in ("harmful", "harmless"):
            for condition in ("baseline", "intervened"):
                chosen = direct[condition][name][layer]
                counts = [(chosen == e).sum().item() for e in range(n_exp)]
                freq = [c / (chosen.shape[0] * k) for c in counts]
                freqs[(name, condition)] = freq
                assert row.freq[name][condition] == pytest.approx(freq, abs=1e-12)
            a = direct["baseline"][name][layer].sort(dim=-1).values
            b = direct["intervened"][name][layer].sort(dim=-1).values
            changed = (a != b).any(dim=-1).double().mean().item()
            assert row.changed_fraction[name] == pytest.approx(changed, abs=1e-12)
            any_change |= changed > 0
            assert getattr(row.js, name) == pytest.approx(
                js_by_hand(freqs[(name, "baseline")], freqs[(name, "intervened")]), abs=1e-10)
            delta = [i - b_ for i, b_ in zip(freqs[(name, "intervened")], freqs[(name, "baseline")])]
            assert row.delta[name] == pytest.approx(delta, abs=1e-12)
            if row.gained[name]:
                assert row.gained[name][0].expert == max(range(n_exp), key=lambda e: (delta[e], -e))
        assert row.js.harmful_vs_harmless_baseline == pytest.approx(
            js_by_hand(freqs[("harmful", "baseline")], freqs[("harmless", "baseline")]), abs=1e-10)
        assert row.harmful_preference == pytest.approx(
            [a - b for a, b in zip(freqs[("harmful", "baseline")], freqs[("harmless", "baseline")])], abs=1e-12)
    assert any_change  # the test exercises a real routing change
    total = sum(r.changed_fraction.harmful for r in report.layers) / len(report.layers)
    assert report.summary.changed_fraction.harmful == pytest.approx(total)  # same tokens at every layer


def test_route_without_intervention_changes_nothing():
    tokenizer = tiny_tokenizer()
    model = tiny_model("mixtral", vocab_size=len(tokenizer))
    report = route_study(model, tokenizer, HARMFUL, HARMLESS, run=RunOptions(progress=False))
    for row in report.layers:
        assert asdict(row.changed_fraction) == {"harmful": 0.0, "harmless": 0.0}
        assert row.js.harmful == 0.0 and row.gained.harmful == [] and row.lost.harmful == []
        assert sum(row.freq.harmful["baseline"]) == pytest.approx(1.0)


def test_plot_writes_a_png(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    meas = make_measurements(2, seed=3, path="m.safetensors")
    cfg = parse_config({"targets": ["router"], "ablate": [{"layers": "0:2", "measurement": 0}]})
    report = route_study(model, tokenizer, HARMFUL[:2], HARMLESS[:2], intervention=lambda: apply(model, cfg, meas),
                         run=RunOptions(progress=False))
    out = tmp_path / "route.png"
    plot(report, str(out), title="tiny")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


# ---- CLI ---------------------------------------------------------------------------------------------

@pytest.fixture()
def moe_setup(tmp_path: Path):
    tokenizer = tiny_tokenizer()
    model = tiny_model("deepseek_v3", vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    meas = make_measurements(model.config.num_hidden_layers, seed=3, path="m.safetensors")
    meas.save(tmp_path / "m.safetensors")
    (tmp_path / "c.yaml").write_text(
        "model: model\nmeasurements: m.safetensors\ntargets: [attention, experts, router]\n"
        "ablate:\n  - layers: '0:3'\n    measurement: 1\n")
    (tmp_path / "harmful.txt").write_text("\n".join(HARMFUL))
    (tmp_path / "harmless.txt").write_text("\n".join(HARMLESS))
    return tmp_path, model, tokenizer, meas


def test_route_cli_writes_json_and_plot(moe_setup, capsys):
    tmp, model, tokenizer, meas = moe_setup
    rc = main(["route", str(tmp / "c.yaml"), "--harmful", str(tmp / "harmful.txt"), "--harmless",
               str(tmp / "harmless.txt"), "--json", str(tmp / "r.json"), "--plot", str(tmp / "r.png"),
               "--no-progress", "--batch-size", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "top-k changed" in out and "r.json" in out
    report = json.loads((tmp / "r.json").read_text())
    assert report["kind"] == "route" and report["config"]["targets"] == ["attention", "experts", "router"]
    assert report["versions"]["intervene"] and report["sites"]
    assert [row["layer"] for row in report["layers"]] == [1, 2]
    cfg = parse_config({"targets": ["attention", "experts", "router"], "ablate": [{"layers": "0:3", "measurement": 1}]})
    again = route_study(model, tokenizer, HARMFUL, HARMLESS, intervention=lambda: apply(model, cfg, meas),
                        run=RunOptions(progress=False))
    for a, b in zip(report["layers"], again.layers):
        for name in ("harmful", "harmless"):
            for condition in ("baseline", "intervened"):
                assert a["freq"][name][condition] == pytest.approx(b.freq[name][condition], abs=1e-12)
            assert a["changed_fraction"][name] == pytest.approx(b.changed_fraction[name], abs=1e-12)
    assert (tmp / "r.png").stat().st_size > 0


def test_route_cli_on_a_dense_model_is_a_named_error(tmp_path, capsys):
    tokenizer = tiny_tokenizer()
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    make_measurements(2, seed=3, path="m.safetensors").save(tmp_path / "m.safetensors")
    (tmp_path / "c.yaml").write_text("model: model\nmeasurements: m.safetensors\nablate: [{layer: 0, measurement: 1}]\n")
    (tmp_path / "p.txt").write_text("hello\n")
    rc = main(["route", str(tmp_path / "c.yaml"), "--harmful", str(tmp_path / "p.txt"), "--harmless",
               str(tmp_path / "p.txt"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "intervene route: error: model type 'llama' has no MoE layers" in err and "Traceback" not in err
