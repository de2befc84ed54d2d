"""inspect: what is reported for tiny checkpoints, from headers only."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from intervene.cli import main
from intervene.io.inspection import inspect_model, read_safetensors_header
from intervene.testing import save_tiny, tiny_config, tiny_model


def on_disk(directory) -> tuple[int, int, set[str]]:
    """(n_tensors, bytes, dtypes) read with safetensors itself."""
    n, size, dtypes = 0, 0, set()
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                n += 1
                size += t.numel() * t.element_size()
                dtypes.add(str(t.dtype))
    return n, size, dtypes


@pytest.mark.parametrize("original_format", [True, False], ids=["per-expert", "fused"])
def test_deepseek_v3_report(original_format, tmp_path):
    save_tiny(tiny_model("deepseek_v3"), tmp_path, save_original_format=original_format)
    r = inspect_model(tmp_path)
    n, size, dtypes = on_disk(tmp_path)
    assert (r.arch, r.model_type, r.format, r.hidden_size, r.num_layers) == ("deepseek_v3", "deepseek_v3", "safetensors", 64, 3)
    assert (r.moe_layers, r.dense_layers, r.dense_leading_layers) == ([1, 2], [0], 1)
    assert (r.num_experts, r.top_k, r.router, r.shared_experts, r.n_shared_experts) == (8, 2, "mlp.gate", "mlp.shared_experts", 1)
    assert (r.n_tensors, r.total_size, r.dtypes) == (n, size, {"F32": n}) and dtypes == {"torch.float32"}
    assert r.n_files == len(list(tmp_path.glob("*.safetensors"))) > 1
    assert r.layers_prefix_on_disk == "model.layers" and r.quantized == {}
    assert r.layouts[0].layout == "dense"
    for lay in r.layouts[1:]:
        assert lay.experts_on_disk == 8 and lay.problems == []
        if original_format:
            assert lay.layout == "per-expert"
            assert (lay.shapes["down"], lay.hidden_axes["down"]) == ([64, 24], 0)
            assert (lay.shapes["gate/up"], lay.hidden_axes["gate/up"]) == ([24, 64], 1)
        else:
            assert lay.layout == "fused"
            assert (lay.shapes["down"], lay.hidden_axes["down"]) == ([8, 64, 24], 1)
            assert (lay.shapes["gate/up"], lay.hidden_axes["gate/up"]) == ([8, 48, 64], 2)


@pytest.mark.parametrize("arch,moe,down_axis,shared", [
    ("gpt_oss", [0, 1], 2, None),
    ("llama4", [1], 2, "feed_forward.shared_expert"),
    ("mixtral", [0, 1], 0, None),
    ("qwen2_moe", [0, 1], 0, "mlp.shared_expert"),
])
def test_moe_layouts(arch, moe, down_axis, shared, tmp_path):
    save_tiny(tiny_model(arch), tmp_path)  # original format: per-expert where transformers does that
    r = inspect_model(tmp_path)
    assert r.moe_layers == moe and r.shared_experts == shared
    for lay in r.layouts:
        assert lay.moe == (lay.layer in moe)
        if lay.moe:
            assert lay.hidden_axes["down"] == down_axis and lay.problems == []
            assert lay.layout == ("fused" if arch in ("gpt_oss", "llama4") else "per-expert")
    if arch == "gpt_oss":
        assert r.layouts[0].hidden_axes["down_bias"] == 1 and r.layouts[0].shapes["down"] == [8, 24, 64]
    assert r.router_output == ("llama4" if arch == "llama4" else "topk")


def test_dense_model_and_text(tmp_path, capsys):
    save_tiny(tiny_model("gemma3"), tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "architecture:     gemma3 (model_type gemma3_text; Gemma3ForCausalLM)" in out
    assert "decoder layers:   2 under 'model.layers' on disk" in out
    assert "MoE:              no (dense model)" in out and "quantized:        no" in out
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["moe_layers"] == [] and data["hidden_size"] == 64 and data["dtypes"] == {"F32": data["n_tensors"]}


def test_moe_text_groups_layers(tmp_path, capsys):
    save_tiny(tiny_model("deepseek_v2"), tmp_path, save_original_format=False)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "MoE layers:       1-2 (2)" in out
    assert "dense layers:     0 (first_k_dense_replace = 1)" in out
    assert "layers 1-2          fused, 8 experts: down [8, 64, 24] H axis 1, gate/up [8, 48, 64] H axis 2" in out


def truncate_to_header(path) -> int:
    """Cut a safetensors file after its header: any read of tensor data would fail."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    os.truncate(path, 8 + n)
    return 8 + n


def test_reads_headers_only(tmp_path, monkeypatch):
    save_tiny(tiny_model("qwen3_moe"), tmp_path, save_original_format=False)
    before = inspect_model(tmp_path).to_json()
    for f in tmp_path.glob("*.safetensors"):
        size = truncate_to_header(f)
        assert f.stat().st_size == size
    import safetensors
    import safetensors.torch

    def forbidden(*_a, **_k):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(safetensors, "safe_open", forbidden)
    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)
    monkeypatch.setattr(safetensors.torch, "safe_open", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    after = inspect_model(tmp_path).to_json()
    assert json.loads(after)["total_size"] > 100_000  # from the index, not from the (cut) files
    assert after.replace(str(tmp_path), "") == before.replace(str(tmp_path), "")


def _write_checkpoint(directory, config, tensors: dict[str, torch.Tensor]) -> None:
    config.save_pretrained(str(directory))
    save_file(tensors, str(directory / "model.safetensors"))


def test_quantized_and_wrong_axis_detected(tmp_path):
    # MXFP4 gpt-oss experts: *_blocks / *_scales uint8, no plain expert tensors
    mx = tmp_path / "mxfp4"
    mx.mkdir()
    q = {}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts."
        q[p + "down_proj_blocks"] = torch.zeros(8, 64, 1, 16, dtype=torch.uint8)
        q[p + "down_proj_scales"] = torch.zeros(8, 64, 1, dtype=torch.uint8)
        q[p + "gate_up_proj_blocks"] = torch.zeros(8, 48, 2, 16, dtype=torch.uint8)
        q[p + "gate_up_proj_scales"] = torch.zeros(8, 48, 2, dtype=torch.uint8)
        q[f"model.layers.{layer}.self_attn.o_proj.weight"] = torch.zeros(64, 64, dtype=torch.bfloat16)
    _write_checkpoint(mx, tiny_config("gpt_oss"), q)
    r = inspect_model(mx)
    assert r.quantized == {"mxfp4": 8} and r.dtypes == {"U8": 8, "BF16": 2}
    assert [lay.layout for lay in r.layouts] == ["quantized", "quantized"]
    assert "mxfp4" in r.layouts[0].problems[0] and "dequantize before baking" in r.text()

    # FP8 DeepSeek-V3 per-expert weights with weight_scale_inv
    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    t = {}
    for e in range(8):
        p = f"model.layers.1.mlp.experts.{e}."
        t[p + "down_proj.weight"] = torch.zeros(64, 24).to(torch.float8_e4m3fn)
        t[p + "down_proj.weight_scale_inv"] = torch.ones(1, 1)
    _write_checkpoint(fp8, tiny_config("deepseek_v3"), t)
    r = inspect_model(fp8)
    assert r.quantized == {"fp8": 16} and r.dtypes == {"F8_E4M3": 8, "F32": 8}
    assert r.layouts[1].layout == "per-expert" and r.layouts[2].layout == "missing"

    # gpt-oss down_proj written as [E, H, I] instead of [E, I, H]: the stated axis does not hold H
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    _write_checkpoint(wrong, tiny_config("gpt_oss"), {
        "model.layers.0.mlp.experts.down_proj": torch.zeros(8, 64, 24),
        "model.layers.1.mlp.experts.down_proj": torch.zeros(8, 24, 64),
    })
    r = inspect_model(wrong)
    assert r.layouts[0].problems == ["mlp.experts.down_proj [8, 64, 24]: axis 2 is not hidden size 64"]
    assert r.layouts[1].problems == []
    assert "PROBLEM" in r.text()


def test_gguf(tmp_path):
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    path = tmp_path / "tiny.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(128)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", quantize(rng.standard_normal((128, 64)).astype(np.float32),
                                               GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
    for i in range(2):
        for name, shape in [("attn_output", (64, 64)), ("ffn_down", (64, 96))]:
            w.add_tensor(f"blk.{i}.{name}.weight", rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = inspect_model(path)
    assert (r.format, r.arch, r.hidden_size, r.num_layers, r.n_tensors) == ("gguf", "llama", 64, 2, 5)
    assert r.dtypes == {"Q8_0": 1, "F32": 4} and r.quantized == {"gguf:Q8_0": 1}
    assert r.total_size == path.stat().st_size


@pytest.mark.parametrize("case", ["missing", "unknown_type", "no_weights", "hub", "corrupt"])
def test_inspect_errors(case, tmp_path, capsys):
    d = tmp_path / "m"
    if case == "missing":
        expect = f"model not found: {d}"
    elif case == "unknown_type":
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "foo"}))
        expect = "unsupported model_type 'foo'; supported: deepseek_v2, deepseek_v3, ernie4_5_moe, gemma2, gemma3_text, glm4_moe"
    elif case == "no_weights":
        d.mkdir()
        tiny_config("llama").save_pretrained(str(d))
        expect = f"{d} has no .safetensors files"
    elif case == "hub":
        d = "someorg/somemodel"
        expect = "inspect reads local files only; 'someorg/somemodel' looks like a hub id"
    else:
        d.mkdir()
        tiny_config("llama").save_pretrained(str(d))
        (d / "model.safetensors").write_bytes(b"\xff" * 64)
        expect = "model.safetensors is not a safetensors file"
    assert main(["inspect", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("intervene inspect: error: ") and "\n" not in err and expect in err, err


def test_header_reader_matches_safetensors(tmp_path):
    tensors = {"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.bfloat16)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"k": "v"})
    infos, meta = read_safetensors_header(tmp_path / "x.safetensors")
    assert meta == {"k": "v"}
    assert (infos["a"].dtype, infos["a"].shape, infos["a"].nbytes) == ("F32", (3, 5), 60)
    assert (infos["b"].dtype, infos["b"].shape, infos["b"].nbytes) == ("BF16", (7,), 14)


def test_header_without_data_offsets_is_a_named_checkpoint_error(tmp_path, capsys):
    from intervene.errors import CheckpointError

    d = tmp_path / "m"
    d.mkdir()
    tiny_config("llama").save_pretrained(str(d))
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [2]}}).encode()
    shard = d / "model.safetensors"
    shard.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError) as err:
        read_safetensors_header(shard)
    assert str(shard) in str(err.value) and "data_offsets" in str(err.value) and "\n" not in str(err.value)
    assert main(["inspect", str(d)]) == 2
    out = capsys.readouterr().err.strip()
    assert out.startswith("intervene inspect: error: ") and "\n" not in out and str(shard) in out, out
