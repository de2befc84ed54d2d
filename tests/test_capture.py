"""Capture hooks against independent computations, on every architecture of the table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from intervene.arch import arch_for_config, decoder_layers, get_module
from intervene.errors import InputError
from intervene.hooks.capture import capture, capture_sites, resid_site, router_site
from intervene.testing import ARCH_NAMES, MOE_ARCH_NAMES, random_ids, tiny_model


def hook_count(model: torch.nn.Module) -> int:
    """Hooks installed by intervene (transformers installs its own output-recording hooks on the
    first forward call and keeps them, so a plain count would change for that reason)."""
    return sum(
        1
        for m in model.modules()
        for fn in list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values())
        if getattr(fn, "__module__", "").startswith("intervene.")
    )


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = random_ids(batch=3, seq=9, seed=seed)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on the first row
    mask[2, :1] = 0
    return {"input_ids": ids, "attention_mask": mask}


def moe_layers(model) -> list[int]:
    spec = arch_for_config(model.config)
    return [i for i in range(model.config.num_hidden_layers) if spec.is_moe_layer(model.config, i)]


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_residuals_equal_hidden_states(arch):
    model = tiny_model(arch)
    inputs = batch()
    n = model.config.num_hidden_layers
    before = hook_count(model)
    with torch.no_grad(), capture(model, embed=True) as acts:
        out = model(**inputs, output_hidden_states=True)
    assert hook_count(model) == before
    hs = out.hidden_states
    assert len(hs) == n + 1
    assert torch.equal(acts["embed"], hs[0][:, -1])
    for layer in range(n - 1):
        got = acts[resid_site(layer)]
        assert got.shape == (3, model.config.hidden_size)
        assert torch.equal(got, hs[layer + 1][:, -1]), f"{arch} layer {layer}"
    # the last hidden state is taken after the final norm; the capture is the pre-norm residual
    last = acts[resid_site(n - 1)]
    with torch.no_grad():
        assert torch.allclose(model.model.norm(last), hs[n][:, -1], atol=1e-6, rtol=0)
    assert not torch.allclose(last, hs[n][:, -1], atol=1e-3)
    assert torch.equal(acts.token_mask(), inputs["attention_mask"].bool())
    assert set(acts.keys()) == set(capture_sites(model, embed=True))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_positions_all_matches_every_position(arch):
    model = tiny_model(arch)
    n = model.config.num_hidden_layers
    with torch.no_grad(), capture(model, layers=[0], positions="all", router=False) as acts:
        out = model(**batch(1), output_hidden_states=True)
    assert acts.keys() == [resid_site(0)]
    assert torch.equal(acts[resid_site(0)], out.hidden_states[1]) or n == 1


def _router_weights(model, layer):
    spec = arch_for_config(model.config)
    router = get_module(decoder_layers(model)[layer], spec.router)
    return router, router.weight, getattr(router, "bias", None)


def _expected_topk(arch: str, logits: torch.Tensor, k: int) -> torch.Tensor | None:
    """The selection rule, written out independently, where it is simple."""
    if arch in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2"):
        return torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)[1]
    if arch in ("gpt_oss", "llama4"):
        return torch.topk(logits, k, dim=-1)[1]
    return None  # DeepSeek-V3 / GLM: e_score_correction_bias and groups -> the module decides


@pytest.mark.parametrize("arch", MOE_ARCH_NAMES)
def test_router_logits_and_topk(arch):
    model = tiny_model(arch)
    spec = arch_for_config(model.config)
    k = spec.top_k(model.config)
    E = spec.num_experts(model.config)
    layers = moe_layers(model)
    assert layers
    with torch.no_grad(), capture(model, positions="all") as acts:
        model(**batch(2))
    for layer in layers:
        router_in = acts[router_site(layer, "in")]
        logits = acts[router_site(layer, "logits")]
        topk = acts[router_site(layer, "topk")]
        assert router_in.shape == (3, 9, model.config.hidden_size)
        assert logits.shape == (3, 9, E) and topk.shape == (3, 9, k)
        router, weight, bias = _router_weights(model, layer)
        x = router_in.float() if arch in ("deepseek_v2", "deepseek_v3", "glm4_moe") else router_in
        expected = F.linear(x, weight.float() if x.dtype == torch.float32 else weight, bias)
        assert torch.equal(logits, expected), f"{arch} layer {layer}: {(logits - expected).abs().max()}"
        rule = _expected_topk(arch, logits.reshape(-1, E), k)
        if rule is None:
            with torch.no_grad():
                module_out = router(router_in.reshape(-1, router_in.shape[-1]))
            rule = module_out[2]
        # some routers pick with sorted=False: compare the chosen sets
        assert torch.equal(topk.reshape(-1, k).sort(-1)[0], rule.sort(-1)[0]), f"{arch} layer {layer}"
        assert int(topk.min()) >= 0 and int(topk.max()) < E


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "llama4", "gpt_oss"])
def test_router_input_last_position_and_dense_layers(arch):
    model = tiny_model(arch)
    with torch.no_grad(), capture(model) as acts_last:
        model(**batch(3))
    with torch.no_grad(), capture(model, positions="all") as acts_all:
        model(**batch(3))
    spec = arch_for_config(model.config)
    for layer in range(model.config.num_hidden_layers):
        if spec.is_moe_layer(model.config, layer):
            assert torch.equal(acts_last[router_site(layer, "in")], acts_all[router_site(layer, "in")][:, -1])
            # router logits/top-k are per token in both modes
            assert torch.equal(acts_last[router_site(layer, "logits")], acts_all[router_site(layer, "logits")])
        else:  # dense leading / interleaved layers have no router sites
            assert router_site(layer, "logits") not in acts_last


def test_several_calls_concatenate():
    model = tiny_model("qwen3_moe")
    b1, b2 = batch(4), batch(5)
    with torch.no_grad(), capture(model, layers=[1]) as acts:
        model(**b1)
        model(**b2)
    with torch.no_grad(), capture(model, layers=[1]) as single:
        model(**b2)
    assert len(acts.calls(resid_site(1))) == 2
    assert acts[resid_site(1)].shape == (6, 64)
    assert torch.equal(acts[resid_site(1)][3:], single[resid_site(1)])
    assert acts[router_site(1, "logits")].shape == (6, 9, 8)
    assert torch.equal(acts.token_mask(), torch.cat([b1["attention_mask"], b2["attention_mask"]]).bool())
    acts.clear()
    assert acts.keys() == []


def test_hooks_removed_on_exception():
    model = tiny_model("deepseek_v3")
    before = hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, embed=True) as acts:
            assert hook_count(model) > before
            model(**batch())
            raise RuntimeError("boom")
    assert hook_count(model) == before
    assert resid_site(2) in acts  # what was recorded before the error is kept
    # a failing forward pass inside the block also leaves nothing behind
    with pytest.raises(Exception):
        with capture(model):
            model(input_ids=torch.full((1, 4), 10_000))  # out-of-vocabulary id
    assert hook_count(model) == before


def test_sites_and_bad_arguments():
    model = tiny_model("deepseek_v2")
    assert capture_sites(model, layers=[0, 1]) == [
        "layers.0.resid_out", "layers.1.resid_out", "layers.1.router.in", "layers.1.router.logits",
        "layers.1.router.topk",
    ]
    assert capture_sites(model.config, layers=[2], embed=True, router=False) == ["embed", "layers.2.resid_out"]
    with pytest.raises(InputError, match="layer 3 out of range.*0..2"):
        with capture(model, layers=[3]):
            pass
    with pytest.raises(InputError, match="positions"):
        with capture(model, positions="first"):
            pass
    with capture(model, layers=[0]) as acts:
        pass
    with pytest.raises(KeyError, match="layers.1.resid_out"):
        acts.calls("layers.1.resid_out")
    assert hook_count(model) == 0
