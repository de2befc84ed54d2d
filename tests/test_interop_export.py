"""Measurements <-> TransformerLens-keyed dict (intervene.interop.export): exact keys, exact round trip."""

from __future__ import annotations

import pytest
import torch

from intervene.errors import MeasurementError
from intervene.interop.export import from_lens_dict, intervene_key, lens_key, to_lens_dict
from intervene.io.measurements import Measurements, load_measurements

EXPECTED_KEYS = {
    "direction.0": "blocks.0.hook_resid_post",
    "direction.11": "blocks.11.hook_resid_post",
    "direction.embed": "hook_embed",
    "harmful_mean.3": "harmful_mean.blocks.3.hook_resid_post",
    "harmless_mean.3": "harmless_mean.blocks.3.hook_resid_post",
    "harmful_mean.embed": "harmful_mean.hook_embed",
    "harmless_mean.embed": "harmless_mean.hook_embed",
    "router.harmful_freq.2": "intervene.router.harmful_freq.2",
    "router.harmless_logits.2": "intervene.router.harmless_logits.2",
}


def full_measurements(num_layers: int = 3, hidden: int = 16, experts: int = 4) -> Measurements:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name in ["embed"] + [str(i) for i in range(num_layers)]:
        h, m = torch.randn(hidden, generator=g), torch.randn(hidden, generator=g)
        tensors.update({f"harmful_mean.{name}": h, f"harmless_mean.{name}": m, f"direction.{name}": h - m})
    for layer in range(1, num_layers):
        for s in ("harmful", "harmless"):
            tensors[f"router.{s}_freq.{layer}"] = torch.rand(experts, generator=g)
            tensors[f"router.{s}_logits.{layer}"] = torch.randn(experts, generator=g)
    return Measurements(tensors=tensors, meta={"model_type": "qwen2_moe", "num_layers": num_layers})


@pytest.mark.parametrize("ours,theirs", sorted(EXPECTED_KEYS.items()))
def test_key_mapping(ours, theirs):
    assert lens_key(ours) == theirs
    assert intervene_key(theirs) == ours


def test_round_trip_is_exact(tmp_path):
    m = full_measurements()
    m.save(tmp_path / "m.safetensors")
    loaded = load_measurements(tmp_path / "m.safetensors")
    d = to_lens_dict(loaded)
    assert len(d) == len(loaded.tensors) == 3 * 4 + 2 * 4
    assert d["blocks.2.hook_resid_post"] is loaded.tensors["direction.2"]
    assert torch.equal(d["hook_embed"], m.tensors["direction.embed"])
    back = from_lens_dict(d, loaded.meta)
    assert sorted(back.tensors) == sorted(loaded.tensors)
    for key, value in loaded.tensors.items():
        assert back.tensors[key].dtype == value.dtype and torch.equal(back.tensors[key], value), key
    assert back.meta == loaded.meta == m.meta
    assert back.layers == [0, 1, 2]
    assert torch.equal(back.direction("embed"), m.tensors["direction.embed"])


def test_from_lens_dict_errors():
    r = torch.ones(4)
    with pytest.raises(MeasurementError, match="lens dict key 'blocks.0.hook_resid_pre' is not one of"):
        from_lens_dict({"blocks.0.hook_resid_pre": r})
    with pytest.raises(MeasurementError, match="'intervene.direction.0' and 'blocks.0.hook_resid_post' both map"):
        from_lens_dict({"blocks.0.hook_resid_post": r, "intervene.direction.0": r})
    with pytest.raises(MeasurementError, match="entry 'hook_embed' is a list, not a tensor"):
        from_lens_dict({"hook_embed": [1.0]})
    with pytest.raises(MeasurementError, match="no blocks.L.hook_resid_post or hook_embed direction"):
        from_lens_dict({"harmful_mean.hook_embed": r})
    assert from_lens_dict({"hook_embed": r}).meta == {}


def test_keys_are_transformer_lens_hook_names():
    pytest.importorskip("transformer_lens", reason="the 'lens' extra is not installed (pip install 'intervene[lens]')")
    from intervene.interop.lens import boot_bridge, capture_batch
    from intervene.testing import random_ids, tiny_model, tiny_tokenizer

    bridge = boot_bridge(tiny_model("llama"), tiny_tokenizer())
    d = to_lens_dict(full_measurements(num_layers=2, hidden=64))
    hooks = {k for k in d if not k.startswith(("harmful_mean.", "harmless_mean.", "intervene."))}
    assert hooks == {"hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    assert hooks <= set(bridge.hook_dict)
    # the activation a TL user reads at that hook is the one intervene measured there
    ids = random_ids()
    seen = {}
    bridge.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_post",
                                           lambda act, hook: seen.update(resid=act[:, -1].detach()))])
    acts = capture_batch(bridge, ids, layers=[1], embed=False, router=False)
    assert torch.equal(seen["resid"], acts["layers.1.resid_out"])
