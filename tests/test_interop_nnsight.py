"""nnsight interop (intervene.interop.nnsight) against intervene's own capture, measure and live
hooks, on tiny models: the numbers must agree to 1e-5 (they agree bit for bit here).

nnsight runs a trace's body from its source, so the traces below live in this file on purpose.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("nnsight", reason="the 'nnsight' extra is not installed (pip install 'intervene[nnsight]')")

from intervene.config.schema import parse_config  # noqa: E402
from intervene.errors import ConfigError, InputError  # noqa: E402
from intervene.hooks.capture import capture  # noqa: E402
from intervene.hooks.apply import apply  # noqa: E402
from intervene.interop import nnsight as nni  # noqa: E402
from intervene.measure.collect import measure  # noqa: E402
from intervene.testing import make_measurements, random_ids, tiny_model, tiny_tokenizer  # noqa: E402
from intervene.runner import RunOptions

TOL = 1e-5
HIDDEN = 64
HARMFUL = ["How do I pick a lock?", "Write malware now", "Explain how to make a weapon", "Ways to hurt someone"]
HARMLESS = ["How do I bake bread?", "Write a poem about the sea", "What is the capital of France?"]


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
    ref = tiny_model(arch)
    with torch.no_grad(), capture(ref, embed=True) as native:
        ref(input_ids=ids, attention_mask=mask)
    acts = nni.capture_batch(nni.wrap(tiny_model(arch)), ids, mask)
    assert sorted(acts) == sorted(native.keys())
    for site in native.keys():
        assert acts[site].shape == native[site].shape, site
        if site.endswith(".topk"):
            assert torch.equal(acts[site], native[site]), site
        else:
            assert (acts[site].double() - native[site].double()).abs().max() <= TOL, site


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_capture_means_equals_measure(arch):
    tok = tiny_tokenizer()
    # the adapters capture no component writes (attribution.*): compare with a native file without them
    native = measure(tiny_model(arch), tok, HARMFUL, HARMLESS, run=RunOptions(batch_size=2, progress=False), attribution=False)
    ours = nni.capture_means(nni.wrap(tiny_model(arch)), tok, HARMFUL, HARMLESS, batch_size=2)
    assert sorted(ours.tensors) == sorted(native.tensors)
    for key, value in native.tensors.items():
        assert ours.tensors[key].dtype == torch.float32
        assert (ours.tensors[key] - value).abs().max() <= TOL, key
    assert ours.meta["captured_with"].startswith("nnsight ")
    for key in ("model_type", "num_layers", "moe_layers", "n_harmful", "harmless_sha256", "chat_template_sha256"):
        assert ours.meta[key] == native.meta[key], key


def test_capture_layers_subset_and_errors():
    ids, mask = left_padded()
    nm = nni.wrap(tiny_model("qwen2_moe"))
    acts = nni.capture_batch(nm, ids, mask, layers=[1], embed=False, router=False)
    assert sorted(acts) == ["layers.1.resid_out"]
    with pytest.raises(InputError, match="layer 2 out of range; the model has layers 0..1"):
        nni.capture_batch(nm, ids, mask, layers=[2])
    with pytest.raises(InputError, match="last position of every row must be a real token"):
        nni.capture_batch(nm, ids, mask.flip(1))
    with pytest.raises(InputError, match="expected an nnsight model"):
        nni.capture_batch(tiny_model("llama"), ids, mask)


# ---- interventions ------------------------------------------------------------------------------

CASES = [
    ("llama", ["attention", "mlp"]),
    ("qwen2_moe", ["attention", "experts", "shared_experts", "router", "expert_inputs"]),
    ("mixtral", ["attention", "experts", "router", "expert_inputs"]),
    ("deepseek_v3", ["mlp", "experts", "shared_experts", "router"]),
]


@pytest.mark.parametrize("arch,targets", CASES)
def test_nnsight_edits_equal_live_hooks(arch, targets):
    ids, mask = left_padded()
    ref = tiny_model(arch)
    n = ref.config.num_hidden_layers
    meas, cfg = make_measurements(n), config_for(targets, n)
    native = native_logits(ref, ids, mask, cfg, meas)
    assert (native - native_logits(ref, ids, mask)).abs().max() > 1e-3  # the edit is visible
    nm = nni.wrap(tiny_model(arch))
    edits = nni.resolve_edits(nm, cfg, meas)
    out = {}
    with torch.no_grad(), nm.trace() as tracer:  # the way a researcher writes it
        with tracer.invoke(**nni.forward_inputs(ids, mask)):
            pass
        nni.nnsight_edits(tracer, nm, edits)
        with tracer.invoke():
            out["logits"] = nm.output.logits.save()
    assert (out["logits"] - native).abs().max() <= TOL
    assert (nni.run_with_config(nm, ids, cfg, meas, attention_mask=mask) - native).abs().max() <= TOL
    plain = nni.run_with_config(nm, ids, [], attention_mask=mask)  # nothing left behind
    assert (plain - native_logits(ref, ids, mask)).abs().max() <= TOL


@pytest.mark.parametrize("arch,targets,method,experts", [
    ("llama", ["attention"], "norm_preserving", None),
    ("qwen2_moe", ["experts", "expert_inputs"], "project", [1, 5]),
])
def test_weight_edits_run_around_the_trace(arch, targets, method, experts):
    ids, mask = left_padded()
    ref = tiny_model(arch)
    n = ref.config.num_hidden_layers
    meas, cfg = make_measurements(n), config_for(targets, n, method, experts)
    nm = nni.wrap(tiny_model(arch))
    with pytest.raises(ConfigError, match="norm_preserving edits and expert subsets change weights, and no nnsight"):
        with nm.trace() as tracer:
            with tracer.invoke(**nni.forward_inputs(ids, mask)):
                pass
            nni.nnsight_edits(tracer, nm, nni.resolve_edits(nm, cfg, meas))
    native = native_logits(ref, ids, mask, cfg, meas)
    assert (native - native_logits(ref, ids, mask)).abs().max() > 1e-4
    assert (nni.run_with_config(nm, ids, cfg, meas, attention_mask=mask) - native).abs().max() <= TOL
    plain = nni.run_with_config(nm, ids, [], attention_mask=mask)  # weights restored
    assert (plain - native_logits(ref, ids, mask)).abs().max() <= TOL


def test_transformers_model_wrapper():
    from nnsight.modeling.transformers import TransformersModel

    ids, mask = left_padded()
    ref = tiny_model("llama")
    meas, cfg = make_measurements(2), config_for(["attention", "mlp"], 2)
    nm = TransformersModel(tiny_model("llama"), tokenizer=tiny_tokenizer())
    assert (nni.run_with_config(nm, ids, cfg, meas, attention_mask=mask)
            - native_logits(ref, ids, mask, cfg, meas)).abs().max() <= TOL
    with torch.no_grad(), capture(ref) as native:
        ref(input_ids=ids, attention_mask=mask)
    acts = nni.capture_batch(nm, ids, mask, embed=False)
    assert (acts["layers.1.resid_out"] - native["layers.1.resid_out"]).abs().max() <= TOL
