"""Bake: baked-and-reloaded checkpoints equal the live intervention (intervene.apply).

Every tiny architecture, both on-disk layouts (per-expert ``save_original_format=True`` and
fused ``False``; gpt-oss and Llama4 are fused either way), methods project and norm_preserving,
all targets the architecture has (write and read side) with per-target scales. The live side
uses forward hooks for ``project`` (an independent implementation: hooks never look at tensor
axes) and in-memory swaps for norm_preserving / expert subsets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from intervene.arch import arch_for_config, text_config
from intervene.bake import bake, execute, plan_bake
from intervene.io.checkpoint import as_tensor, open_checkpoint, read_header, read_tensor_bytes
from intervene.bake.writer import apply_edits, blocks
from intervene.config.schema import parse_config
from intervene.hooks.apply import apply
from intervene.maths import edit_tensor
from intervene.io.measurements import Measurements, load_measurements
from intervene.testing import ARCH_NAMES, MOE_ARCH_NAMES, random_ids, save_tiny, tiny_model, tiny_tokenizer

TOL = 1e-5
HIDDEN = 64
ALWAYS_FUSED = ("gpt_oss", "llama4", "granitemoe")
# per-target scales: every target gets a different one, so a scale applied to the wrong tensor shows
SCALES = {"attention": 1.0, "mlp": 0.8, "experts": 1.0, "shared_experts": 0.6, "router": 0.5, "expert_inputs": 0.9,
          "routed_expert_inputs": 0.7}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- helpers ----------------------------------------------------------------------------------

def write_measurements(path: Path, num_layers: int, seed: int = 1) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        harmful, harmless = torch.randn(HIDDEN, generator=g), torch.randn(HIDDEN, generator=g)
        tensors.update({f"harmful_mean.{layer}": harmful, f"harmless_mean.{layer}": harmless,
                        f"direction.{layer}": harmful - harmless})
    Measurements(tensors=tensors).save(path)
    return path


def make_config(src: Path, meas: Path, arch_targets, method: str = "project", **extra):
    data = {"model": str(src), "measurements": str(meas), "method": method, "targets": list(arch_targets),
            "ablate": [{"layers": extra.pop("layers", "0:2"), "measurement": 1,
                        "scale": {t: SCALES[t] for t in arch_targets}}]}
    data.update(extra)
    return parse_config(data)


def load(path: Path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


@torch.no_grad()
def logits(model, ids=None):
    return model(random_ids() if ids is None else ids).logits.float()


_REFERENCE: dict[tuple[str, torch.dtype], torch.nn.Module] = {}  # loaded sources (apply restores them exactly)


def live_logits(src: Path, cfg, dtype=torch.float32):
    """(original, live-hooked) logits of the SOURCE checkpoint loaded with from_pretrained."""
    key = (str(src), dtype)
    if key not in _REFERENCE:
        _REFERENCE[key] = load(src, dtype)
    model = _REFERENCE[key]
    base = logits(model)
    with apply(model, cfg):
        live = logits(model)
    assert torch.equal(logits(model), base)  # hooks removed, weights restored
    return base, live


def dir_hashes(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def tensor_bytes(path: Path) -> dict[str, bytes]:
    """key -> raw bytes of every tensor of a checkpoint directory."""
    ck = open_checkpoint(path)
    out = {}
    for header in ck.shards:
        with open(header.path, "rb") as f:
            for info in header.tensors:
                out[info.key] = bytes(read_tensor_bytes(f, header, info))
    return out


def stored(path: Path, key: str) -> torch.Tensor:
    ck = open_checkpoint(path)
    header = ck.shard(ck.weight_map[key])
    info = header.by_key()[key]
    with open(header.path, "rb") as f:
        return as_tensor(read_tensor_bytes(f, header, info), info).clone()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(arch, per_expert_layout) -> saved tiny checkpoint dir, built once per module."""
    root = tmp_path_factory.mktemp("sources")
    cache: dict[tuple[str, bool], Path] = {}

    def get(arch: str, original_format: bool) -> Path:
        if arch in ALWAYS_FUSED:
            original_format = True
        key = (arch, original_format)
        if key not in cache:
            model = tiny_model(arch, seed=3)
            path = root / f"{arch}-{'perexpert' if original_format else 'fused'}"
            save_tiny(model, path, save_original_format=original_format)
            write_measurements(path.parent / f"{arch}.m.safetensors", model.config.num_hidden_layers)
            cache[key] = path
        return cache[key]

    return get


def meas_for(src: Path) -> Path:
    return src.parent / f"{src.name.rsplit('-', 1)[0]}.m.safetensors"


# ---- equivalence: baked == live ---------------------------------------------------------------

CASES = ([(a, True, "project") for a in ARCH_NAMES]
         + [(a, False, "project") for a in ARCH_NAMES if a in MOE_ARCH_NAMES and a not in ALWAYS_FUSED]
         + [(a, True, "norm_preserving") for a in ARCH_NAMES]
         + [(a, False, "norm_preserving") for a in ("mixtral", "qwen2_moe", "deepseek_v3")])


@pytest.mark.parametrize("arch,per_expert,method", CASES,
                         ids=[f"{a}-{'perexpert' if p else 'fused'}-{m}" for a, p, m in CASES])
def test_baked_equals_live(sources, tmp_path, arch, per_expert, method):
    src = sources(arch, per_expert)
    config = AutoConfig.from_pretrained(str(src))
    spec = arch_for_config(config)
    spec_targets = spec.targets
    layers = "0:3" if arch in ("deepseek_v2", "deepseek_v3", "glm4_moe", "llama4") else "0:2"
    cfg = make_config(src, meas_for(src), spec_targets, method, layers=layers)
    result = bake(cfg, output=tmp_path / "out", progress=False)
    baked = logits(load(result.output))
    base, live = live_logits(src, cfg)
    assert (live - base).abs().max() > 1e-2  # the edit is visible
    assert (baked - live).abs().max() <= TOL
    # every target the architecture has at these layers was edited somewhere
    present = {t for layer in range(int(layers[-1])) for t in spec_targets if spec.sites(text_config(config), layer, [t])}
    assert {e.target for ops in result.plan.edits.values() for e in ops} == present


def test_fused_and_per_expert_layouts_bake_the_same_model(sources, tmp_path):
    cfg_args = dict(layers="0:2")
    outs = []
    for per_expert in (True, False):
        src = sources("qwen2_moe", per_expert)
        targets = arch_for_config(AutoConfig.from_pretrained(str(src))).targets
        cfg = make_config(src, meas_for(src), targets, **cfg_args)
        outs.append(logits(load(bake(cfg, output=tmp_path / f"o{per_expert}", progress=False).output)))
    assert (outs[0] - outs[1]).abs().max() <= TOL


def test_gpt_oss_hidden_equals_intermediate_and_wrong_axis_negative_control(tmp_path):
    model = tiny_model("gpt_oss", seed=5, hidden_equals_intermediate=True)
    assert tuple(model.model.layers[0].mlp.experts.down_proj.shape) == (8, HIDDEN, HIDDEN)  # [E, I, H], I == H
    src = save_tiny(model, tmp_path / "src")
    meas = write_measurements(tmp_path / "m.safetensors", 2)
    cfg = make_config(src, meas, ["attention", "experts", "expert_inputs"])
    plan = plan_bake(cfg, src, load_measurements(meas))
    down = [op for ops in plan.edits.values() for op in ops if op.key.endswith("experts.down_proj")]
    assert down and all(op.hidden_axis == 2 for op in down)  # from the table, not the shape
    good = logits(load(execute(plan, tmp_path / "good", progress=False).output))
    _, live = live_logits(src, cfg)
    assert (good - live).abs().max() <= TOL
    # negative control: the same plan with the experts' H axis swapped runs silently (H == I) but is wrong
    wrong = dataclasses.replace(plan, edits={k: [dataclasses.replace(op, hidden_axis=1) if op.key.endswith("down_proj")
                                                 else op for op in ops] for k, ops in plan.edits.items()})
    bad = logits(load(execute(wrong, tmp_path / "bad", progress=False).output))
    assert (bad - live).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["deepseek_v3", "glm4_moe"])
def test_dense_leading_layers(sources, tmp_path, arch):
    src = sources(arch, True)
    cfg = make_config(src, meas_for(src), ["attention", "mlp", "experts", "shared_experts"], layers="0:3")
    plan = plan_bake(cfg, src, load_measurements(meas_for(src)))
    by_layer: dict[int, set[str]] = {}
    for ops in plan.edits.values():
        for op in ops:
            by_layer.setdefault(op.layer, set()).add(op.target)
    assert by_layer[0] == {"attention", "mlp"}  # first_k_dense_replace=1: layer 0 is dense
    assert by_layer[1] == by_layer[2] == {"attention", "experts", "shared_experts"}
    assert "model.layers.0.mlp.down_proj.weight" in plan.edits
    assert sum(1 for k in plan.edits if ".layers.1.mlp.experts." in k) == 8  # every expert's down_proj
    baked = logits(load(execute(plan, tmp_path / "out", progress=False).output))
    _, live = live_logits(src, cfg)
    assert (baked - live).abs().max() <= TOL


@pytest.mark.parametrize("arch,per_expert", [("qwen3_moe", True), ("qwen3_moe", False), ("gpt_oss", True),
                                             ("mixtral", True)])
def test_expert_subset(sources, tmp_path, arch, per_expert):
    src = sources(arch, per_expert)
    cfg = make_config(src, meas_for(src), ["experts", "expert_inputs"], experts=[1, 3])
    result = bake(cfg, output=tmp_path / "out", progress=False)
    _, live = live_logits(src, cfg)
    assert (logits(load(result.output)) - live).abs().max() <= TOL
    before, after = tensor_bytes(src), tensor_bytes(result.output)
    if per_expert and arch != "gpt_oss":
        changed = {k for k in before if before[k] != after[k]}
        assert changed and all(".experts.1." in k or ".experts.3." in k for k in changed)
    else:  # fused: only slices 1 and 3 along the expert axis changed
        key = "model.layers.0.mlp.experts.down_proj"
        a, b = stored(src, key), stored(result.output, key)
        assert [e for e in range(a.shape[0]) if not torch.equal(a[e], b[e])] == [1, 3]


def test_several_edits_on_one_tensor_apply_in_config_order(sources, tmp_path):
    src = sources("qwen2_moe", True)
    targets = ["attention", "experts", "router", "expert_inputs"]
    cfg = parse_config({"model": str(src), "measurements": str(meas_for(src)), "targets": targets, "ablate": [
        {"layer": 0, "measurement": 0, "scale": 0.7}, {"layer": 0, "measurement": 1, "scale": 1.0}]})
    result = bake(cfg, output=tmp_path / "out", progress=False)
    ops = result.plan.edits["model.layers.0.self_attn.o_proj.weight"]
    assert len(ops) == 2 and ops[0].scale == 0.7 and ops[1].scale == 1.0
    _, live = live_logits(src, cfg)
    assert (logits(load(result.output)) - live).abs().max() <= TOL


def test_bf16_checkpoint_bit_exact_edit_and_logits_within_rounding(tmp_path):
    model = tiny_model("qwen2_moe", seed=2).to(torch.bfloat16)
    src = save_tiny(model, tmp_path / "src")
    meas = write_measurements(tmp_path / "m.safetensors", 2)
    cfg = make_config(src, meas, ["attention", "experts", "shared_experts", "router"])
    result = bake(cfg, output=tmp_path / "out", progress=False)
    # stored edit == maths.edit_tensor of the stored weight (float32 inside, one cast back), bit for bit
    for key, ops in result.plan.edits.items():
        expected = stored(src, key)
        assert expected.dtype == torch.bfloat16
        for op in ops:
            expected = edit_tensor(expected, op.direction, op.hidden_axis, op.scale, op.method, op.is_bias)
        assert torch.equal(stored(result.output, key), expected), key
    baked = logits(load(result.output, torch.bfloat16))
    base, live = live_logits(src, cfg, torch.bfloat16)
    scale = float(live.abs().max())
    diff = float((baked - live).abs().max())
    assert diff <= 8 * 2 ** -7 * max(1.0, scale)  # bf16 rounding (hook rounds activations, bake rounds weights)
    assert diff < 0.5 * float((live - base).abs().max())


def test_norm_preserving_keeps_column_norms_and_removes_direction(sources, tmp_path):
    src = sources("qwen2_moe", True)
    cfg = parse_config({"model": str(src), "measurements": str(meas_for(src)), "method": "norm_preserving",
                        "targets": ["attention", "experts", "shared_experts"],
                        "ablate": [{"layers": "0:2", "measurement": 1, "scale": 1.0}]})
    result = bake(cfg, output=tmp_path / "out", progress=False)
    assert len(result.plan.edits) == 2 * (1 + 8 + 1)
    for key, (op,) in result.plan.edits.items():
        before = stored(src, key).movedim(op.hidden_axis, -1)  # fibres along H: the columns w of W [H, in]
        after = stored(result.output, key).movedim(op.hidden_axis, -1)
        torch.testing.assert_close(after.norm(dim=-1), before.norm(dim=-1), rtol=1e-5, atol=1e-7)
        cos = (after @ op.direction) / after.norm(dim=-1)
        assert float(cos.abs().max()) < 1e-5, key  # no component along r̂ left
        assert float(((before @ op.direction) / before.norm(dim=-1)).abs().max()) > 1e-2  # there was one


def test_untouched_tensors_bit_identical_and_input_unchanged(sources, tmp_path):
    src = sources("deepseek_v3", True)
    tok = tiny_tokenizer()
    tok.save_pretrained(str(src))  # tokenizer + chat template files travel with the checkpoint
    (src / "README.md").write_text("the source model's own card\n")
    hashes_before = dir_hashes(src)
    cfg = make_config(src, meas_for(src), ["attention", "mlp", "experts"], layers="0:3")
    result = bake(cfg, output=tmp_path / "out", progress=False)
    assert dir_hashes(src) == hashes_before
    before, after = tensor_bytes(src), tensor_bytes(result.output)
    assert before.keys() == after.keys()
    edited = set(result.plan.edits)
    assert all(before[k] == after[k] for k in before if k not in edited)
    assert all(before[k] != after[k] for k in edited)
    # same shard names, same index weight_map, headers keep dtype/shape/offsets and record the config
    index_in = json.loads((src / "model.safetensors.index.json").read_text())
    index_out = json.loads((result.output / "model.safetensors.index.json").read_text())
    assert index_out["weight_map"] == index_in["weight_map"]
    assert index_out["metadata"]["total_size"] == sum(h.data_size for h in open_checkpoint(src).shards)
    for name in set(index_in["weight_map"].values()):
        h_in, h_out = read_header(src / name), read_header(result.output / name)
        assert [(t.key, t.dtype, t.shape, t.begin, t.end) for t in h_in.tensors] == \
               [(t.key, t.dtype, t.shape, t.begin, t.end) for t in h_out.tensors]
        meta = json.loads(h_out.metadata["intervene"])
        assert meta["config"]["method"] == "project" and meta["versions"]["intervene"]
        assert h_out.metadata["format"] == "pt" and "ablate:" in h_out.metadata["intervene_config_yaml"]
    names = {p.name for p in result.output.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert (result.output / "config.json").read_bytes() == (src / "config.json").read_bytes()
    card = (result.output / "README.md").read_text()
    # the source card's text is kept below intervene's section (issue 17), under HF front matter
    assert card.startswith("---\nbase_model: ") and card.index("edited with intervene") < card.index("source model's own card")
    assert "| layers | 0, 1, 2 |" in card and "attention, mlp, experts" in card and "sha256" in card
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary directory left


def test_single_file_checkpoint_and_mtp_layer_copied(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama", seed=4)
    src = tmp_path / "src"
    model.save_pretrained(str(src))  # one model.safetensors, no index
    assert not (src / "model.safetensors.index.json").exists()
    tensors = load_file(str(src / "model.safetensors"))
    mtp_key = "model.layers.2.self_attn.o_proj.weight"  # layer index == num_hidden_layers: an MTP-style extra
    tensors[mtp_key] = torch.randn(HIDDEN, HIDDEN)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    meas = write_measurements(tmp_path / "m.safetensors", 2)
    cfg = make_config(src, meas, ["attention", "mlp"])
    result = bake(cfg, output=tmp_path / "out", progress=False)
    assert result.plan.skipped_layers == [2] and mtp_key not in result.plan.edits
    assert not (result.output / "model.safetensors.index.json").exists()
    assert tensor_bytes(result.output)[mtp_key] == tensor_bytes(src)[mtp_key]
    _, live = live_logits(src, cfg)
    assert (logits(load(result.output)) - live).abs().max() <= TOL


def test_gemma3_bakes_against_the_post_norm_direction(sources, tmp_path):
    src = sources("gemma3", True)
    cfg = make_config(src, meas_for(src), ["attention", "mlp"])
    plan = plan_bake(cfg, src, load_measurements(meas_for(src)))
    op = plan.edits["model.layers.1.self_attn.o_proj.weight"][0]
    assert op.post_norm_key == "model.layers.1.post_attention_layernorm.weight"
    w = stored(src, op.post_norm_key)
    r = next(e.direction for e in plan.layer_edits if e.layer == 1)
    expected = (1.0 + w) * r
    torch.testing.assert_close(op.direction, expected / expected.norm())


def test_llama4_conditional_generation_prefix_and_vision_tower_untouched(sources, tmp_path):
    """Llama4ForConditionalGeneration keeps the decoder under language_model.model.layers; the
    vision tower's own ...layers.N keys must never be edited."""
    import transformers
    from safetensors.torch import load_file, save_file

    text_src = sources("llama4", True)
    src = tmp_path / "mm"
    src.mkdir()
    text_config = json.loads((text_src / "config.json").read_text())
    config = transformers.Llama4Config(text_config=text_config, vision_config={
        "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 32, "num_attention_heads": 2})
    config.save_pretrained(str(src))
    tensors = {}
    for shard in sorted(text_src.glob("*.safetensors")):
        tensors.update({("language_model." + k): v for k, v in load_file(str(shard)).items()})
    vision_key = "vision_model.model.layers.0.self_attn.o_proj.weight"
    tensors[vision_key] = torch.randn(HIDDEN, HIDDEN)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    cfg = make_config(text_src, meas_for(text_src), ["attention", "mlp", "experts", "shared_experts"], layers="0:3")
    text_plan = plan_bake(cfg, text_src, load_measurements(meas_for(text_src)))
    plan = plan_bake(cfg, src, load_measurements(meas_for(text_src)))
    assert plan.layer_prefix == "language_model.model.layers"
    assert sorted(plan.edits) == sorted("language_model." + k for k in text_plan.edits)
    out = execute(plan, tmp_path / "out", progress=False)
    after = tensor_bytes(out.output)
    assert after[vision_key] == tensor_bytes(src)[vision_key]
    for key, ops in text_plan.edits.items():  # same edits, same bytes as the text-only checkpoint's bake
        expected = stored(text_src, key)
        for op in ops:
            expected = edit_tensor(expected, op.direction, op.hidden_axis, op.scale, op.method, op.is_bias)
        assert torch.equal(stored(out.output, "language_model." + key), expected), key


def test_workers_give_byte_identical_shards(sources, tmp_path):
    src = sources("olmoe", True)
    cfg = make_config(src, meas_for(src), ["attention", "experts", "router"])
    one = bake(cfg, output=tmp_path / "one", progress=False)
    two = bake(cfg, output=tmp_path / "two", workers=2, progress=False)
    assert len(open_checkpoint(src).shards) >= 2
    assert dir_hashes(one.output) == dir_hashes(two.output)  # also: deterministic output


def test_blocks_cover_every_element_once_and_keep_fibres_whole():
    for shape, axis, limit in [((6, 5, 4), 1, 7), ((6, 5, 4), 2, 9), ((3, 64), 0, 64), ((4, 3), 1, 100),
                               ((2, 3, 5), 0, 1)]:
        count = torch.zeros(shape)
        for sl in blocks(shape, axis, limit):
            view = count[sl]
            assert view.shape[axis] == shape[axis]
            assert view.numel() <= max(limit, shape[axis])
            view += 1
        assert torch.equal(count, torch.ones(shape))


def test_blocked_edit_equals_whole_tensor_edit():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(8, 48, 64, generator=g)
    r = torch.randn(64, generator=g)
    r = r / r.norm()
    op = dataclasses.replace(_op(), hidden_axis=2, expert_axis=0, direction=r)
    for method in ("project", "norm_preserving"):
        x = t.clone()
        apply_edits(x, [dataclasses.replace(op, method=method)], block_bytes=4 * 64 * 5)  # 5 fibres per block
        torch.testing.assert_close(x, edit_tensor(t, r, 2, 1.0, method), rtol=0, atol=1e-6)


def test_in_layout_projection_is_bit_identical_to_maths():
    """maths.project_out updates in the tensor's own layout (the bake's speed); the result is bit-identical
    to the same operations on a movedim view, written here."""
    from intervene.maths import project_out

    def project_out_in_layout(x, r, axis, scale):  # the reference: fibres moved last, updated, moved back
        f = x.movedim(axis, -1)
        return (f - scale * (f @ r.to(x.dtype)).unsqueeze(-1) * r.to(x.dtype)).movedim(-1, axis)

    g = torch.Generator().manual_seed(1)
    for shape, axis in [((40, 24), 0), ((24, 40), 1), ((8, 40, 24), 1), ((8, 24, 40), 2), ((40,), 0), ((8, 40), 1)]:
        x = torch.randn(shape, generator=g)
        r = torch.randn(shape[axis], generator=g)
        r = r / r.norm()
        for scale in (1.0, 0.37):
            assert torch.equal(project_out_in_layout(x, r, axis, scale), project_out(x, r, axis, scale))
            assert torch.equal(project_out_in_layout(x.double(), r, axis, scale), project_out(x.double(), r, axis, scale))


def _op():
    from intervene.bake.plan import TensorEdit

    return TensorEdit(key="k", shard="s", layer=0, target="experts", hidden_axis=0, expert_axis=None, experts=None,
                      expert=None, is_bias=False, direction=torch.zeros(HIDDEN))
