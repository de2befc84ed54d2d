"""bake --dequantize on tiny synthetic FP8 block-scaled (DeepSeek-V3 layout) and MXFP4 (gpt-oss layout)
checkpoints, built here in the formats' documented layouts; transformers' own dequantizing loader is
the reference."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from intervene.bake import bake
from intervene.errors import CheckpointError
from intervene.io.checkpoint import open_checkpoint
from intervene.io.quantized import dequantize_fp8, dequantize_mxfp4, find_quantized
from intervene.testing import make_measurements, save_tiny, tiny_model
from intervene.runner import RunOptions

BLOCK = (16, 16)  # maths test: blocks smaller than the 40 x 72 matrix, with partial blocks at the edges
# checkpoints: blocks that divide every tiny dimension (24, 64, ...): transformers concatenates the gate
# and up scales of fused experts, which is only right when I is a multiple of the block (as in real models)
CHECKPOINT_BLOCK = (8, 8)
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def quantize_fp8(w: torch.Tensor, block=BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block amax / 448 scales (the DeepSeek-V3 recipe): ``weight`` e4m3, ``weight_scale_inv`` f32."""
    rows, cols = w.shape
    nr, nc = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    scale = torch.empty(nr, nc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(nr):
        for j in range(nc):
            blk = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].float()
            s = blk.abs().max().clamp_min(1e-12) / 448.0
            scale[i, j] = s
            q[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [E, in, out] (the in-memory layout) -> ``_blocks`` U8 [E, out, in/32, 16], ``_scales`` U8 [E, out, in/32]."""
    t = w.float().transpose(1, 2)  # [E, out, in]
    e, r, n = t.shape
    groups = t.reshape(e, r, n // 32, 32)
    exp = torch.ceil(torch.log2(groups.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-127, 127)
    scaled = groups / torch.pow(2.0, exp).unsqueeze(-1)
    idx = (scaled.unsqueeze(-1) - FP4).abs().argmin(-1).to(torch.uint8)  # nearest FP4 value
    packed = idx[..., 0::2] | (idx[..., 1::2] << 4)
    return packed.contiguous(), (exp + 127).to(torch.uint8).contiguous()


def quantized_copy(src, out, convert, quantization_config):
    """``src`` with each tensor ``convert(key, t)`` maps to a dict replaced by that dict, and the config's
    ``quantization_config`` set."""
    out.mkdir()
    weight_map = {}
    for header in open_checkpoint(src).shards:
        new = {}
        for key, t in load_file(str(header.path)).items():
            new.update(convert(key, t) or {key: t})
        save_file({k: v.contiguous() for k, v in new.items()}, str(out / header.path.name), metadata={"format": "pt"})
        weight_map.update({k: header.path.name for k in new})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def fp8_checkpoint(tmp_path):
    """A tiny DeepSeek-V3 with every linear weight of its decoder layers (not the router) stored in FP8."""
    src = tmp_path / "bf16"
    save_tiny(tiny_model("deepseek_v3", dtype=torch.bfloat16), src, max_shard_size="100KB")

    def convert(key, t):
        if ".layers." in key and key.endswith("proj.weight") and t.dim() == 2:
            q, s = quantize_fp8(t, CHECKPOINT_BLOCK)
            return {key: q, key + "_scale_inv": s}
        return None

    return quantized_copy(src, tmp_path / "fp8", convert, {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(CHECKPOINT_BLOCK)})


def mxfp4_checkpoint(tmp_path):
    """A tiny gpt-oss (intermediate 32: MXFP4 groups of 32) with its experts stored as MXFP4."""
    src = tmp_path / "bf16"
    save_tiny(tiny_model("gpt_oss", dtype=torch.bfloat16, intermediate_size=32), src, max_shard_size="100KB")

    def convert(key, t):
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize_mxfp4(t)
            return {key + "_blocks": blocks, key + "_scales": scales}
        return None

    return quantized_copy(src, tmp_path / "mxfp4", convert, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})


def transformers_state(path) -> dict[str, torch.Tensor]:
    """What transformers loads from ``path`` (quantized checkpoints: its own dequantization on CPU)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def config(tmp_path, model, num_layers, targets, layers=None):
    meas = make_measurements(num_layers, path=str(tmp_path / "m.safetensors"))
    meas.save(tmp_path / "m.safetensors")
    return {"model": str(model), "measurements": str(tmp_path / "m.safetensors"), "targets": targets,
            "ablate": [{"layers": layers or f"0:{num_layers}", "measurement": 0, "scale": 1.0}]}


def write_config(tmp_path, cfg):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_bf16_close(a: dict, b: dict, keys):
    for k in keys:
        assert a[k].shape == b[k].shape, k
        # <= bf16 rounding: one ulp at the tensor's scale (2^-8 relative)
        assert (a[k] - b[k]).abs().max() <= 2 ** -7 * b[k].abs().max() + 1e-6, k


# ---- the maths alone against transformers' functions ----------------------------------------------

def test_fp8_and_mxfp4_maths_match_transformers():
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(0)
    w = torch.randn(40, 72)
    q, s = quantize_fp8(w)
    ours = dequantize_fp8(q, s, BLOCK).float()
    ref = _dequantize_fp8_weight(q, s, list(BLOCK), torch.float32).to(torch.bfloat16).float()
    assert torch.equal(ours, ref)
    assert (ours - w).abs().max() < 0.1 * w.abs().max()  # and it is w, to FP8 precision
    assert not torch.equal(dequantize_fp8(q, s.flip(0), BLOCK).float(), ours)  # negative control: other blocks' scales
    with pytest.raises(CheckpointError, match="weight_block_size"):
        dequantize_fp8(q, s, (8, 8))

    experts = torch.randn(3, 64, 40)  # [E, in, out]
    blocks, scales = quantize_mxfp4(experts)
    ours = dequantize_mxfp4(blocks, scales)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    assert ours.shape == (3, 64, 40) and torch.equal(ours, ref)
    assert (ours.float() - experts).abs().max() < 0.5 * experts.abs().max()


# ---- the bake ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_dequantizing_bake_equals_transformers_then_bake(fmt, tmp_path):
    src = fp8_checkpoint(tmp_path) if fmt == "fp8" else mxfp4_checkpoint(tmp_path)
    quantized = find_quantized(open_checkpoint(src))
    assert quantized and {q.format for q in quantized.values()} == {fmt}
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    targets = ["attention", "experts"]
    cfg = write_config(tmp_path, config(tmp_path, src, n, targets, layers="1:2"))  # layer 1: attention + experts

    with pytest.raises(CheckpointError, match="--dequantize"):
        bake(cfg, output=tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()

    # reference: transformers dequantizes on load, save_pretrained, then the ordinary bake
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    ref_model.hf_quantizer = None
    if hasattr(ref_model.config, "quantization_config"):
        del ref_model.config.quantization_config
    ref_dir = tmp_path / "ref"
    ref_model.save_pretrained(str(ref_dir))
    assert "quantization_config" not in json.loads((ref_dir / "config.json").read_text())
    bake(cfg, output=tmp_path / "ref_baked", model=ref_dir, progress=False)
    reference = transformers_state(tmp_path / "ref_baked")

    for mode in ("edited", "all"):
        out = tmp_path / f"baked_{mode}"
        result = bake(cfg, output=out, progress=False, dequantize=mode)
        assert result.tensors_edited > 0
        written = json.loads((out / "config.json").read_text())
        remaining = find_quantized(open_checkpoint(out))
        if mode == "all":
            assert "quantization_config" not in written and not remaining
        else:
            modules = written["quantization_config"]["modules_to_not_convert"]
            edited = {k for k in quantized if k not in remaining}
            assert edited and remaining  # some dequantized, some still quantized
            assert all(any(k == m or k.startswith(m + ".") or k == m + ".weight" for m in modules) for k in edited)
            assert not any(any(k == m + ".weight" or k.startswith(m + ".") for m in modules) for k in remaining)
        ours = transformers_state(out)  # loads in transformers (what stays quantized: its own dequantization)
        assert set(ours) == set(reference)
        assert_bf16_close(ours, reference, reference)
        assert not list(tmp_path.glob(f".baked_{mode}.dequantize.*"))  # the dequantized copy is gone
    # negative control: the edit is really there
    plain = transformers_state(ref_dir)
    assert any((plain[k] - reference[k]).abs().max() > 1e-3 for k in reference)


def test_dequantize_needs_quantized_tensors(tmp_path):
    src = tmp_path / "plain"
    save_tiny(tiny_model("llama"), src)
    cfg = write_config(tmp_path, config(tmp_path, src, 2, ["attention"]))
    with pytest.raises(CheckpointError, match="no FP8"):
        bake(cfg, output=tmp_path / "o", progress=False, dequantize="all")


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_stream_layers_reads_quantized(fmt, tmp_path):
    """measure --stream-layers of a quantized checkpoint == the in-memory measure of the model
    transformers dequantizes from it (both bf16)."""
    from intervene.io.models import load_model
    from intervene.measure.collect import measure
    from intervene.measure.stream import measure_streamed
    from intervene.testing import tiny_tokenizer

    src = fp8_checkpoint(tmp_path) if fmt == "fp8" else mxfp4_checkpoint(tmp_path)
    tiny_tokenizer().save_pretrained(str(src))
    harmful, harmless = ["make a bomb", "hack a bank now"], ["bake bread", "a poem", "hello there"]
    model, tok = load_model(str(src), dtype="bfloat16")
    full = measure(model, tok, harmful, harmless, run=RunOptions(batch_size=2, progress=False), whiten_rank=0)
    streamed = measure_streamed(str(src), tok, harmful, harmless, run=RunOptions(batch_size=2, progress=False), whiten_rank=0,
                                dtype="bfloat16")
    assert set(full.tensors) == set(streamed.tensors)
    for k, t in full.tensors.items():
        assert ((t - streamed.tensors[k]).norm() / t.norm().clamp_min(1e-30)) <= 1e-2, k
