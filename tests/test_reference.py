"""The reference tool's configs, flags and .refuse files mean what its documents say (issue 15).

The expected tensors are computed here from the seeds' description (003 §3.3, 002, 001), independently of
intervene's maths and tables: the direction is refuse_M of the .refuse file, biprojected against
harmless_{layer}, top-fraction sparsified, normalised; each column (write side) or row (read side) of a
stored [out, in] weight keeps its norm; the router at half the order's scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from intervene.cli import main
from intervene.config.reference import load_any_config
from intervene.errors import ConfigError
from intervene.io.measurements import load_measurements
from intervene.testing import save_reference_refuse, save_tiny, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-5
N_EXPERTS = 8  # testing.TINY glm4_moe: 3 layers, layer 0 dense (first_k_dense_replace=1), 8 routed experts


# ---- fixtures and the independent implementation -------------------------------------------------

@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    """A tiny GLM-4.5-Air-class checkpoint (per-expert keys on disk, as GLM-4.5-Air ships) and a .refuse
    file in the reference's format: hidden states 0..L, refuse_i = harmful_i - harmless_i."""
    d = tmp_path_factory.mktemp("glm")
    model = tiny_model("glm4_moe")
    save_tiny(model, d / "ckpt")
    save_reference_refuse(model, d / "m.refuse")
    return d


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def reference_direction(refuse: dict, layer: int, measurement: int, sparsity: float) -> torch.Tensor:
    r = refuse[f"refuse_{measurement}"].double()
    m = refuse[f"harmless_{layer}"].double()
    m = m / m.norm()
    r = r - (r @ m) * m
    if 0 < sparsity < 1:  # keep the top fraction by magnitude (ties with the k-th kept)
        k = int(r.numel() * sparsity)
        threshold = r.abs().topk(k).values.min()
        r = r * (r.abs() >= threshold)
    return r / r.norm()


def norm_preserving(weight: torch.Tensor, r: torch.Tensor, scale: float, side: str) -> torch.Tensor:
    """Stored [out, in]. Write side: the vectors in hidden space are the columns; read side: the rows."""
    w = weight.double()
    v = w.T if side == "write" else w
    norms = v.norm(dim=1, keepdim=True)
    unit = v / norms
    new = unit - scale * (unit @ r)[:, None] * r[None, :]
    new = new / new.norm(dim=1, keepdim=True) * norms
    return (new.T if side == "write" else new).to(weight.dtype)


def expected_edits(orders, individual: bool, subset) -> dict[str, tuple[str, float, int, int, float]]:
    """key -> (side, scale factor, layer, measurement, sparsity) from the documents, per layer kind."""
    out = {}
    for o in orders:
        layer, meas, scale, sparsity = o["layer"], o["measurement"], o["scale"], o["sparsity"]
        p = f"model.layers.{layer}."

        def add(key: str, side: str, factor: float = 1.0) -> None:
            out[p + key] = (side, scale * factor, layer, meas, sparsity)

        add("self_attn.o_proj.weight", "write")
        if layer == 0:  # dense layer: o_proj + mlp.down_proj
            add("mlp.down_proj.weight", "write")
            continue
        add("mlp.shared_experts.down_proj.weight", "write")
        add("mlp.gate.weight", "read", 0.5)
        if individual:
            for e in (range(N_EXPERTS) if subset is None else subset):
                add(f"mlp.experts.{e}.down_proj.weight", "write")
                add(f"mlp.experts.{e}.gate_proj.weight", "read")
                add(f"mlp.experts.{e}.up_proj.weight", "read")
    return out


def check_baked(glm: Path, out: Path, orders, individual: bool, subset) -> None:
    refuse = torch.load(glm / "m.refuse", weights_only=True)
    src, baked = tensors(glm / "ckpt"), tensors(out)
    assert src.keys() == baked.keys()
    want = expected_edits(orders, individual, subset)
    for key, t in baked.items():
        if key not in want:
            assert torch.equal(t, src[key]), f"{key} should be untouched"
            continue
        side, scale, layer, meas, sparsity = want[key]
        expected = norm_preserving(src[key], reference_direction(refuse, layer, meas, sparsity), scale, side)
        assert (t.double() - expected.double()).abs().max() <= TOL, key
        assert (t - src[key]).abs().max() > 1e-4, f"{key} should be edited"


ORDERS = [{"layer": 0, "measurement": 1, "scale": 1.0, "sparsity": 0.0},
          {"layer": 1, "measurement": 2, "scale": 1.2, "sparsity": 0.25},
          {"layer": 2, "measurement": 2, "scale": 0.8, "sparsity": 0.0}]


def write_reference(glm: Path, name: str, **moe) -> Path:
    path = glm / name
    path.write_text(yaml.safe_dump({"model": "ckpt", "measurements": "m.refuse", "output": "out", **moe,
                                    "ablate": ORDERS}, sort_keys=False))
    return path


# ---- acceptance: reference YAMLs bake the documented edit ------------------------------------------

CASES = {
    "individual-subset": ({"ablate_individual_experts": True, "expert_subset": [0, 1, 2, 3]}, [], True, [0, 1, 2, 3]),
    "moe-defaults": ({}, [], False, None),
    "cli-individual-all": ({}, ["--ablate-individual-experts"], True, None),
    "cli-subset-over-yaml": ({"ablate_individual_experts": False, "expert_subset": [0, 1]},
                             ["--ablate-individual-experts", "--expert-subset", "5,1"], True, [1, 5]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reference_yaml_bakes_the_documented_edit(glm, tmp_path, capsys, case):
    moe, flags, individual, subset = CASES[case]
    cfg = write_reference(glm, f"ref-{case}.yml", **moe)
    out = tmp_path / "out"
    assert main(["bake", str(cfg), "-o", str(out), "--no-progress", *flags]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if "read as the reference" in line]
    assert len(lines) == 1, printed  # one line says how the file was read
    check_baked(glm, out, ORDERS, individual, subset)


def test_verify_passes_on_a_reference_bake_with_the_cli_flags(glm, tmp_path, capsys):
    cfg = write_reference(glm, "ref-verify.yml")
    out = tmp_path / "out"
    flags = ["--expert-subset", "2,3"]
    assert main(["bake", str(cfg), "-o", str(out), "--no-progress", *flags]) == 0
    assert main(["verify", str(cfg), str(out), "--random-tokens", "4", "--no-progress", *flags]) == 0
    assert "PASS" in capsys.readouterr().out
    # negative control: verifying without the flags compares against a different edit
    assert main(["verify", str(cfg), str(out), "--random-tokens", "4", "--no-progress"]) == 1


def test_import_config_output_bakes_byte_identical_shards(glm, tmp_path, capsys):
    cfg = write_reference(glm, "ref-import.yml", ablate_individual_experts=True, expert_subset=[0, 1, 2, 3])
    native = tmp_path / "sub" / "native.yaml"
    native.parent.mkdir()
    assert main(["import-config", str(cfg), "-o", str(native)]) == 0
    printed = capsys.readouterr().out
    assert "measurement 1 (refuse_2 = hidden state 2 = output of decoder layer 1)" in printed
    assert "router x0.6" in printed and "not expressed in the native config" in printed
    data = yaml.safe_load(native.read_text())
    assert not {"ablate_individual_experts", "expert_subset"} & set(data)  # native keys only
    assert data["method"] == "norm_preserving" and data["indexing"] == "layer_output"
    assert data["ablate"][1]["keep"] == 16 and data["ablate"][1]["biprojection_mean"] == 0
    assert data["ablate"][0]["biprojection_mean"] == "embed"
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["bake", str(cfg), "-o", str(a), "--no-progress"]) == 0
    assert main(["bake", str(native), "-o", str(b), "--no-progress"]) == 0
    assert "read as the reference" not in capsys.readouterr().out.split("baked")[-1]
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in b.glob("*.safetensors"))
    for name in shards:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_import_config_refuses_a_native_config(glm, tmp_path, capsys):
    native = tmp_path / "n.yaml"
    native.write_text(yaml.safe_dump({"model": str(glm / "ckpt"), "measurements": str(glm / "m.refuse"),
                                      "indexing": "layer_output", "ablate": [{"layer": 1, "measurement": 0}]}))
    assert main(["import-config", str(native)]) == 2
    assert "native intervene config already" in capsys.readouterr().err


# ---- the three silent differences (each fails on the behaviour before issue 15) ---------------------

def _baked_o_proj(glm: Path, tmp_path: Path, cfg: Path, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = tmp_path / "out"
    assert main(["bake", str(cfg), "-o", str(out), "--no-progress"]) == 0
    key = f"model.layers.{layer}.self_attn.o_proj.weight"
    return tensors(glm / "ckpt")[key], tensors(out)[key]


def _one_order_is_documented_not_alternative(glm, tmp_path, name, order, alternative) -> None:
    """Bake a one-entry reference YAML: its o_proj equals the documented edit, not ``alternative``
    (refuse file, sparsity) -- the behaviour before issue 15."""
    path = glm / f"ref-{name}.yml"
    path.write_text(yaml.safe_dump({"model": "ckpt", "measurements": "m.refuse", "ablate": [order]}))
    src, baked = _baked_o_proj(glm, tmp_path, path, order["layer"])
    refuse = torch.load(glm / "m.refuse", weights_only=True)
    right = norm_preserving(src, reference_direction(refuse, order["layer"], order["measurement"], order["sparsity"]),
                            1.0, "write")
    wrong_refuse, wrong_sparsity = alternative(refuse)
    wrong = norm_preserving(src, reference_direction(wrong_refuse, order["layer"], order["measurement"],
                                                     wrong_sparsity), 1.0, "write")
    assert (baked.double() - right.double()).abs().max() <= TOL
    assert (baked.double() - wrong.double()).abs().max() > 1e-3


def test_reference_sparsity_keeps_the_top_fraction(glm, tmp_path):
    # sparsity 0.25 keeps 16 of 64 components; zeroing 25 % would keep 48
    _one_order_is_documented_not_alternative(glm, tmp_path, "sparsity",
                                             {"layer": 1, "measurement": 2, "scale": 1.0, "sparsity": 0.25},
                                             lambda refuse: (refuse, 0.75))


def test_reference_measurement_indexes_hidden_states(glm, tmp_path):
    # refuse_2 is hidden state 2 (output of decoder layer 1); direction.2 would be refuse_3, the next layer's
    _one_order_is_documented_not_alternative(
        glm, tmp_path, "index", {"layer": 2, "measurement": 2, "scale": 1.0, "sparsity": 0.0},
        lambda refuse: (dict(refuse, refuse_2=refuse["refuse_3"], harmless_2=refuse["harmless_3"]), 0.0))


def test_reference_default_moe_targets_are_o_proj_shared_experts_and_half_router(glm, tmp_path):
    path = glm / "ref-defaults.yml"
    path.write_text(yaml.safe_dump({"model": "ckpt", "measurements": "m.refuse", "ablate": [
        {"layer": 1, "measurement": 2, "scale": 1.0, "sparsity": 0.0}]}))
    out = tmp_path / "out"
    assert main(["bake", str(path), "-o", str(out), "--no-progress"]) == 0
    src, baked = tensors(glm / "ckpt"), tensors(out)
    changed = {k for k in src if not torch.equal(src[k], baked[k])}
    p = "model.layers.1."
    assert changed == {p + "self_attn.o_proj.weight", p + "mlp.shared_experts.down_proj.weight", p + "mlp.gate.weight"}
    refuse = torch.load(glm / "m.refuse", weights_only=True)
    router = norm_preserving(src[p + "mlp.gate.weight"], reference_direction(refuse, 1, 2, 0.0), 0.5, "read")
    assert (baked[p + "mlp.gate.weight"].double() - router.double()).abs().max() <= TOL


# ---- item 3: native configs keep their meaning; .refuse conversions cannot shift layers silently ----

@pytest.fixture(scope="module")
def converted(glm, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "m.safetensors"
    assert main(["measure", "--from-refuse", str(glm / "m.refuse"), "-o", str(out)]) == 0
    return out


def _native(glm: Path, path: Path, measurements: Path, **top) -> Path:
    path.write_text(yaml.safe_dump({"model": str(glm / "ckpt"), "measurements": str(measurements),
                                    "method": "project", "targets": ["attention"], **top,
                                    "ablate": [{"layer": 2, "measurement": 2}]}))
    return path


def test_converted_refuse_records_its_indexing_and_a_native_config_must_state_its_own(glm, converted, tmp_path, capsys):
    assert load_measurements(converted).meta["source_indexing"] == "hidden_state"
    cfg = _native(glm, tmp_path / "n.yaml", converted)
    assert main(["bake", str(cfg), "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "converted from a .refuse file" in err and "indexing: layer_output" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _assert_projected(glm: Path, tmp_path: Path, cfg: Path, direction: torch.Tensor) -> None:
    """Layer 2's o_proj baked as the plain write-side projection of ``direction``."""
    src, baked = _baked_o_proj(glm, tmp_path, cfg, 2)
    r = direction.double() / direction.double().norm()
    assert (baked.double() - (src.double() - torch.outer(r, r @ src.double()))).abs().max() <= TOL


@pytest.mark.parametrize("indexing,source", [("layer_output", "refuse_3"), ("hidden_state", "refuse_2")])
def test_native_indexing_names_the_direction(glm, converted, tmp_path, indexing, source):
    cfg = _native(glm, tmp_path / "n.yaml", converted, indexing=indexing)
    _assert_projected(glm, tmp_path, cfg, torch.load(glm / "m.refuse", weights_only=True)[source])


def test_native_measurements_need_no_indexing(glm, tmp_path):
    from intervene.testing import make_measurements

    meas = tmp_path / "native.safetensors"
    make_measurements(3).save(meas)
    _assert_projected(glm, tmp_path, _native(glm, tmp_path / "n.yaml", meas), load_measurements(meas).direction(2))


# ---- parsing: detection, flags, errors -----------------------------------------------------------

def test_dense_layers_only_with_a_subset_edit_o_proj_and_mlp(glm, tmp_path):
    """GLM's layer 0 is dense: the subset has nothing to act on there (no error, no expert edited)."""
    path = glm / "ref-dense.yml"
    path.write_text(yaml.safe_dump({"model": "ckpt", "measurements": "m.refuse", "expert_subset": [1],
                                    "ablate_individual_experts": True,
                                    "ablate": [{"layer": 0, "measurement": 1.0, "scale": 1, "sparsity": 0}]}))
    out = tmp_path / "out"
    assert main(["bake", str(path), "-o", str(out), "--no-progress"]) == 0
    check_baked(glm, out, [{"layer": 0, "measurement": 1, "scale": 1.0, "sparsity": 0.0}], True, [1])


def test_reference_keys_with_native_keys_is_an_error(glm):
    path = glm / "mixed.yml"
    path.write_text(yaml.safe_dump({"model": "ckpt", "measurements": "m.refuse", "ablate_individual_experts": True,
                                    "method": "project", "ablate": ORDERS}))
    with pytest.raises(ConfigError, match="mixes the reference schema"):
        load_any_config(path)


def test_reference_flags_on_a_native_config_are_an_error(glm, tmp_path, capsys):
    cfg = _native(glm, tmp_path / "n.yaml", glm / "m.refuse", indexing="layer_output")
    assert main(["bake", str(cfg), "-o", str(tmp_path / "o"), "--expert-subset", "0,1"]) == 2
    assert "apply to reference-schema configs" in capsys.readouterr().err


@pytest.mark.parametrize("flag,message", [("0,x", "comma-separated expert ids"), ("9", "expert id 9 out of range")])
def test_bad_expert_subset_is_a_named_error(glm, tmp_path, capsys, flag, message):
    cfg = write_reference(glm, "ref-bad.yml")
    assert main(["bake", str(cfg), "-o", str(tmp_path / "o"), "--expert-subset", flag]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1


def test_native_keep_and_biprojection_mean(tmp_path):
    """The native keys the translation uses, against the direction computed here."""
    from intervene.arch import get_arch
    from intervene.config.resolve import resolve
    from intervene.config.schema import parse_config
    from intervene.testing import make_measurements, tiny_config

    meas = make_measurements(2)
    cfg = parse_config({"targets": ["attention"], "ablate": [
        {"layer": 1, "measurement": 0, "keep": 5, "biprojection_mean": "embed"}]})
    with pytest.raises(ConfigError, match="harmless_mean.embed"):
        resolve(cfg, get_arch("llama"), tiny_config("llama"), meas)
    meas.tensors["harmless_mean.embed"] = torch.randn(64)
    (edit,) = resolve(cfg, get_arch("llama"), tiny_config("llama"), meas)
    r = meas.direction(0).double()
    m = meas.tensors["harmless_mean.embed"].double()
    m = m / m.norm()
    r = r - (r @ m) * m
    r = r * (r.abs() >= r.abs().topk(5).values.min())
    assert int((edit.direction != 0).sum()) == 5
    assert (edit.direction.double() - r / r.norm()).abs().max() <= 1e-6
    with pytest.raises(ConfigError, match="not both"):
        parse_config({"ablate": [{"layer": 1, "measurement": 0, "keep": 5, "sparsity": 0.5}]})


# ---- item 4: bitsandbytes on load -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from intervene.testing import tiny_tokenizer

    d = tmp_path_factory.mktemp("llama")
    save_tiny(tiny_model("llama", intermediate_size=128), d)  # bitsandbytes' CPU 4-bit needs in % 64 == 0
    tiny_tokenizer().save_pretrained(str(d))
    return d


def test_quantized_load_where_bitsandbytes_cannot_run_is_one_line(tmp_path, capsys):
    """On this CPU-only machine bitsandbytes' 4-bit kernels reject in_features 96 (block size 64): the
    load says so in one line instead of failing inside the first measurement batch."""
    pytest.importorskip("bitsandbytes")
    from intervene.testing import tiny_tokenizer

    save_tiny(tiny_model("llama"), tmp_path / "m")  # mlp.down_proj in_features 96
    tiny_tokenizer().save_pretrained(str(tmp_path / "m"))
    rc = main(["measure", str(tmp_path / "m"), "--load-in-4bit", "--limit", "4", "-o", str(tmp_path / "x.safetensors"),
               "--no-progress"])
    err = capsys.readouterr().err
    if rc == 0:  # a bitsandbytes that takes these shapes (or a GPU): nothing to refuse
        pytest.skip("bitsandbytes runs this model here")
    errors = [line for line in err.splitlines() if "error" in line]  # (stderr also has the save's progress bar)
    assert rc == 2 and len(errors) == 1 and "bitsandbytes cannot run" in errors[0] and "CUDA" in errors[0], err


@pytest.mark.parametrize("flag", ["--load-in-4bit", "--load-in-8bit"])
def test_quantized_load_without_bitsandbytes_is_one_line(tiny_llama, tmp_path, capsys, monkeypatch, flag):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    rc = main(["measure", str(tiny_llama), flag, "--limit", "4", "-o", str(tmp_path / "m.safetensors"),
               "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{flag} needs bitsandbytes" in err and "intervene[quant]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.safetensors").exists()


def test_measure_in_4bit_runs_and_is_close_to_float32(tiny_llama, tmp_path):
    """bitsandbytes >= 0.45 has a CPU backend: what runs here is run here (a GPU run is in docs/from-llm-abliteration.md)."""
    pytest.importorskip("bitsandbytes")
    outs = {}
    for name, flags in (("q", ["--load-in-4bit"]), ("f", [])):
        outs[name] = tmp_path / f"{name}.safetensors"
        assert main(["measure", str(tiny_llama), *flags, "--limit", "8", "--batch-size", "4", "--whiten-rank", "0",
                     "-o", str(outs[name]), "--no-progress"]) == 0
    q, f = load_measurements(outs["q"]), load_measurements(outs["f"])
    assert q.meta["quantization"] == "4bit" and f.meta["quantization"] is None
    for layer in f.layers:
        a, b = q.direction(layer), f.direction(layer)
        assert not torch.equal(a, b)  # it really ran quantized
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.8, layer


def test_try_in_4bit_uses_hooks_on_the_quantized_model(tiny_llama, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    from intervene.testing import make_measurements

    meas = tmp_path / "m.safetensors"
    make_measurements(2).save(meas)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_llama), "measurements": str(meas), "targets": ["attention", "mlp"],
                                   "ablate": [{"layers": [0, 1], "measurement": 1}]}))
    report = tmp_path / "r.json"
    assert main(["try", str(cfg), "--load-in-4bit", "--limit", "2", "--max-new-tokens", "2", "--samples", "0",
                 "--no-progress", "--json", str(report)]) == 0
    assert "(hook)" in capsys.readouterr().out
    assert json.loads(report.read_text())["harmful"]["total"] == 2


def test_weight_swaps_refuse_quantized_weights(tiny_llama):
    pytest.importorskip("bitsandbytes")
    from intervene.config.schema import parse_config
    from intervene.errors import ArchitectureError
    from intervene.hooks.apply import apply
    from intervene.io.models import load_model
    from intervene.testing import make_measurements

    model, _ = load_model(str(tiny_llama), quantization="4bit")
    cfg = parse_config({"method": "norm_preserving", "targets": ["attention"], "ablate": [{"layer": 1, "measurement": 0}]})
    with pytest.raises(ArchitectureError, match="stored quantized"):
        with apply(model, cfg, make_measurements(2)):
            pass
    hooked = parse_config({"method": "project", "targets": ["attention"], "ablate": [{"layer": 1, "measurement": 0}]})
    with apply(model, hooked, make_measurements(2)) as live:  # hooks work on a quantized model
        assert {s.mechanism for s in live.sites} == {"hook"}
        model(torch.tensor([[1, 2, 3]]))


def test_shard_metadata_records_the_translated_config(glm, tmp_path):
    cfg = write_reference(glm, "ref-meta.yml")
    out = tmp_path / "out"
    assert main(["bake", str(cfg), "-o", str(out), "--no-progress"]) == 0
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as h:
        recorded = json.loads(h.metadata()["intervene"])["config"]
    assert recorded["method"] == "norm_preserving" and recorded["ablate"][1]["scale"]["router"] == 0.6
