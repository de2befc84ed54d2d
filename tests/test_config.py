"""The YAML config schema: parsing errors, validation against a model, resolution to edits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from intervene.arch import get_arch
from intervene.config.resolve import LayerEdit, resolve, validate
from intervene.config.schema import load_config, parse_config
from intervene.errors import ConfigError, InputError, MeasurementError
from intervene.io.measurements import Measurements
from intervene.testing import tiny_config

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
HIDDEN = 64


def measurements(layers, hidden: int = HIDDEN, seed: int = 0, embed: bool = False) -> Measurements:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    names = list(layers) + (["embed"] if embed else [])
    for n in names:
        tensors[f"harmful_mean.{n}"] = torch.randn(hidden, generator=g)
        tensors[f"harmless_mean.{n}"] = torch.randn(hidden, generator=g)
        tensors[f"direction.{n}"] = tensors[f"harmful_mean.{n}"] - tensors[f"harmless_mean.{n}"]
    return Measurements(tensors=tensors, path="m.safetensors")


def cfg(**kw):
    data = {"ablate": [{"layer": 0, "measurement": 0}]}
    data.update(kw)
    return parse_config(data)


def entry(**kw):
    return parse_config({"ablate": [kw]})


# ---- parsing: one case per message ------------------------------------------------------------

@pytest.mark.parametrize("data,message", [
    ([1, 2], "top level must be a mapping"),
    (None, "top level must be a mapping"),
    ({"ablate": [{"layer": 0, "measurement": 0}], "modle": "x"}, "unknown key(s) 'modle'; valid keys: model,"),
    ({"ablate": [{"layer": 0, "measurement": 0}], "method": "orthogonalize"},
     "method 'orthogonalize' unknown; valid: project, norm_preserving"),
    ({"ablate": [{"layer": 0, "measurement": 0}], "targets": ["attn"]},
     "unknown target(s) 'attn' in 'targets'; valid: attention, mlp, experts, shared_experts, router, expert_inputs"),
    ({"ablate": [{"layer": 0, "measurement": 0}], "targets": []}, "'targets' must be a non-empty list"),
    ({}, "'ablate' must be a non-empty list"),
    ({"ablate": []}, "'ablate' must be a non-empty list"),
    ({"ablate": {"layer": 0}}, "'ablate' must be a non-empty list"),
    ({"ablate": [{"layer": 0, "measurement": 0}], "biprojection": "yes"}, "biprojection must be true or false"),
    ({"ablate": [{"layer": 0, "measurement": 0}], "chat_template": 1}, "chat_template must be true or false"),
    ({"ablate": [{"layer": 0, "measurement": 0}], "model": 5}, "'model' must be a string, got 5"),
    ({"ablate": [{"layer": 0, "measurement": 0}], "dtype": "float8"}, "dtype 'float8' unknown; valid: float32"),
    ({"ablate": [{"layer": 0, "measurement": 0}], "experts": "some"}, "'experts' must be 'all', a list of expert ids"),
    ({"ablate": [{"layer": 0, "measurement": 0}], "experts": [-1]}, "'experts' must be 'all', a list of expert ids"),
    ({"ablate": [{"layer": 0, "measurement": 0}], "experts": []}, "'experts' must be 'all', a list of expert ids"),
    ({"ablate": [{"layer": 0, "measurement": 0}], "experts": {"x": [1]}}, "'experts' keys must be layer numbers"),
    ({"ablate": [{"layer": 0, "measurement": 0}], "experts": {3: [True]}}, "'experts' for layer 3 must be a non-empty"),
    ({"ablate": [{"layer": 0, "measurement": 0}], "experts": {3: []}}, "'experts' for layer 3 must be a non-empty"),
])
def test_top_level_errors(data, message):
    with pytest.raises(ConfigError) as err:
        parse_config(data, where="c.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("c.yaml: ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("raw,message", [
    (5, "ablate[1] must be a mapping"),
    ({"layer": 0, "layers": "0:2", "measurement": 0}, "give exactly one of 'layer' or 'layers'"),
    ({"measurement": 0}, "give exactly one of 'layer' or 'layers'"),
    ({"layer": 0, "measurement": 0, "scal": 1}, "unknown key(s) 'scal'; valid keys: layer, layers, measurement"),
    ({"layer": 0}, "missing 'measurement'"),
    ({"layer": 0, "measurement": True}, "measurement must be a layer index"),
    ({"layer": 0, "measurement": "last"}, "measurement must be a layer index"),
    ({"layer": 0, "measurement": -1}, "measurement must be a finite layer index >= 0, got -1"),
    ({"layer": 0, "measurement": -0.5}, "measurement must be a finite layer index >= 0"),
    ({"layer": 0, "measurement": float("inf")}, "measurement must be a finite layer index >= 0, got inf"),
    ({"layer": 0, "measurement": float("nan")}, "measurement must be a finite layer index >= 0"),
    ({"layer": 0, "measurement": 0, "scale": 0}, "scale must be a finite number > 0, got 0"),
    ({"layer": 0, "measurement": 0, "scale": -1.0}, "scale must be a finite number > 0"),
    ({"layer": 0, "measurement": 0, "scale": float("nan")}, "scale must be a finite number > 0"),
    ({"layer": 0, "measurement": 0, "scale": "big"}, "scale must be a number, got 'big'"),
    ({"layer": 0, "measurement": 0, "scale": {"atention": 1}}, "unknown target(s) 'atention' in scale"),
    ({"layer": 0, "measurement": 0, "scale": {"mlp": 0}}, "scale.mlp: scale must be a finite number > 0"),
    ({"layer": 0, "measurement": 0, "sparsity": 1.0}, "sparsity must be in [0, 1), got 1.0"),
    ({"layer": 0, "measurement": 0, "sparsity": -0.1}, "sparsity must be in [0, 1)"),
    ({"layer": 0, "measurement": 0, "sparsity": True}, "sparsity must be a number"),
    ({"layers": "5:5", "measurement": 0}, "layer range '5:5' is empty (end is exclusive)"),
    ({"layers": "a:b", "measurement": 0}, "layer range 'a:b' must look like 'start:end'"),
    ({"layers": "5", "measurement": 0}, "layers must be an int, a list of ints, or a range"),
    ({"layer": True, "measurement": 0}, "layers must be ints, a list, or a range"),
    ({"layers": [1, "2"], "measurement": 0}, "layers must be an int, a list of ints, or a range"),
    ({"layer": 0, "measurement": 0, "targets": ["routers"]}, "unknown target(s) 'routers' in 'targets'"),
])
def test_entry_errors(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_config({"ablate": [{"layer": 0, "measurement": 0}, raw]}, where="c.yaml")
    text = str(err.value)
    assert text.startswith("c.yaml: ablate[1]"), text
    assert message in text


def test_parse_defaults_and_shorthands():
    c = parse_config({"ablate": [
        {"layers": "2:5", "measurement": 3.0},
        {"layers": [7, 9], "measurement": 2.5, "scale": {"attention": 0.5}, "sparsity": 0.2, "targets": "attention"},
        {"layer": 1, "measurement": "embed"},
    ]})
    assert c.method == "project" and c.biprojection is False and c.experts == "all" and c.targets is None
    assert c.ablate[0].layers == [2, 3, 4] and c.ablate[0].measurement == 3 and isinstance(c.ablate[0].measurement, int)
    assert c.ablate[1].layers == [7, 9] and c.ablate[1].measurement == 2.5 and c.ablate[1].targets == ["attention"]
    assert c.ablate[1].scale_for("attention") == 0.5 and c.ablate[1].scale_for("mlp") is None
    assert c.ablate[2].measurement == "embed"
    assert parse_config({"ablate": [{"layer": 0, "measurement": 0}], "experts": [5, 1, 5]}).experts == [1, 5]
    assert parse_config({"ablate": [{"layer": 0, "measurement": 0}], "experts": {"3": [2, 1]}}).experts == {3: [1, 2]}


def test_yaml_round_trip(tmp_path):
    original = parse_config({
        "model": "m", "measurements": "x.safetensors", "method": "norm_preserving", "biprojection": True,
        "targets": ["attention", "experts"], "experts": {1: [0, 3]},
        "ablate": [{"layers": "1:3", "measurement": 1.5, "scale": {"attention": 0.5, "experts": 1.0}, "sparsity": 0.1},
                   {"layer": 2, "measurement": "embed", "targets": ["router"]}],
    })
    path = tmp_path / "c.yaml"
    original.save(path)
    again = load_config(path)
    assert again == original
    assert yaml.safe_load(path.read_text())["experts"] == {1: [0, 3]}


# ---- files ---------------------------------------------------------------------------------------

def test_load_config_file_errors(tmp_path):
    with pytest.raises(InputError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ablate: [layer: 0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML"):
        load_config(bad)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="bin.yaml"):
        load_config(binary)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty.yaml: top level must be a mapping"):
        load_config(empty)


def test_relative_paths_are_found_next_to_the_config(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.safetensors").write_bytes(b"")
    (tmp_path / "sub" / "c.yaml").write_text("measurements: m.safetensors\nmodel: not-here\n"
                                             "ablate: [{layer: 0, measurement: 0}]\n")
    monkeypatch.chdir(tmp_path)
    c = load_config("sub/c.yaml")
    assert c.measurements == str(Path("sub") / "m.safetensors")
    assert c.model == "not-here"  # not next to the config: taken as given (a spec like 'organism')
    assert c.source == "sub/c.yaml"


def test_every_shipped_config_loads():
    files = sorted(CONFIGS_DIR.glob("*.yaml"))
    names = {f.name for f in files}
    assert {"dense.yaml", "moe.yaml", "router_study.yaml"} <= names
    for f in files:
        c = load_config(f)
        assert c.ablate and c.model and c.measurements, f


def test_shipped_moe_configs_validate_on_their_architecture():
    """moe.yaml and router_study.yaml name DeepSeek/GLM-style targets: they validate on a
    DeepSeek-V3 layout (layers scaled down to the tiny model)."""
    spec = get_arch("deepseek_v3")
    model_config = tiny_config("deepseek_v3")
    expected_targets = {"moe.yaml": {"attention", "mlp", "experts", "shared_experts", "router"},
                        "router_study.yaml": {"router", "expert_inputs"}}
    for name, targets in expected_targets.items():
        c = load_config(CONFIGS_DIR / name)
        for e in c.ablate:  # the tiny model has 3 layers: map every layer/measurement into range
            e.layers = [1 + layer % 2 for layer in e.layers]
            e.measurement = 1 if e.measurement != "embed" else e.measurement
        if isinstance(c.experts, dict):
            c.experts = {1: list(c.experts.values())[0]}
        if c.experts != "all":
            c.experts = [i % 8 for i in c.experts] if isinstance(c.experts, list) else {
                k: [i % 8 for i in v] for k, v in c.experts.items()}
        edits = resolve(c, spec, model_config, measurements(range(3), embed=True))
        assert {e.target for e in edits} == targets


# ---- validation against a model -------------------------------------------------------------------

DENSE = ("llama", tiny_config("llama"))  # 2 layers
MOE = ("deepseek_v3", tiny_config("deepseek_v3"))  # 3 layers, layer 0 dense, 8 experts


def check(c, arch=DENSE, meas=None):
    name, model_config = arch
    validate(c, get_arch(name), model_config, meas or measurements(range(model_config.num_hidden_layers)))


@pytest.mark.parametrize("c,arch,message", [
    (cfg(ablate=[{"layer": 2, "measurement": 0}]), DENSE, "ablate[0] layer 2 out of range; the model has layers 0..1"),
    (cfg(ablate=[{"layers": "-1:1", "measurement": 0}]), DENSE, "layer -1 out of range"),
    (cfg(ablate=[{"layer": 0, "measurement": 5}]), DENSE, "measurement 5 needs 'direction.5', not in m.safetensors; measured layers: 0..1"),
    (cfg(ablate=[{"layer": 0, "measurement": 1.5}]), DENSE, "measurement 1.5 needs 'direction.2'"),
    (cfg(ablate=[{"layer": 0, "measurement": "embed"}]), DENSE, "needs 'direction.embed'"),
    (cfg(targets=["router"]), DENSE, "target(s) router not present in architecture 'llama'; valid: attention, mlp"),
    (cfg(ablate=[{"layer": 0, "measurement": 0, "targets": ["experts", "router"]}]), DENSE,
     "target(s) experts, router not present in architecture 'llama'"),
    (cfg(ablate=[{"layer": 0, "measurement": 0, "scale": {"shared_experts": 1}}]), DENSE,
     "target(s) shared_experts not present"),
    (cfg(ablate=[{"layer": 0, "measurement": 0, "scale": {"router": 0.5}}]), MOE,
     "ablate[0] scale names router but the entry's targets are attention, mlp, experts, shared_experts; add it to 'targets'"),
    (cfg(experts=[1]), DENSE, "'experts' subset given but architecture 'llama' has no experts"),
    (cfg(experts=[1], targets=["attention", "router"]), MOE, "'experts' subset given but no entry targets experts or expert_inputs"),
    (cfg(experts=[8], targets=["experts"]), MOE, "expert id 8 out of range; the model has experts 0..7"),
    (cfg(experts={0: [1]}, targets=["experts"]), MOE, "'experts' names layer 0, which is not a MoE layer"),
])
def test_validation_errors(c, arch, message):
    with pytest.raises(ConfigError) as err:
        check(c, arch)
    assert message in str(err.value)


def test_biprojection_needs_the_target_layer_harmless_mean():
    m = measurements([0, 1])
    del m.tensors["harmless_mean.1"]
    c = cfg(biprojection=True, ablate=[{"layer": 1, "measurement": 0}])
    with pytest.raises(ConfigError, match=r"biprojection needs 'harmless_mean.1' \(target layer\)"):
        check(c, DENSE, m)
    check(cfg(biprojection=True, ablate=[{"layer": 0, "measurement": 1}]), DENSE, m)  # harmless_mean.0 exists


def test_measurements_from_another_model():
    with pytest.raises(MeasurementError, match="hidden size 32 but the model has hidden size 64"):
        check(cfg(), DENSE, measurements([0, 1], hidden=32))


# ---- resolution -----------------------------------------------------------------------------------

def test_resolve_expands_layers_targets_scales_and_experts_in_order():
    c = parse_config({"targets": ["attention", "experts", "router"], "experts": [2], "ablate": [
        {"layers": "1:3", "measurement": 1, "scale": {"attention": 0.5, "experts": 1.0, "router": 0.25}},
        {"layer": 0, "measurement": 2, "targets": ["attention", "mlp"]},
    ]})
    meas = measurements(range(3))
    edits = resolve(c, get_arch("deepseek_v3"), tiny_config("deepseek_v3"), meas)
    assert [(e.layer, e.target, e.scale, e.experts) for e in edits] == [
        (1, "attention", 0.5, None), (1, "experts", 1.0, (2,)), (1, "router", 0.25, None),
        (2, "attention", 0.5, None), (2, "experts", 1.0, (2,)), (2, "router", 0.25, None),
        (0, "attention", 1.0, None), (0, "mlp", 1.0, None),
    ]
    r1 = meas.direction(1) / meas.direction(1).norm()
    assert all(isinstance(e, LayerEdit) and e.method == "project" for e in edits)
    assert torch.allclose(edits[0].direction, r1) and torch.allclose(edits[4].direction, r1)
    r2 = meas.direction(2) / meas.direction(2).norm()
    assert torch.allclose(edits[-1].direction, r2)


def test_resolve_default_targets_are_the_write_targets_the_architecture_has():
    edits = resolve(cfg(), get_arch("llama"), tiny_config("llama"), measurements(range(2)))
    assert [e.target for e in edits] == ["attention", "mlp"]
    edits = resolve(cfg(ablate=[{"layer": 1, "measurement": 0}]), get_arch("qwen2_moe"), tiny_config("qwen2_moe"),
                    measurements(range(2)))
    assert [e.target for e in edits] == ["attention", "mlp", "experts", "shared_experts"]


def test_resolve_direction_interpolation_biprojection_sparsity():
    meas = measurements(range(2))
    c = parse_config({"biprojection": True, "ablate": [{"layer": 1, "measurement": 0.25, "sparsity": 0.75}]})
    edit = resolve(c, get_arch("llama"), tiny_config("llama"), meas)[0]
    r = 0.75 * meas.direction(0) + 0.25 * meas.direction(1)
    m_hat = meas.harmless_mean(1) / meas.harmless_mean(1).norm()
    r = r - (r @ m_hat) * m_hat
    keep = r.abs().topk(HIDDEN // 4).indices
    sparse = torch.zeros_like(r)
    sparse[keep] = r[keep]
    expected = sparse / sparse.norm()
    assert torch.allclose(edit.direction, expected, atol=1e-6)
    assert int((edit.direction != 0).sum()) == HIDDEN // 4
