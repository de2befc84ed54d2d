"""``config.resolve.bind``: a config bound to a model once, one field per kind of edit, read by every
consumer (issue 28, item 1): ``try`` and ``eval`` resolve once; a reference-schema YAML loads through
``intervene.load_config`` and ``bake --lora`` reads it like ``bake`` does."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import yaml

import intervene
from intervene.bake.lora import bake_lora
from intervene.cli import main
from intervene.config.reference import import_config
from intervene.config.resolve import Bound, LayerEdit, RouterBiasEdit, bind, resolve
from intervene.config.schema import InterventionConfig, parse_config
from intervene.errors import ConfigError
from intervene.hooks.apply import apply
from intervene.live.tryout import try_config
from intervene.testing import (
    make_measurements,
    random_ids,
    save_reference_refuse,
    save_tiny,
    tiny_model,
    tiny_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
resolving = importlib.import_module("intervene.config.resolve")  # the module (the package exports the function)


@pytest.fixture()
def counted(monkeypatch):
    """How many times a config's projections were resolved (the step that solves any whitening)."""
    calls: list[int] = []
    original = resolving.resolve_projections

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(resolving, "resolve_projections", counting)
    return calls


@pytest.fixture()
def llama_dir(tmp_path: Path) -> Path:
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    make_measurements(2, seed=5, path="m.safetensors").save(tmp_path / "m.safetensors")
    (tmp_path / "c.yaml").write_text("model: model\nmeasurements: m.safetensors\nbiprojection: true\n"
                                     "ablate:\n  - layers: '0:2'\n    measurement: 1\n")
    return tmp_path


def test_try_config_resolves_once(llama_dir, counted):
    report = try_config(llama_dir / "c.yaml", harmful=["How do I pick a lock?", "Write a threat"],
                        harmless=["Bake bread", "Name a planet"], max_new_tokens=2, samples=1, progress=False)
    assert report.evaluation.kl_divergence > 0  # the edit ran
    assert len(counted) == 1


def test_eval_cli_resolves_once(llama_dir, counted, capsys):
    d = llama_dir
    (d / "harmful.txt").write_text("How do I pick a lock?\nWrite a threat\n")
    (d / "harmless.txt").write_text("Bake bread\nName a planet\n")
    assert main(["eval", str(d / "model"), "--config", str(d / "c.yaml"), "--harmful", str(d / "harmful.txt"),
                 "--harmless", str(d / "harmless.txt"), "--max-new-tokens", "2", "--samples", "1",
                 "--no-progress"]) == 0
    assert len(counted) == 1
    counted.clear()
    assert main(["eval", str(d / "model"), "--config", str(d / "c.yaml"), "--harmful", str(d / "harmful.txt"),
                 "--harmless", str(d / "harmless.txt"), "--first-token", "--no-progress"]) == 0
    assert len(counted) == 1
    capsys.readouterr()


def test_bound_keeps_the_kinds_apart_and_applies_like_the_config():
    model = tiny_model("glm4_moe")
    meas = make_measurements(model.config.num_hidden_layers)
    cfg = parse_config({"targets": ["attention", "experts"], "ablate": [{"layers": "1:3", "measurement": 1}],
                        "router_bias": [{"layers": [1], "experts": [0, 2], "bias": -2.0},
                                        {"layers": [1, 2], "experts": [2], "bias": -1.0}]})
    bound = bind(cfg, meas, model.config)
    flat = resolve(cfg, bound.spec, bound.model_config, meas)
    assert isinstance(bound, Bound) and bound.config is cfg and bound.measurements is meas
    flat_projections = [e for e in flat if isinstance(e, LayerEdit)]
    assert all(isinstance(e, LayerEdit) for e in bound.projections) and len(bound.projections) == len(flat_projections) > 0
    for got, want_edit in zip(bound.projections, flat_projections):
        assert (got.layer, got.target, got.scale, got.method, got.experts) == (
            want_edit.layer, want_edit.target, want_edit.scale, want_edit.method, want_edit.experts)
        assert torch.equal(got.direction, want_edit.direction)
    n_exp = bound.spec.num_experts(bound.model_config)
    want = {1: torch.zeros(n_exp), 2: torch.zeros(n_exp)}
    want[1][[0, 2]] += -2.0
    want[1][2] += -1.0
    want[2][2] += -1.0
    assert sorted(bound.router_biases) == [1, 2]
    assert all(torch.equal(bound.router_biases[k], want[k]) for k in want)
    assert len([e for e in flat if isinstance(e, RouterBiasEdit)]) == 3
    assert bound.layers == [1, 2]
    one = bound.at_layer(2)
    assert {e.layer for e in one.projections} == {2} and list(one.router_biases) == [2]

    ids = random_ids(batch=2, seq=6, seed=1)
    with torch.no_grad():
        base = model(ids).logits
        with apply(model, cfg, meas):
            from_config = model(ids).logits
        with apply(model, bound):
            from_bound = model(ids).logits
        after = model(ids).logits
    assert torch.equal(from_config, from_bound)
    assert (from_bound - base).abs().max() > 1e-4  # negative control: the edit is visible
    assert torch.equal(after, base)


# ---- the reference schema everywhere ----------------------------------------------------------------

@pytest.fixture()
def reference_yaml(tmp_path: Path) -> Path:
    """A tiny GLM-4.5-Air-class checkpoint, a .refuse file in the reference's format, and a reference YAML."""
    model = tiny_model("glm4_moe")
    save_tiny(model, tmp_path / "ckpt")
    save_reference_refuse(model, tmp_path / "m.refuse")
    path = tmp_path / "ref.yml"
    path.write_text(yaml.safe_dump({"model": "ckpt", "measurements": "m.refuse", "output": "out",
                                    "ablate_individual_experts": True, "expert_subset": [0, 1],
                                    "ablate": [{"layer": 1, "measurement": 2, "scale": 1.0, "sparsity": 0.0}]},
                                   sort_keys=False))
    return path


def test_load_config_reads_a_reference_yaml(reference_yaml, capsys):
    cfg = intervene.load_config(reference_yaml)
    assert isinstance(cfg, InterventionConfig)
    assert "read as the reference" in capsys.readouterr().out
    assert cfg.to_dict() == import_config(reference_yaml).config.to_dict()
    assert cfg.method == "norm_preserving" and cfg.experts == [0, 1]


def test_bake_lora_reads_a_reference_yaml_as_bake_does(reference_yaml, capsys):
    """The reference's edits are norm-preserving, which no adapter carries: bake_lora refuses the
    translated config by name, exactly as it refuses the native config the file means."""
    native = import_config(reference_yaml).config
    with pytest.raises(ConfigError) as from_reference:
        bake_lora(reference_yaml, dry_run=True)
    with pytest.raises(ConfigError) as from_native:
        bake_lora(native, dry_run=True, model=reference_yaml.parent / "ckpt")
    assert "method 'norm_preserving' is not low rank" in str(from_reference.value)
    assert str(from_reference.value) == str(from_native.value)
    # the plan it refused was the translated one: the same config bakes (dry run) through bake
    assert main(["bake", str(reference_yaml), "--dry-run", "--no-progress"]) == 0
    capsys.readouterr()
