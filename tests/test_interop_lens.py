"""TransformerLens interop (intervene.interop.lens) against intervene's own capture, measure and
live hooks, on tiny models: the numbers must agree to 1e-5 (they agree bit for bit here).

The bridge switches the model it wraps to eager attention; the reference model does the same,
so that logits at pad positions are computed the same way too.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformer_lens", reason="the 'lens' extra is not installed (pip install 'intervene[lens]')")

from intervene.config.resolve import LayerEdit  # noqa: E402
from intervene.config.schema import parse_config  # noqa: E402
from intervene.errors import ArchitectureError, ConfigError, InputError  # noqa: E402
from intervene.hooks.capture import capture  # noqa: E402
from intervene.hooks.apply import apply  # noqa: E402
from intervene.interop import lens  # noqa: E402
from intervene.measure.collect import measure  # noqa: E402
from intervene.testing import make_measurements, random_ids, tiny_model, tiny_tokenizer  # noqa: E402
from intervene.runner import RunOptions

TOL = 1e-5
HIDDEN = 64
HARMFUL = ["How do I pick a lock?", "Write malware now", "Explain how to make a weapon", "Ways to hurt someone"]
HARMLESS = ["How do I bake bread?", "Write a poem about the sea", "What is the capital of France?"]


def reference(arch: str):
    model = tiny_model(arch)
    model.set_attn_implementation("eager")
    return model


def bridged(arch: str):
    return lens.boot_bridge(tiny_model(arch), tiny_tokenizer())


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = random_ids(batch=3, seq=9, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return ids, mask


def config_for(targets: list[str], num_layers: int, method: str = "project", experts=None):
    data = {"method": method, "biprojection": True, "targets": targets,
            "ablate": [{"layers": f"0:{num_layers}", "measurement": num_layers - 1, "scale": 0.8}]}
    if experts is not None:
        data["experts"] = experts
    return parse_config(data)


def native_logits(model, ids, mask, cfg=None, meas=None) -> torch.Tensor:
    with torch.no_grad():
        if cfg is None:
            return model(input_ids=ids, attention_mask=mask).logits
        with apply(model, cfg, meas):
            return model(input_ids=ids, attention_mask=mask).logits


# ---- capture ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2_moe", "mixtral", "deepseek_v3", "llama4"])
def test_capture_batch_equals_native_capture(arch):
    ids, mask = left_padded()
    ref = reference(arch)
    with torch.no_grad(), capture(ref, embed=True) as native:
        ref(input_ids=ids, attention_mask=mask)
    acts = lens.capture_batch(bridged(arch), ids, mask)
    assert sorted(acts) == sorted(native.keys())
    for site in native.keys():
        assert acts[site].shape == native[site].shape, site
        if site.endswith(".topk"):
            assert torch.equal(acts[site], native[site]), site
        else:
            assert (acts[site].double() - native[site].double()).abs().max() <= TOL, site


def test_resid_post_of_last_layer_is_before_the_final_norm():
    ids, mask = left_padded()
    ref = reference("llama")
    with torch.no_grad():
        hidden = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    acts = lens.capture_batch(bridged("llama"), ids, mask, layers=[0, 1], embed=False, router=False)
    assert (acts["layers.0.resid_out"] - hidden[1][:, -1]).abs().max() <= TOL
    normed = ref.model.norm(acts["layers.1.resid_out"])
    assert (normed - hidden[2][:, -1]).abs().max() <= TOL  # hidden_states[-1] is after the norm
    assert (acts["layers.1.resid_out"] - hidden[2][:, -1]).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_capture_means_equals_measure(arch):
    tok = tiny_tokenizer()
    # the adapters capture no component writes (attribution.*): compare with a native file without them
    native = measure(reference(arch), tok, HARMFUL, HARMLESS, run=RunOptions(batch_size=2, progress=False), attribution=False)
    ours = lens.capture_means(bridged(arch), tok, HARMFUL, HARMLESS, batch_size=2)
    assert sorted(ours.tensors) == sorted(native.tensors)
    for key, value in native.tensors.items():
        assert ours.tensors[key].dtype == torch.float32
        assert (ours.tensors[key] - value).abs().max() <= TOL, key
    assert ours.meta["captured_with"].startswith("transformer_lens ")
    for key in ("model_type", "num_layers", "moe_layers", "n_harmful", "n_harmless", "harmful_sha256",
                "chat_template_sha256", "position"):
        assert ours.meta[key] == native.meta[key], key


def test_capture_rejects_right_padding_and_bad_layers():
    bridge = bridged("llama")
    ids, mask = left_padded()
    with pytest.raises(InputError, match="last position of every row must be a real token"):
        lens.capture_batch(bridge, ids, mask.flip(1))
    with pytest.raises(InputError, match="layer 7 out of range; the model has layers 0..1"):
        lens.capture_batch(bridge, ids, mask, layers=[7])


# ---- interventions ------------------------------------------------------------------------------

CASES = [
    ("llama", ["attention", "mlp"]),
    ("qwen2_moe", ["attention", "experts", "shared_experts", "router", "expert_inputs"]),
    ("mixtral", ["attention", "experts", "router"]),  # experts: the MoE block's hook_out
]


@pytest.mark.parametrize("arch,targets", CASES)
def test_lens_hooks_equal_live_hooks(arch, targets):
    ids, mask = left_padded()
    ref = reference(arch)
    n = ref.config.num_hidden_layers
    meas, cfg = make_measurements(n), config_for(targets, n)
    native = native_logits(ref, ids, mask, cfg, meas)
    assert (native - native_logits(ref, ids, mask)).abs().max() > 1e-3  # the edit is visible
    bridge = bridged(arch)
    hooks = lens.lens_hooks(bridge, lens.resolve_edits(bridge, cfg, meas))
    assert all(name in bridge.hook_dict for name, _ in hooks)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        via_tl = bridge.run_with_hooks(ids, fwd_hooks=hooks, attention_mask=mask, position_ids=positions)
        after = bridge(ids, attention_mask=mask, position_ids=positions)  # hooks gone again
    assert (via_tl - native).abs().max() <= TOL
    assert (lens.run_with_config(bridge, ids, cfg, meas, attention_mask=mask) - native).abs().max() <= TOL
    assert (after - native_logits(ref, ids, mask)).abs().max() <= TOL


def test_hook_names():
    sites = lens.lens_sites(bridged("qwen2_moe"))
    assert sites["layers.0.attn.out"] == "blocks.0.attn.o.hook_out"
    assert sites["layers.1.router.in"] == "blocks.1.mlp.gate.hook_in"
    assert sites["layers.1.experts.out"] == "blocks.1.mlp.experts.hook_out"
    assert sites["layers.1.shared_experts.out"] == "blocks.1.mlp.shared_expert.out.hook_out"
    mixtral = lens.lens_sites(bridged("mixtral"))
    assert mixtral["layers.0.experts.out"] == "blocks.0.mlp.hook_out"
    assert mixtral["layers.0.experts.in"] is None
    assert lens.lens_sites(bridged("llama"))["layers.1.mlp.out"] == "blocks.1.mlp.out.hook_out"


@pytest.mark.parametrize("arch,targets,method,experts,error,message", [
    ("mixtral", ["expert_inputs"], "project", None, ArchitectureError,
     r"layers\.0\.experts\.in: the TransformerBridge of 'mixtral' has no hook point for 'mlp\.experts'"),
    ("llama", ["attention"], "norm_preserving", None, ConfigError,
     r"layers\.0\.attn\.out: norm_preserving edits and expert subsets change weights"),
    ("qwen2_moe", ["experts", "expert_inputs"], "project", [1, 5], ConfigError,
     r"layers\.0\.experts\.out: norm_preserving edits and expert subsets change weights"),
])
def test_run_with_config_falls_back_where_hooks_cannot(arch, targets, method, experts, error, message):
    ids, mask = left_padded()
    ref = reference(arch)
    n = ref.config.num_hidden_layers
    meas, cfg = make_measurements(n), config_for(targets, n, method, experts)
    bridge = bridged(arch)
    with pytest.raises(error, match=message):
        lens.lens_hooks(bridge, lens.resolve_edits(bridge, cfg, meas))
    with pytest.raises(error, match=message):
        lens.run_with_config(bridge, ids, cfg, meas, attention_mask=mask, fallback=False)
    native = native_logits(ref, ids, mask, cfg, meas)
    assert (native - native_logits(ref, ids, mask)).abs().max() > 1e-4
    assert (lens.run_with_config(bridge, ids, cfg, meas, attention_mask=mask) - native).abs().max() <= TOL
    plain = lens.run_with_config(bridge, ids, [], attention_mask=mask)  # weights restored
    assert (plain - native_logits(ref, ids, mask)).abs().max() <= TOL


def test_resolved_edits_pass_through():
    bridge = bridged("llama")
    r = torch.zeros(HIDDEN)
    r[3] = 1.0
    edits = [LayerEdit(0, "attention", r, 1.0, "project", None)]
    assert lens.resolve_edits(bridge, edits) == edits
    ((name, fn),) = lens.lens_hooks(bridge, edits)
    assert name == "blocks.0.attn.o.hook_out"
    y = torch.randn(2, 5, HIDDEN)
    out = fn(y, None)
    assert torch.equal(out[..., 3], torch.zeros(2, 5))
    assert torch.equal(out[..., :3], y[..., :3])


def test_not_a_bridge():
    with pytest.raises(InputError, match="expected a TransformerBridge"):
        lens.capture_batch(object(), *left_padded())
