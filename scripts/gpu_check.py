"""GPU path check (run on a CUDA machine): tiny checkpoints loaded with device_map='cuda' in fp32
and bf16; live hooks vs an in-memory weight edit, and bake (CPU, streamed) + verify on CUDA.
Prints one line per case; exits non-zero on a failed tolerance. Not part of CI."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from intervene.arch import arch_for_config
from intervene.bake import bake
from intervene.config.schema import parse_config
from intervene.hooks.apply import apply
from intervene.io.measurements import Measurements
from intervene.io.models import load_model
from intervene.testing import save_tiny, tiny_model, tiny_tokenizer
from intervene.bake.verify import verify


def main() -> int:
    ok = True
    root = Path(tempfile.mkdtemp())
    for arch in ("llama", "gemma3", "qwen2_moe", "deepseek_v3", "gpt_oss", "llama4", "mixtral"):
        model = tiny_model(arch)
        src = save_tiny(model, root / arch)
        tiny_tokenizer().save_pretrained(src)
        cfgm = model.config
        n, h = cfgm.num_hidden_layers, cfgm.hidden_size
        gen = torch.Generator().manual_seed(0)
        tensors = {}
        for layer in range(n):
            tensors[f"harmful_mean.{layer}"] = torch.randn(h, generator=gen)
            tensors[f"harmless_mean.{layer}"] = torch.randn(h, generator=gen)
            tensors[f"direction.{layer}"] = tensors[f"harmful_mean.{layer}"] - tensors[f"harmless_mean.{layer}"]
        meas = Measurements(tensors)
        meas_path = root / f"{arch}.safetensors"
        meas.save(meas_path)
        spec = arch_for_config(cfgm)
        for method in ("project", "norm_preserving"):
            cfg = parse_config({"model": str(src), "measurements": str(meas_path), "method": method,
                                "targets": list(spec.targets), "ablate": [{"layers": f"0:{n}", "measurement": n - 1,
                                                                           "scale": 1.0}]})
            out = root / f"{arch}-{method}-baked"
            bake(cfg, output=out, progress=False)
            for dtype in ("float32", "bfloat16"):
                res = verify(cfg, out, random_tokens=4, dtype=dtype, device_map="cuda", progress=False)
                ok &= res.passed
                print(f"{arch:12s} {method:16s} {dtype:9s} cuda max|baked-live| {res.max_abs_diff:.3g} "
                      f"(tol {res.tolerance:.3g}, effect {res.effect:.3g}) {'PASS' if res.passed else 'FAIL'}", flush=True)
        # live hooks on a cuda model: restored exactly after exit
        m, _ = load_model(str(src), dtype="bfloat16", device_map="cuda")
        ids = torch.randint(0, 100, (2, 7), device="cuda")
        base = m(ids).logits
        with apply(m, cfg, meas):
            hooked = m(ids).logits
        after = m(ids).logits
        same = torch.equal(base, after)
        ok &= same
        print(f"{arch:12s} live bf16 cuda effect {(hooked - base).abs().max().item():.3g} restored exactly: {same}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
