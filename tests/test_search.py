"""``intervene search`` on tiny models with a PLANTED direction (no tokenizer, no generation).

The refusal proxy here is the r-component that the decoder layers WRITE into the residual
(last layer output minus embedding output), averaged over tokens: projecting r out of every
attention and MLP write makes it exactly zero, a partial edit leaves a known remainder. The
scores a search records are checked against an in-test weight edit of the YAML it wrote.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from intervene.arch import arch_for_config, decoder_layers, text_config
from intervene.config.resolve import resolve
from intervene.config.schema import load_config
from intervene.errors import InputError
from intervene.hooks.apply import apply
from intervene.io.measurements import Measurements
from intervene.search.objective import DEFAULT_METRICS
from intervene.search.pareto import best_so_far, dominates, pareto_front, spread
from intervene.search.study import SearchSettings, run_search
from intervene.search.space import Range, SearchSpace, kernel, window
from intervene.testing import random_ids, tiny_model

LAYERS = 4


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matrices: one thread is faster, and immune to a loaded shared machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def planted_direction(model) -> torch.Tensor:
    """The unit direction of the mean residual the decoder layers write: removing it matters."""
    probe = PlantedProxy(model, torch.zeros(model.config.hidden_size))
    written = probe.written(model).reshape(-1, model.config.hidden_size).mean(0)
    return written / written.norm()


def planted_measurements(r: torch.Tensor, layers: int = LAYERS) -> Measurements:
    # every layer's direction is a multiple of r, so any interpolated direction is r itself
    tensors = {f"direction.{i}": (2.0 + i) * r for i in range(layers)}
    tensors.update({f"harmless_mean.{i}": torch.ones_like(r) for i in range(layers)})
    return Measurements(tensors=tensors, meta={"planted": True})


class PlantedProxy:
    """objective 1: mean |<written residual, r>|; objective 2: KL of the last-token distribution."""

    metrics = DEFAULT_METRICS  # (refusal proxy, KL): the names and directions of cheap's values

    def __init__(self, model, r: torch.Tensor):
        self.r = r
        self.ids = random_ids(batch=4, seq=7, seed=3)
        self.base_lp = self._run(model)[1]

    def written(self, model) -> torch.Tensor:
        return self._forward(model)[0]

    def _run(self, model) -> tuple[float, torch.Tensor]:
        written, logits = self._forward(model)
        return float((written @ self.r).abs().mean()), F.log_softmax(logits[:, -1].float(), dim=-1)

    def _forward(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}

        def keep(name):
            def hook(module, args, output):
                seen[name] = output[0] if isinstance(output, tuple) else output
            return hook

        handles = [model.model.embed_tokens.register_forward_hook(keep("embed")),
                   decoder_layers(model)[-1].register_forward_hook(keep("last"))]
        try:
            with torch.no_grad():
                logits = model(input_ids=self.ids).logits
        finally:
            for h in handles:
                h.remove()
        return seen["last"] - seen["embed"], logits

    def cheap(self, model) -> tuple[float, float]:
        proxy, lp = self._run(model)
        kl = float((self.base_lp.exp() * (self.base_lp - lp)).sum(-1).mean())
        return proxy, kl

    def refusals(self, model):
        return None

    def describe(self) -> dict:
        return {"planted": True, "ids": self.ids.tolist()}


def fixed_scale_space(num_layers: int = LAYERS) -> SearchSpace:
    one = Range(1.0, 1.0)
    return SearchSpace(num_layers=num_layers, direction=Range(0.0, num_layers - 1.0),
                       center=Range(0.0, num_layers - 1.0), width=Range(0.5, float(num_layers - 1)),
                       max_scale={"attention": one, "mlp": one}, min_fraction={"attention": one, "mlp": one},
                       methods=("project",))


def manual_edit(model, cfg_path, r: torch.Tensor):
    """Independent of hooks: W <- W - s r (r^T W) on o_proj / down_proj, per the YAML's entries."""
    cfg = load_config(cfg_path)
    edited = copy.deepcopy(model)
    layers = decoder_layers(edited)
    modules = {"attention": "self_attn.o_proj", "mlp": "mlp.down_proj"}
    with torch.no_grad():
        for entry in cfg.ablate:
            for layer in entry.layers:
                for target, scale in entry.scale.items():
                    lin = layers[layer].get_submodule(modules[target])
                    lin.weight -= scale * torch.outer(r, r @ lin.weight)
    return edited


def test_kernel_and_window_values():
    assert window(2.0, 1.0, 10) == [1, 2, 3]
    assert window(0.3, 2.0, 4) == [0, 1, 2]
    assert window(8.6, 3.0, 10) == [6, 7, 8, 9]
    assert kernel(2, 2.0, 1.5, 1.2, 0.3) == pytest.approx(1.2)
    assert kernel(3, 2.0, 2.0, 1.0, 0.2) == pytest.approx(0.6)  # halfway: (1.0 + 0.2) / 2
    assert kernel(4, 2.0, 2.0, 1.0, 0.2) == pytest.approx(0.2)


def test_space_emits_one_entry_per_layer_with_per_target_scales():
    space = SearchSpace(num_layers=8, direction=Range(2, 5), center=Range(0, 7), width=Range(1, 4),
                        max_scale={"attention": Range(0.5, 1.5), "mlp": Range(0.5, 1.5)},
                        min_fraction={"attention": Range(0, 1), "mlp": Range(0, 1)})
    params = {"direction": 3.25, "center": 4.0, "width": 2.0, "attention.max": 1.2, "attention.min": 0.5,
              "mlp.max": 0.8, "mlp.min": 0.0, "method": "norm_preserving"}
    cfg = space.to_config(params, model="m", measurements="x.safetensors")
    assert [e.layers for e in cfg.ablate] == [[2], [3], [4], [5], [6]]
    assert all(e.measurement == 3.25 for e in cfg.ablate)
    assert cfg.method == "norm_preserving" and cfg.targets == ["attention", "mlp"]
    # attention: 1.2 at the centre, 0.6 at distance 2; mlp: 0.8 -> 0 (edges left out)
    assert cfg.ablate[2].scale == {"attention": 1.2, "mlp": 0.8}
    assert cfg.ablate[1].scale == pytest.approx({"attention": 0.9, "mlp": 0.4})
    assert cfg.ablate[0].scale == pytest.approx({"attention": 0.6})
    assert cfg.ablate[4].scale == pytest.approx({"attention": 0.6})


def test_pareto_helpers():
    pts = [(3, 0.1), (1, 0.5), (2, 0.2), (2, 0.6), (0, 2.0), (3, 0.1)]
    assert dominates((1, 0.1), (1, 0.2)) and not dominates((1, 0.2), (1, 0.2))
    assert pareto_front(pts, lambda p: p) == [(3, 0.1), (1, 0.5), (2, 0.2), (0, 2.0), (3, 0.1)]
    assert spread(list(range(10)), 4) == [0, 3, 6, 9]
    assert spread([1, 2], 5) == [1, 2]


def test_planted_direction_is_found_and_yaml_reproduces_the_score(tmp_path):
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    r = planted_direction(model)
    objective = PlantedProxy(model, r)
    baseline, _ = objective.cheap(model)
    assert baseline > 0.05
    result = run_search(model, planted_measurements(r), fixed_scale_space(), objective, tmp_path,
                        SearchSettings(trials=16, seed=0, startup_trials=8), progress=False)
    assert [rec.number for rec in result.records] == list(range(16))
    best = min(result.front, key=lambda rec: rec.proxy)
    # the whole written r-component is removed when every layer is edited with scale 1
    assert best.proxy < 1e-5 * baseline
    cfg = load_config(result.config_paths[result.front.index(best)])
    assert sorted(layer for e in cfg.ablate for layer in e.layers) == list(range(LAYERS))
    # every front YAML, edited into the weights independently, gives the score the search recorded
    assert len(result.config_paths) == len(result.front) >= 1
    for rec, path in zip(result.front, result.config_paths):
        proxy, kl = objective.cheap(manual_edit(model, path, r))
        assert proxy == pytest.approx(rec.proxy, abs=1e-5)
        assert kl == pytest.approx(rec.kl, abs=1e-5)
    doc = json.loads((tmp_path / "front.json").read_text())
    assert [f["trial"] for f in doc["front"]] == [rec.number for rec in result.front]
    assert doc["versions"]["intervene"] and doc["search"]["seed"] == 0 and doc["basis"] == "proxy"
    assert (tmp_path / "front.png").stat().st_size > 1000
    # the model is untouched after the search
    assert objective.cheap(model)[0] == pytest.approx(baseline, abs=0) and objective.cheap(model)[1] == 0.0


def test_resume_continues_numbering_and_keeps_results(tmp_path):
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    r = planted_direction(model)
    objective = PlantedProxy(model, r)
    meas = planted_measurements(r)
    space = SearchSpace.default(arch_for_config(model.config), text_config(model.config), meas,
                                max_scale=(0.5, 1.5))
    first = run_search(model, meas, space, objective, tmp_path, SearchSettings(trials=5, seed=1), progress=False)
    second = run_search(model, meas, space, objective, tmp_path, SearchSettings(trials=5, seed=1), progress=False)
    assert [rec.number for rec in first.records] == list(range(5))
    assert [rec.number for rec in second.records] == list(range(10))
    assert [(rec.proxy, rec.kl, rec.params) for rec in second.records[:5]] == \
        [(rec.proxy, rec.kl, rec.params) for rec in first.records]
    # the resumed sampler does not replay the first run's draws
    assert second.records[5].params != first.records[0].params
    other = SearchSpace.default(arch_for_config(model.config), text_config(model.config), meas,
                                max_scale=(0.2, 0.4))
    with pytest.raises(InputError, match="different space"):
        run_search(model, meas, other, objective, tmp_path, SearchSettings(trials=1), progress=False)


def test_moe_front_yamls_load_resolve_and_rescore(tmp_path):
    model = tiny_model("qwen2_moe")
    spec = arch_for_config(model.config)
    r = planted_direction(model)
    meas = planted_measurements(r, layers=2)
    objective = PlantedProxy(model, r)
    space = SearchSpace.default(spec, text_config(model.config), meas, direction_range=(0.0, 1.0),
                                center_range=(0.0, 1.0), width_range=(0.5, 1.0))
    assert space.targets == ("attention", "experts", "shared_experts") and space.router
    result = run_search(model, meas, space, objective, tmp_path, SearchSettings(trials=8, seed=2),
                        model_spec="tiny-qwen2-moe", progress=False)
    assert result.front
    seen_targets = set()
    for rec, path in zip(result.front, result.config_paths):
        cfg = load_config(path)
        assert cfg.model == "tiny-qwen2-moe" and cfg.name == f"search-trial-{rec.number:04d}"
        edits = resolve(cfg, spec, text_config(model.config), meas)
        assert edits and all(e.target in ("attention", "experts", "shared_experts", "router") for e in edits)
        seen_targets |= {e.target for e in edits}
        with apply(model, cfg, meas):
            proxy, kl = objective.cheap(model)
        assert (proxy, kl) == (pytest.approx(rec.proxy, abs=1e-6), pytest.approx(rec.kl, abs=1e-6))
    assert {"attention", "experts"} <= seen_targets
    routed = [rec for rec in result.records if rec.params.get("router")]
    assert all("router.scale" in rec.params for rec in routed)


def test_best_so_far_prefers_low_kl_under_target_rate():
    from intervene.search.report import TrialRecord

    recs = [TrialRecord(0, {}, 0.1, 0.9, "", refusals=0, total=20),
            TrialRecord(1, {}, 0.2, 0.2, "", refusals=1, total=20),
            TrialRecord(2, {}, 0.3, 0.05, "", refusals=5, total=20)]
    assert best_so_far(recs, 0.05).number == 1
    assert best_so_far(recs, 0.0).number == 0
    assert best_so_far(recs[2:], 0.05).number == 2


def test_evenly_spaced_prompt_subset():
    from intervene.search.study import evenly

    assert evenly(list("abcdefghij"), 4) == ["a", "c", "f", "h"]
    assert evenly(list("abc"), 10) == ["a", "b", "c"]
    assert evenly(list("abc"), None) == ["a", "b", "c"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    from intervene.cli import main

    assert main(["search", "smollm2", "--measurements", str(tmp_path / "missing.safetensors"),
                 "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("intervene search: error: measurements file not found") and "\n" not in err
    assert main(["search", "smollm2", "-m", "x.safetensors", "--trials", "-1"]) == 2
    assert "--trials must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe", "gemma3"])
def test_residual_cache_skips_unedited_layers_exactly(arch):
    from intervene.config.schema import parse_config
    from intervene.hooks.apply import apply_edits
    from intervene.hooks.residual_cache import ResidualCache

    model = tiny_model(arch, num_hidden_layers=LAYERS)
    ids = random_ids(batch=3, seq=9, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    enc = {"input_ids": ids, "attention_mask": mask}
    cache = ResidualCache(model, [enc])
    assert cache.self_check(model, enc)
    r = planted_direction(model)
    meas = planted_measurements(r)
    cfg = parse_config({"ablate": [{"layer": 2, "measurement": 1.5, "scale": 0.8},
                                   {"layer": 3, "measurement": 2, "scale": 1.2}]})
    edits = resolve(cfg, arch_for_config(model.config), text_config(model.config), meas)
    with torch.no_grad(), apply_edits(model, edits):
        full = model(**enc).logits[:, -1]
        with cache.starting_at(model, 0, 2):
            skipped = model(**enc).logits[:, -1]
    assert not torch.allclose(full, model(**enc).logits[:, -1].detach(), atol=1e-4)  # the edit matters
    torch.testing.assert_close(skipped, full, atol=1e-5, rtol=1e-5)
    layers = decoder_layers(model)
    assert all(type(layer).__name__ != "_Passthrough" for layer in layers)  # restored
