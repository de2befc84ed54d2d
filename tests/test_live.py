"""Live interventions (intervene.hooks.apply) against weight edits written out in this file.

The reference edits below are independent of ``intervene.maths``: each case writes
W ← W − s·r̂(r̂ᵀW) (or its read-side / norm-preserving form) as an explicit einsum on the
tensor's layout. Hooks never look at tensor axes, so "hook == edit" also checks the H axes of
the architecture table (gpt-oss with H == I included).
"""

from __future__ import annotations

import copy

import pytest
import torch

from intervene.arch import arch_for_config, decoder_layers, get_module
from intervene.config.schema import parse_config
from intervene.errors import ConfigError
from intervene.hooks.apply import apply, apply_edits, bind_model, list_sites, plan_sites
from intervene.testing import ARCH_NAMES, MOE_ARCH_NAMES, make_measurements, random_ids, tiny_model

HIDDEN = 64
TOL = 1e-5


# ---- helpers --------------------------------------------------------------------------------------

def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def ref_project(w: torch.Tensor, r: torch.Tensor, axis: int, s: float) -> torch.Tensor:
    """W − s·r̂(r̂ᵀW) on the fibres along ``axis``, as an explicit einsum per layout."""
    if w.ndim == 1:  # bias [H]
        return w - s * r * (r @ w)
    if w.ndim == 2 and axis == 0:  # write-side Linear [H, in]
        return w - s * torch.einsum("h,k,kj->hj", r, r, w)
    if w.ndim == 2 and axis == 1:  # read-side Linear [out, H], or bias [E, H]
        return w - s * torch.einsum("ik,k,h->ih", w, r, r)
    if w.ndim == 3 and axis == 1:  # fused [E, H, I] (down EHI, gate_up EIH)
        return w - s * torch.einsum("h,k,ekj->ehj", r, r, w)
    if w.ndim == 3 and axis == 2:  # fused [E, I, H] (down EIH, gate_up EHI)
        return w - s * torch.einsum("eik,k,h->eih", w, r, r)
    raise AssertionError(f"no reference edit for ndim={w.ndim} axis={axis}")


def ref_norm_preserving(w: torch.Tensor, r: torch.Tensor, axis: int, s: float) -> torch.Tensor:
    """Each fibre w along ``axis`` keeps ‖w‖, direction normalize(ŵ − s(ŵ·r̂)r̂)."""
    x = w.movedim(axis, -1)
    norms = x.norm(dim=-1, keepdim=True)
    w_hat = x / norms
    v = w_hat - s * (w_hat @ r).unsqueeze(-1) * r
    return (v / v.norm(dim=-1, keepdim=True) * norms).movedim(-1, axis)


def ref_direction(model, layer_module, site, r: torch.Tensor) -> torch.Tensor:
    """Gemma3: r̃ = normalize((1 + w_post) ⊙ r̂) for sites behind a post-norm."""
    if not site.post_norm:
        return r
    w = get_module(layer_module, site.post_norm).weight.detach().float()
    return unit((1.0 + w) * r)


def edit_in_test(model, edits: list[tuple[int, str, torch.Tensor, float]], method: str = "project",
                 experts: tuple[int, ...] | None = None) -> None:
    """Apply (layer, target, r̂, scale) edits in order to the weights, with the reference maths."""
    spec = arch_for_config(model.config)
    layers = decoder_layers(model)
    with torch.no_grad():
        for layer, target, r, s in edits:
            for site in spec.sites(model.config, layer, [target]):
                rr = ref_direction(model, layers[layer], site, r)
                for ref in site.tensors:
                    p = getattr(get_module(layers[layer], ref.module), ref.param)
                    fn = ref_norm_preserving if (method == "norm_preserving" and not ref.is_bias) else ref_project
                    if ref.expert_axis is not None and experts is not None:
                        for e in experts:
                            sl = p[e]  # expert axis is 0 for every fused tensor
                            sl.copy_(fn(sl.clone(), rr, ref.hidden_axis - 1, s))
                    else:
                        p.copy_(fn(p.clone(), rr, ref.hidden_axis, s))


def used_expert(model, spec, layer: int, ids) -> int:
    """The expert the router picks most often at ``layer`` (top-k of the router logits)."""
    logits = []
    router = get_module(decoder_layers(model)[layer], spec.router)
    handle = router.register_forward_hook(lambda m, a, out: logits.append(out[1] if spec.router_output == "llama4" else out[0]))
    try:
        model(ids)
    finally:
        handle.remove()
    top = logits[0].topk(spec.top_k(model.config), dim=-1).indices
    return int(torch.bincount(top.flatten()).argmax())


def assert_no_hooks(model) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name}"
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name}"


def all_layers_config(model, targets, method="project", scale=1.0, measurement=1, **extra):
    n = model.config.num_hidden_layers
    return parse_config({"method": method, "targets": list(targets),
                         "ablate": [{"layers": f"0:{n}", "measurement": measurement, "scale": scale}], **extra})


def write_targets(spec) -> list[str]:
    return [t for t in ("attention", "mlp", "experts", "shared_experts") if spec.has_target(t)]


ARCH_CASES = [(a, False) for a in ARCH_NAMES] + [("gpt_oss", True)]
ARCH_IDS = list(ARCH_NAMES) + ["gpt_oss-H=I"]


def build(arch: str, h_eq_i: bool = False, dtype=torch.float32):
    model = tiny_model(arch, hidden_equals_intermediate=h_eq_i, dtype=dtype)
    return model, arch_for_config(model.config), make_measurements(model.config.num_hidden_layers, path="test.safetensors")


# ---- write side -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,h_eq_i", ARCH_CASES, ids=ARCH_IDS)
def test_project_hooks_on_all_write_targets_equal_weight_edit(arch, h_eq_i):
    model, spec, meas = build(arch, h_eq_i)
    ids = random_ids()
    base = model(ids).logits
    targets = write_targets(spec)
    cfg = all_layers_config(model, targets)
    with apply(model, cfg, meas) as live:
        assert {s.mechanism for s in live.sites} == {"hook"}
        hooked = model(ids).logits
    assert_no_hooks(model)
    assert torch.equal(model(ids).logits, base)

    edited = copy.deepcopy(model)
    r = unit(meas.direction(1))
    edit_in_test(edited, [(layer, t, r, 1.0) for layer in range(model.config.num_hidden_layers) for t in targets])
    expected = edited(ids).logits
    assert (hooked - base).abs().max() > 1e-2  # the intervention does something
    assert (hooked - expected).abs().max() <= TOL


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
def test_gemma_post_norm_direction_removes_r_from_residual_contribution(arch):
    """The post-norm output (what reaches the residual) is orthogonal to r̂ under the hook."""
    model, spec, meas = build(arch)
    cfg = all_layers_config(model, ["attention", "mlp"])
    r = unit(meas.direction(1))
    seen = []
    layer0 = decoder_layers(model)[0]
    handle = get_module(layer0, "post_attention_layernorm").register_forward_hook(
        lambda m, a, out: seen.append(out.detach()))
    try:
        with apply(model, cfg, meas):
            model(random_ids())
        model(random_ids())
    finally:
        handle.remove()
    assert (seen[0] @ r).abs().max() < 1e-5  # removed exactly
    assert (seen[1] @ r).abs().max() > 1e-2  # present without the intervention


# ---- read side ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", MOE_ARCH_NAMES)
@pytest.mark.parametrize("target", ["router", "expert_inputs"])
def test_read_side_pre_hook_equals_weight_edit(arch, target):
    model, spec, meas = build(arch)
    ids = random_ids()
    base = model(ids).logits
    cfg = all_layers_config(model, [target])
    with apply(model, cfg, meas):
        hooked = model(ids).logits
    assert_no_hooks(model)
    assert torch.equal(model(ids).logits, base)
    edited = copy.deepcopy(model)
    r = unit(meas.direction(1))
    edit_in_test(edited, [(layer, target, r, 1.0) for layer in range(model.config.num_hidden_layers)])
    assert (hooked - base).abs().max() > 1e-4
    assert (hooked - edited(ids).logits).abs().max() <= TOL


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_edits_on_one_site_compose_in_config_order(arch):
    """Two different directions on the same (read and write) sites: hooks equal the weights
    edited one after the other in config order (the read side needs reversed pre-hooks)."""
    model, spec, meas = build(arch)
    layer = spec.dense_leading_layers(model.config)
    cfg = parse_config({"targets": ["router", "expert_inputs", "attention", "experts"], "ablate": [
        {"layer": layer, "measurement": 0, "scale": 1.0},
        {"layer": layer, "measurement": 1, "scale": 0.7},
    ]})
    ids = random_ids()
    with apply(model, cfg, meas):
        hooked = model(ids).logits
    edited = copy.deepcopy(model)
    r0, r1 = unit(meas.direction(0)), unit(meas.direction(1))
    targets = ["router", "expert_inputs", "attention", "experts"]
    edit_in_test(edited, [(layer, t, r0, 1.0) for t in targets] + [(layer, t, r1, 0.7) for t in targets])
    assert (hooked - edited(ids).logits).abs().max() <= TOL
    # the opposite order is measurably different, so the test can tell
    other = copy.deepcopy(model)
    edit_in_test(other, [(layer, t, r1, 0.7) for t in targets] + [(layer, t, r0, 1.0) for t in targets])
    assert (hooked - other(ids).logits).abs().max() > 1e-4


# ---- scale, sparsity, biprojection --------------------------------------------------------------

def test_scale_sparsity_and_biprojection_use_the_target_layer_harmless_mean():
    model, spec, meas = build("qwen2_moe")
    ids = random_ids()
    cfg = parse_config({"biprojection": True, "targets": ["attention", "experts", "router"], "ablate": [
        {"layer": 1, "measurement": 0, "scale": 0.5, "sparsity": 0.5},
    ]})
    with apply(model, cfg, meas):
        hooked = model(ids).logits

    def direction(harmless_layer: int) -> torch.Tensor:
        r = meas.direction(0).clone()
        m_hat = unit(meas.harmless_mean(harmless_layer))
        r = r - (r @ m_hat) * m_hat
        keep = torch.topk(r.abs(), HIDDEN // 2).indices
        sparse = torch.zeros_like(r)
        sparse[keep] = r[keep]
        return unit(sparse)

    def run(r):
        edited = copy.deepcopy(model)
        edit_in_test(edited, [(1, t, r, 0.5) for t in ("attention", "experts", "router")])
        return edited(ids).logits

    assert (hooked - run(direction(1))).abs().max() <= TOL
    # the measurement layer's harmless mean would have given another answer
    assert (hooked - run(direction(0))).abs().max() > 1e-4


def test_per_target_scale_dict():
    model, spec, meas = build("llama")
    ids = random_ids()
    cfg = parse_config({"ablate": [{"layer": 0, "measurement": 1, "scale": {"attention": 0.25}}]})
    with apply(model, cfg, meas) as live:
        assert live.site_names == ["layers.0.attn.out"]  # mlp has no scale: not edited
        hooked = model(ids).logits
    edited = copy.deepcopy(model)
    edit_in_test(edited, [(0, "attention", unit(meas.direction(1)), 0.25)])
    assert (hooked - edited(ids).logits).abs().max() <= TOL


# ---- norm-preserving swaps ------------------------------------------------------------------------

@pytest.mark.parametrize("arch,h_eq_i", [("llama", False), ("gemma3", False), ("qwen2_moe", False),
                                         ("deepseek_v3", False), ("gpt_oss", True), ("llama4", False)],
                         ids=["llama", "gemma3", "qwen2_moe", "deepseek_v3", "gpt_oss-H=I", "llama4"])
def test_norm_preserving_swaps_weights_and_restores_them_bit_exactly(arch, h_eq_i):
    model, spec, meas = build(arch, h_eq_i)
    ids = random_ids()
    base = model(ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = list(spec.targets)
    cfg = all_layers_config(model, targets, method="norm_preserving", scale=0.8)
    with apply(model, cfg, meas) as live:
        assert {s.mechanism for s in live.sites} == {"swap"}
        swapped = model(ids).logits
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(model(ids).logits, base)
    assert_no_hooks(model)

    edited = copy.deepcopy(model)
    r = unit(meas.direction(1))
    edit_in_test(edited, [(layer, t, r, 0.8) for layer in range(model.config.num_hidden_layers) for t in targets],
                 method="norm_preserving")
    assert (swapped - edited(ids).logits).abs().max() <= TOL
    # norm-preserving keeps the column norms of a write-side weight
    o_proj = get_module(decoder_layers(edited)[0], spec.attn_out).weight
    assert torch.allclose(o_proj.norm(dim=0), get_module(decoder_layers(model)[0], spec.attn_out).weight.norm(dim=0),
                          atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mixtral", "gpt_oss"])
def test_weights_mode_equals_hooks_for_project(arch):
    model, spec, meas = build(arch)
    ids = random_ids()
    cfg = all_layers_config(model, spec.targets)
    with apply(model, cfg, meas) as live:
        hooked = model(ids).logits
    with apply(model, cfg, meas, mode="weights") as live:
        assert {s.mechanism for s in live.sites} == {"swap"}
        swapped = model(ids).logits
    assert (hooked - swapped).abs().max() <= TOL


def test_hooks_mode_refuses_norm_preserving():
    model, spec, meas = build("llama")
    cfg = all_layers_config(model, ["attention"], method="norm_preserving")
    with pytest.raises(ConfigError, match="need weight swaps"):
        with apply(model, cfg, meas, mode="hooks"):
            pass


# ---- clean-up -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["project", "norm_preserving"])
def test_exception_inside_block_removes_hooks_and_restores_weights(method):
    model, spec, meas = build("qwen2_moe")
    ids = random_ids()
    base = model(ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = all_layers_config(model, spec.targets, method=method)
    with pytest.raises(RuntimeError, match="boom"):
        with apply(model, cfg, meas):
            model(ids)
            raise RuntimeError("boom")
    assert_no_hooks(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(ids).logits, base)


def test_failure_while_installing_cleans_up(monkeypatch):
    """A swap that fails half way (here: the 3rd site) leaves nothing behind."""
    import intervene.hooks.apply as live_mod

    model, spec, meas = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}
    real = live_mod._swap

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(live_mod, "_swap", flaky)
    cfg = all_layers_config(model, ["attention", "mlp"], method="norm_preserving")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with apply(model, cfg, meas):
            pass
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---- expert subsets -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,h_eq_i", [("qwen2_moe", False), ("deepseek_v3", False), ("mixtral", False),
                                         ("gpt_oss", True), ("llama4", False)],
                         ids=["qwen2_moe", "deepseek_v3", "mixtral", "gpt_oss-H=I", "llama4"])
def test_one_expert_subset_changes_only_that_expert(arch, h_eq_i):
    model, spec, meas = build(arch, h_eq_i)
    ids = random_ids()
    base = model(ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moe_layer = next(i for i in range(model.config.num_hidden_layers) if spec.is_moe_layer(model.config, i))
    chosen = used_expert(model, spec, moe_layer, ids)
    cfg = parse_config({"targets": ["experts"], "experts": [chosen],
                        "ablate": [{"layer": moe_layer, "measurement": 1}]})
    with apply(model, cfg, meas) as live:
        assert [s.mechanism for s in live.sites] == ["swap"]
        inside = model.state_dict()
        hooked = model(ids).logits
        changed = {k for k in before if not torch.equal(inside[k], before[k])}
        experts_prefix = f"{spec.layers_path}.{moe_layer}.{spec.experts}."
        assert changed and all(k.startswith(experts_prefix) for k in changed)
        for k in changed:
            diff = (inside[k] != before[k]).flatten(1).any(dim=1)  # per expert (axis 0)
            assert diff.nonzero().flatten().tolist() == [chosen], k
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(ids).logits, base)

    edited = copy.deepcopy(model)
    edit_in_test(edited, [(moe_layer, "experts", unit(meas.direction(1)), 1.0)], experts=(chosen,))
    assert (hooked - edited(ids).logits).abs().max() <= TOL
    assert (hooked - base).abs().max() > 1e-5


def test_expert_subset_changes_experts_output_only_for_tokens_routed_to_it():
    model, spec, meas = build("qwen2_moe")
    ids = random_ids(batch=4, seq=12)
    chosen = 2
    layer = 0
    layer_module = decoder_layers(model)[layer]
    outputs, routed = [], []
    h1 = get_module(layer_module, spec.experts).register_forward_hook(lambda m, a, out: outputs.append(out.detach()))
    h2 = get_module(layer_module, spec.router).register_forward_hook(lambda m, a, out: routed.append(out[2].detach()))
    cfg = parse_config({"targets": ["experts"], "experts": {layer: [chosen]},
                        "ablate": [{"layer": layer, "measurement": 1}]})
    try:
        model(ids)
        with apply(model, cfg, meas):
            model(ids)
    finally:
        h1.remove()
        h2.remove()
    assert torch.equal(routed[0], routed[1])  # the write-side edit cannot change layer-0 routing
    uses_chosen = (routed[0] == chosen).any(dim=-1)
    moved = (outputs[0] - outputs[1]).abs().amax(dim=-1) > 1e-7
    assert uses_chosen.any() and (~uses_chosen).any()
    assert torch.equal(moved, uses_chosen)


def test_expert_subset_for_expert_inputs_edits_selected_gate_up_slices_and_full_shared_expert():
    model, spec, meas = build("qwen2_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = parse_config({"targets": ["expert_inputs"], "experts": [3, 5], "ablate": [{"layer": 1, "measurement": 0}]})
    with apply(model, cfg, meas) as live:
        mech = {s.name: s.mechanism for s in live.sites}
        gate_up = model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"].clone()
    assert mech == {"layers.1.experts.in": "swap", "layers.1.shared_experts.in": "hook",
                    "layers.1.shared_expert_gate.in": "hook"}
    per_expert = (gate_up != before["model.layers.1.mlp.experts.gate_up_proj"]).flatten(1).any(dim=1)
    assert per_expert.nonzero().flatten().tolist() == [3, 5]
    assert_no_hooks(model)


def test_expert_out_of_range_is_a_named_error():
    model, spec, meas = build("mixtral")
    cfg = parse_config({"targets": ["experts"], "experts": [8], "ablate": [{"layer": 0, "measurement": 1}]})
    with pytest.raises(ConfigError, match="expert id 8 out of range"):
        with apply(model, cfg, meas):
            pass


# ---- dtype --------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_bf16_within_rounding_of_fp32(arch):
    model32, spec, meas = build(arch)
    model16 = tiny_model(arch, dtype=torch.bfloat16)
    ids = random_ids()
    cfg = all_layers_config(model32, spec.targets)
    with apply(model32, cfg, meas):
        hooked32 = model32(ids).logits
    base16 = model16(ids).logits
    with apply(model16, cfg, meas):
        hooked16 = model16(ids).logits
    assert hooked16.dtype == torch.bfloat16
    assert torch.equal(model16(ids).logits, base16)
    # same rounding scale as the unhooked bf16-vs-fp32 gap (a few 1e-3 on logits of size ~1)
    gap = (hooked16.float() - hooked32).abs().max().item()
    assert gap < 3e-2
    assert (hooked32 - model32(ids).logits).abs().max().item() > 3 * gap or gap < 1e-2


# ---- misc ---------------------------------------------------------------------------------------

def test_list_sites_names():
    model = tiny_model("deepseek_v3")
    names = list_sites(model)
    assert names[:2] == ["layers.0.attn.out", "layers.0.mlp.out"]
    assert "layers.1.router.in" in names and "layers.2.shared_experts.out" in names
    assert "layers.1.experts.in" in names and "layers.0.router.in" not in names
    assert list_sites(model, ["router"]) == ["layers.1.router.in", "layers.2.router.in"]


def test_apply_accepts_yaml_path_and_reads_measurements_from_it(tmp_path):
    model, spec, meas = build("llama")
    meas.save(tmp_path / "m.safetensors")
    (tmp_path / "c.yaml").write_text("measurements: m.safetensors\ntargets: [attention]\n"
                                     "ablate:\n  - layer: 1\n    measurement: 0\n")
    ids = random_ids()
    with apply(model, tmp_path / "c.yaml") as live:
        from_path = model(ids).logits
        assert live.site_names == ["layers.1.attn.out"]
    with apply(model, parse_config({"targets": ["attention"], "ablate": [{"layer": 1, "measurement": 0}]}), meas):
        direct = model(ids).logits
    assert torch.equal(from_path, direct)


def test_missing_measurements_is_a_named_error():
    model = tiny_model("llama")
    cfg = parse_config({"ablate": [{"layer": 0, "measurement": 0}]})
    with pytest.raises(ConfigError, match="no 'measurements'"):
        with apply(model, cfg):
            pass


def test_router_target_on_dense_model_is_a_named_error():
    model, spec, meas = build("llama")
    cfg = parse_config({"targets": ["router"], "ablate": [{"layer": 0, "measurement": 0}]})
    with pytest.raises(ConfigError, match="router not present in architecture 'llama'; valid: attention, mlp"):
        bind_model(model, cfg, meas)


def test_hooks_follow_the_activation_device_and_dtype():
    """The direction is moved to each activation's device/dtype (device_map spreads layers)."""
    model, spec, meas = build("llama")
    edits = bind_model(model, all_layers_config(model, ["attention"]), meas).projections
    plan = plan_sites(model, edits)
    from intervene.hooks.apply import _write_hook

    hook = _write_hook(plan[0])
    y = torch.randn(2, 3, HIDDEN, dtype=torch.float64)
    out = hook(None, (), y)
    assert out.dtype == torch.float64 and (out @ unit(meas.direction(1)).double()).abs().max() < 1e-6
    with apply_edits(model, edits):
        pass
    assert_no_hooks(model)


# ---- accelerator: device_map on a GPU, with CPU offload (skipped without CUDA) --------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("placement", ["cuda", "cpu-offload"])
def test_device_map_on_gpu_and_with_cpu_offload(arch, dtype, placement, tmp_path):
    """Hooks move the direction to the activation's device/dtype; swaps edit offloaded weights
    where accelerate keeps them (the CPU copy it uploads at every forward) and restore them."""
    from transformers import AutoModelForCausalLM

    reference, spec, meas = build(arch)
    reference.save_pretrained(tmp_path)
    n = reference.config.num_hidden_layers
    if placement == "cuda":
        device_map = {"": 0}
    else:  # layer 0 and the embedding offloaded to the CPU (meta parameters, executed on the GPU)
        device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.norm": 0, "lm_head": 0,
                      "model.rotary_emb": 0, **{f"model.layers.{i}": 0 for i in range(1, n)}}
    split = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype, device_map=device_map).eval()
    first = get_module(decoder_layers(split)[0], spec.attn_out).weight.device.type
    assert first == ("cuda" if placement == "cuda" else "meta")
    ids = random_ids().to(split.get_input_embeddings().weight.device if placement == "cuda" else "cpu")
    tol = 1e-4 if dtype == torch.float32 else 6e-2
    for method in ("project", "norm_preserving"):
        cfg = all_layers_config(reference, spec.targets, method=method)
        with apply(reference, cfg, meas):
            expected = reference(ids.cpu()).logits
        before = {k: v.clone() for k, v in split.state_dict().items()}
        base = split(ids).logits
        with apply(split, cfg, meas) as live:
            got = split(ids).logits
        assert {s.mechanism for s in live.sites} == {"hook" if method == "project" else "swap"}
        assert got.dtype == dtype
        assert (got.float().cpu() - expected).abs().max().item() <= tol, method
        assert (got.float().cpu() - base.float().cpu()).abs().max().item() > 2e-2  # the edit is visible
        assert torch.equal(split(ids).logits, base)
        after = split.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items() if v.device.type != "meta")
        assert_no_hooks(split)
