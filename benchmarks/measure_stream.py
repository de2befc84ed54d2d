#!/usr/bin/env python
"""Peak memory and time of ``intervene measure`` vs ``measure --stream-layers`` on a synthetic
16-layer bf16 MoE checkpoint (~1.5 GB), and the projection to GLM-4.5-Air's shapes.

    python benchmarks/measure_stream.py                    # builds the checkpoint in a temp dir
    python benchmarks/measure_stream.py --dir /tmp/ms --keep

The checkpoint is the Qwen2-MoE per-expert layout of ``benchmarks/bake.py`` (random bf16 tensors
written straight into shards, no model instantiated), with a character-level tokenizer
(``intervene.testing.tiny_tokenizer``). Each run is ``intervene measure`` in a fresh process on
the same prompts, with peak RSS (``VmHWM``) sampled from ``/proc`` (``benchmarks/bake.py``'s
``run_measured``) and wall time of the whole process, imports included:

* ``memory-auto``: in memory, default dtype (``auto``: bf16 here) — target: peak <= 1.3 x checkpoint + 0.6 GB;
* ``memory-f32``, ``stream-f32``: in memory and streamed at ``--dtype float32`` — target: streamed <= 0.5 x
  in-memory;
* ``stream-auto``: streamed, default dtype;
* ``hf-auto``, ``hf-f32``: in memory through transformers' ``from_pretrained`` (``--device-map cpu`` turns
  intervene's layer-wise load off): every shard stays memory-mapped while it loads, and the pages read
  count in the resident memory next to the loaded weights.

Then the streamed peak is split into what does not depend on depth (imports, embeddings, hidden
states: the streamed peak minus ``k`` layers) and ``k`` times one decoder layer, ``k`` measured
here, and projected to GLM-4.5-Air (46 layers, 128 experts of 1408, hidden 4096, vocab 151552).
The measured measurements files of the streamed and in-memory runs are compared (max relative
difference over every key).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB
HERE = Path(__file__).resolve().parent


def _bake_bench():
    """``benchmarks/bake.py`` (the checkpoint builder and the /proc sampler), loaded by path."""
    spec = importlib.util.spec_from_file_location("bake_benchmark", HERE / "bake.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def layer_bytes(hidden: int, heads: int, kv_heads: int, head_dim: int, experts: int, moe_inter: int,
                shared_inter: int, bytes_per: int = 2) -> int:
    """One MoE decoder layer: attention (q, k, v, o), router, routed and shared experts, two norms."""
    attn = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    return bytes_per * (attn + experts * hidden + 3 * experts * hidden * moe_inter + 3 * hidden * shared_inter
                        + 2 * hidden)


GLM_AIR = dict(hidden=4096, heads=96, kv_heads=8, head_dim=128, experts=128, moe_inter=1408, shared_inter=1408,
               layers=46, vocab=151552)


def compare(a: Path, b: Path) -> float:
    from intervene.io.measurements import load_measurements

    x, y = load_measurements(a), load_measurements(b)
    assert set(x.tensors) == set(y.tensors), set(x.tensors) ^ set(y.tensors)
    return max(((x.tensors[k].double() - y.tensors[k].double()).norm()
                / x.tensors[k].double().norm().clamp_min(1e-30)).item() for k in x.tensors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed at the end)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--moe-intermediate", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--shard-mb", type=int, default=256)
    parser.add_argument("--limit", type=int, default=32, help="prompts per set (default 32)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--runs", default="memory-auto,memory-f32,stream-f32,stream-auto,hf-auto,hf-f32",
                        help="which runs, comma-separated (default: all six)")
    args = parser.parse_args()

    bench = _bake_bench()
    work = Path(args.dir or tempfile.mkdtemp(prefix="measure-stream-"))
    src = work / "model"
    try:
        if not (src / "config.json").exists():
            info = bench.build_checkpoint(src, argparse.Namespace(**vars(args)))
            from intervene.testing import tiny_tokenizer

            tiny_tokenizer().save_pretrained(str(src))
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        cfg = json.loads((src / "config.json").read_text())
        one_layer = layer_bytes(args.hidden, cfg["num_attention_heads"], cfg["num_key_value_heads"],
                                args.hidden // cfg["num_attention_heads"], args.experts, args.moe_intermediate,
                                cfg["shared_expert_intermediate_size"])
        print(f"checkpoint: {args.layers} layers, {size / GiB:.2f} GiB bf16, one layer {one_layer / MiB:.0f} MiB, "
              f"embeddings {2 * args.vocab * args.hidden / MiB:.0f} MiB each")
        base = [sys.executable, "-m", "intervene.cli", "measure", str(src), "--limit", str(args.limit),
                "--batch-size", str(args.batch_size), "--no-progress", "--no-chat-template"]
        runs = {"memory-auto": [], "memory-f32": ["--dtype", "float32"],
                "stream-f32": ["--dtype", "float32", "--stream-layers"], "stream-auto": ["--stream-layers"],
                # transformers' from_pretrained (a device map turns intervene's layer-wise load off)
                "hf-auto": ["--device-map", "cpu"], "hf-f32": ["--dtype", "float32", "--device-map", "cpu"]}
        wanted = args.runs.split(",")
        results = {}
        imports = bench.run_measured([sys.executable, "-c", "import torch, transformers, intervene.cli, "
                                      "intervene.measure.stream, transformers.models.qwen2_moe.modeling_qwen2_moe"])
        print(f"imports alone: peak RSS {imports['hwm'] / MiB:.0f} MiB, {imports['wall']:.1f}s")
        for name in wanted:
            extra = runs[name]
            out = work / f"{name}.safetensors"
            r = bench.run_measured(base + extra + ["-o", str(out)])
            if r["rc"] != 0:
                raise SystemExit(f"{name} failed ({r['rc']}):\n{r['output']}")
            results[name] = dict(peak=r["hwm"], wall=r["wall"], out=out)
            print(f"{name:12s} {' '.join(extra) or '(defaults)':40s} peak RSS {r['hwm'] / MiB:7.0f} MiB ({r['hwm'] / size:.2f}x checkpoint), "
                  f"{r['wall']:6.1f}s")
        if not {"memory-auto", "memory-f32", "stream-f32", "stream-auto"} <= set(results):
            return 0
        auto, f32 = results["memory-auto"], results["memory-f32"]
        s32, sauto = results["stream-f32"], results["stream-auto"]
        limit_auto = 1.3 * size + 0.6 * GiB
        print(f"\ndefault-dtype in-memory peak {auto['peak'] / MiB:.0f} MiB <= 1.3 x {size / MiB:.0f} + 614 = "
              f"{limit_auto / MiB:.0f} MiB: {'met' if auto['peak'] <= limit_auto else 'NOT met'}")
        print(f"streamed float32 peak {s32['peak'] / MiB:.0f} MiB = {s32['peak'] / f32['peak']:.2f} x in-memory "
              f"float32 {f32['peak'] / MiB:.0f} MiB (target <= 0.5): {'met' if s32['peak'] <= 0.5 * f32['peak'] else 'NOT met'}")
        print(f"streamed == in-memory: max relative difference float32 {compare(f32['out'], s32['out']):.2e}, "
              f"bf16 {compare(auto['out'], sauto['out']):.2e}")
        # projection: streamed peak = fixed (imports, embeddings, activations) + k layers
        emb = 2 * args.vocab * args.hidden
        k = (sauto["peak"] - imports["hwm"] - emb) / one_layer
        air_layer = layer_bytes(**{n: GLM_AIR[n] for n in ("hidden", "heads", "kv_heads", "head_dim", "experts")},
                                moe_inter=GLM_AIR["moe_inter"], shared_inter=GLM_AIR["shared_inter"])
        air_emb = 2 * GLM_AIR["vocab"] * GLM_AIR["hidden"]
        air_total = GLM_AIR["layers"] * air_layer + 2 * air_emb
        proj = imports["hwm"] + air_emb + max(k, 1.0) * air_layer
        print(f"\nprojection to GLM-4.5-Air (bf16, ~{air_total / GiB:.0f} GiB): streamed peak ~ imports "
              f"{imports['hwm'] / GiB:.1f} + embeddings {air_emb / GiB:.2f} + {max(k, 1.0):.2f} x one MoE layer "
              f"{air_layer / GiB:.2f} = {proj / GiB:.1f} GiB (+ hidden states: prompts x tokens x 4096 x 2 bytes); "
              f"in memory at bf16 it needs >= {air_total / GiB:.0f} GiB")
        print("time: streamed reads every layer once for all prompts; in-memory reads the model once; "
              f"streamed/in-memory wall (bf16) {sauto['wall'] / auto['wall']:.2f}")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
