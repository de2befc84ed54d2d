#!/usr/bin/env python
"""Bake throughput and memory on a synthetic multi-shard MoE checkpoint (>= 1 GB).

    python benchmarks/bake.py                      # ~1.3 GB Qwen2-MoE-shaped bf16 checkpoint in a temp dir
    python benchmarks/bake.py --layers 20 --workers 1,2 --keep /tmp/ckpt

Builds a Qwen2-MoE checkpoint in the per-expert on-disk layout (the layout of published
Qwen/DeepSeek/GLM MoE checkpoints) by writing random bf16 tensors straight into safetensors
shards — no model is instantiated, so building needs about one shard of memory. Then, in one
run, prints:

* plain copy throughput: ``shutil.copyfile`` of every shard (the floor a streamed bake can reach);
* bake throughput (``intervene.bake`` in a fresh subprocess, timed around ``bake()`` itself after
  torch/transformers are imported — that start-up is a constant, reported separately),
  for the issue's edit — attention + routed experts on a window of layers — and for an edit of
  every residual writer in every layer; the fraction of bytes edited; bake/copy ratio;
* peak RSS of the bake process (``VmHWM``) next to the largest tensor; targets:
  ratio >= 0.8 and peak RSS <= 2 x largest tensor + 0.5 GB;
* senbonzakura's ``stream-bake`` on the same checkpoint, when a senbonzakura installation is
  found (``--senbonzakura BIN``, default ``/work/venv-senbonzakura/bin/senbonzakura`` or the one
  on PATH): it edits every residual writer of every layer (its only mode), so it is compared
  with intervene's all-writers edit: same direction, plain projection (``--no-restore-norms``).
  Both timed as whole processes, imports included.

Numbers depend on the disk and on whatever else uses it: ``os.sync()`` runs before every timed
step so that write-back of an earlier step is not billed to the next, the source stays in the
page cache for every reader alike, and each step is timed ``--repeat`` times (best reported;
memory: the worst run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB


# ---- building the checkpoint ------------------------------------------------------------------

def model_config(args: argparse.Namespace) -> dict:
    return dict(
        architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", vocab_size=args.vocab,
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
        intermediate_size=4 * args.hidden, moe_intermediate_size=args.moe_intermediate,
        shared_expert_intermediate_size=2 * args.hidden, num_experts=args.experts, num_experts_per_tok=4,
        decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False, max_position_embeddings=4096,
        rms_norm_eps=1e-6, torch_dtype="bfloat16",
    )


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every key of a Qwen2-MoE checkpoint in the per-expert layout, in save order."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    i_moe, i_sh = cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.q_proj.bias", (h,)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.k_proj.bias", (kv,)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.v_proj.bias", (kv,)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "mlp.gate.weight", (cfg["num_experts"], h))]
        for e in range(cfg["num_experts"]):
            out += [(p + f"mlp.experts.{e}.gate_proj.weight", (i_moe, h)),
                    (p + f"mlp.experts.{e}.up_proj.weight", (i_moe, h)),
                    (p + f"mlp.experts.{e}.down_proj.weight", (h, i_moe))]
        out += [(p + "mlp.shared_expert.gate_proj.weight", (i_sh, h)),
                (p + "mlp.shared_expert.up_proj.weight", (i_sh, h)),
                (p + "mlp.shared_expert.down_proj.weight", (h, i_sh)),
                (p + "mlp.shared_expert_gate.weight", (1, h))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def build_checkpoint(path: Path, args: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    cfg = model_config(args)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    shapes = tensor_shapes(cfg)
    gen = torch.Generator().manual_seed(0)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in shapes:
        nbytes = 2 * _numel(shape)
        if groups[-1] and size + nbytes > args.shard_mb * MiB:
            groups.append([])
            size = 0
        groups[-1].append((key, shape))
        size += nbytes
    weight_map = {}
    for n, group in enumerate(groups, start=1):
        name = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for key, shape in group:
            t = torch.randn(shape, generator=gen)
            if key.endswith("norm.weight"):
                t = 1.0 + 0.1 * t
            else:
                t *= 0.02
            tensors[key] = t.to(torch.bfloat16)
            weight_map[key] = name
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        del tensors
    total = sum(2 * _numel(s) for _, s in shapes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    largest = max(shapes, key=lambda ks: _numel(ks[1]))
    return {"shards": len(groups), "tensors": len(shapes), "bytes": sum(p.stat().st_size for p in shard_files(path)),
            "largest_key": largest[0], "largest_bytes": 2 * _numel(largest[1])}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def shard_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def write_inputs(work: Path, src: Path, args: argparse.Namespace) -> dict[str, Path]:
    import torch
    import yaml

    from intervene.io.measurements import Measurements

    gen = torch.Generator().manual_seed(1)
    direction = torch.randn(args.hidden, generator=gen)
    meas = work / "measurements.safetensors"
    Measurements({f"direction.{i}": direction.clone() for i in range(args.layers)}).save(meas)
    lo, hi = args.window
    window = {"model": str(src), "measurements": str(meas), "targets": ["attention", "experts"],
              "ablate": [{"layers": f"{lo}:{hi}", "measurement": lo, "scale": 1.0}]}
    every = {"model": str(src), "measurements": str(meas), "targets": ["attention", "experts", "shared_experts"],
             "ablate": [{"layers": f"0:{args.layers}", "measurement": lo, "scale": 1.0}]}
    paths = {"window": work / "window.yaml", "all_writers": work / "all_writers.yaml"}
    paths["window"].write_text(yaml.safe_dump(window))
    paths["all_writers"].write_text(yaml.safe_dump(every))
    # senbonzakura's direction set: [positions = layers + 1, K = 1, hidden]; layer i reads position i + 1
    from safetensors.torch import save_file

    dirs = torch.zeros(args.layers + 1, 1, args.hidden)
    dirs[1:, 0] = direction / direction.norm()  # every layer: the same edit as the all-writers config
    paths["senbonzakura"] = work / "directions.safetensors"
    save_file({"dirs_per_position": dirs}, str(paths["senbonzakura"]), metadata={"mode": "per_layer", "model": str(src)})
    return paths


# ---- timed steps ---------------------------------------------------------------------------------

def plain_copy(src: Path, dst: Path) -> float:
    dst.mkdir()
    os.sync()
    start = time.perf_counter()
    for shard in shard_files(src):
        shutil.copyfile(shard, dst / shard.name)
    return time.perf_counter() - start


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd``; return exit code, wall seconds, output and memory peaks.

    Peaks are read from ``/proc`` while it runs: ``VmHWM`` of the process (its own high-water
    mark, reset at exec; ``ru_maxrss`` is not usable, Linux carries the parent's RSS at fork
    into it) and the largest sampled sum of ``VmRSS`` over the process and its descendants
    (worker processes)."""
    os.sync()
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        hwm = tree = 0
        while proc.poll() is None:
            status = _status(proc.pid)
            hwm = max(hwm, status.get("VmHWM", 0))
            tree = max(tree, status.get("VmRSS", 0) + sum(_status(p).get("VmRSS", 0) for p in _descendants(proc.pid)))
            time.sleep(0.02)
        wall = time.perf_counter() - start
        log.seek(0)
        out = log.read().decode(errors="replace")
    return {"rc": proc.returncode, "wall": wall, "hwm": hwm, "tree": max(tree, hwm), "output": out}


def _status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS of /proc/PID/status in bytes (empty when the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            name, value = line.split(":", 1)
            out[name] = int(value.split()[0]) * 1024
    return out


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(k) for k in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def bake_in_subprocess(config: Path, out: Path, workers: int, threads: int) -> dict:
    info = run_measured([sys.executable, __file__, "--child", str(config), str(out), str(workers), str(threads)])
    if info["rc"] != 0:
        raise SystemExit(f"bake subprocess failed ({info['rc']}):\n{info['output']}")
    result = json.loads(info["output"].strip().splitlines()[-1])
    result.update(process_wall=info["wall"], tree_peak=info["tree"], hwm=max(result["hwm_self"], info["hwm"]))
    return result


def child(config: str, out: str, workers: int, threads: int) -> None:
    """Runs in the measured subprocess. Imports (torch, transformers and what reading a config
    pulls in: a constant 2-10 s that is not streaming work) happen first and are reported apart;
    then bake() is timed, planning included, and its streaming part (``result.seconds``)."""
    start = time.perf_counter()
    from intervene.bake import bake
    from intervene.bake.plan import read_model_config
    from intervene.config.schema import load_config
    from intervene.io.models import versions

    versions()
    read_model_config(Path(load_config(config).model))
    startup = time.perf_counter() - start
    baseline = _status(os.getpid()).get("VmRSS", 0)
    start = time.perf_counter()
    result = bake(config, output=out, workers=workers, progress=False, threads=threads or None)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "stream_seconds": result.seconds, "startup": startup,
                      "bytes_total": result.bytes_total, "bytes_edited": result.bytes_edited,
                      "tensors_edited": result.tensors_edited, "rss_after_imports": baseline,
                      "hwm_self": _status(os.getpid()).get("VmHWM", 0)}))


def find_senbonzakura(given: str | None) -> str | None:
    for candidate in (given, os.environ.get("INTERVENE_SENBONZAKURA"), "/work/venv-senbonzakura/bin/senbonzakura",
                      shutil.which("senbonzakura")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def senbonzakura_bake(binary: str, src: Path, directions: Path, out: Path) -> dict:
    r = run_measured([binary, "stream-bake", "--model", str(src), "--directions", str(directions), "--out", str(out),
                      "--no-restore-norms"])
    r["summary"] = next((line.strip() for line in r["output"].splitlines() if "baked" in line and "tensor" in line), "")
    return r


# ---- report ------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed at the end)")
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--moe-intermediate", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-mb", type=int, default=256, help="target shard size in MiB (default 256)")
    parser.add_argument("--window", type=int, nargs=2, default=None, metavar=("START", "END"),
                        help="layers edited by the window config (default: the middle 40%%)")
    parser.add_argument("--workers", default="1", help="comma-separated worker counts to time (default: 1)")
    parser.add_argument("--senbonzakura", default=None, help="senbonzakura executable (default: auto-detect)")
    parser.add_argument("--no-senbonzakura", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="time each step N times, report the best (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for the edit (bake --threads; default 0: bake's default, at most 4)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))
        return 0
    if args.window is None:
        args.window = (int(args.layers * 0.3), int(args.layers * 0.7))
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="intervene-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return run(work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, args: argparse.Namespace) -> int:
    src = work / "checkpoint"
    t0 = time.perf_counter()
    info = build_checkpoint(src, args)
    print(f"checkpoint: {info['bytes'] / GiB:.2f} GiB in {info['shards']} shards, {info['tensors']} tensors, "
          f"qwen2_moe per-expert layout, bf16 (built in {time.perf_counter() - t0:.0f}s) at {src}")
    print(f"largest tensor: {info['largest_key']} {info['largest_bytes'] / MiB:.1f} MiB; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; torch threads: {args.threads or 'bake default (<= 4)'}")
    inputs = write_inputs(work, src, args)

    copies = []
    for _ in range(args.repeat):
        copies.append(plain_copy(src, work / "copy"))
        shutil.rmtree(work / "copy")
    copy_s = min(copies)
    copy_rate = info["bytes"] / copy_s
    print(f"plain copy (shutil.copyfile of the shards): {copy_s:.2f}s = {copy_rate / MiB:.0f} MiB/s "
          f"(best of {args.repeat}: {', '.join(f'{c:.2f}' for c in copies)}s)")

    rss_limit = 2 * info["largest_bytes"] + 0.5 * GiB
    rows = []
    lo, hi = args.window
    for name in ("window", "all_writers"):
        for workers in [int(w) for w in args.workers.split(",")]:
            out = work / f"baked-{name}-{workers}"
            runs = []
            for _ in range(args.repeat):
                runs.append(bake_in_subprocess(inputs[name], out, workers, args.threads))
                shutil.rmtree(out)
            r = min(runs, key=lambda x: x["stream_seconds"])  # best time; memory: the worst run
            r = {**r, "hwm": max(x["hwm"] for x in runs), "tree_peak": max(x["tree_peak"] for x in runs)}
            rate = r["bytes_total"] / r["stream_seconds"]
            rows.append((name, workers, r, rate))
            what = (f"attention+experts, layers {lo}-{hi - 1}" if name == "window"
                    else f"attention+experts+shared experts, all {args.layers} layers")
            print(f"bake [{what}] workers={workers}: {r['tensors_edited']} tensors = "
                  f"{100 * r['bytes_edited'] / r['bytes_total']:.1f}% of bytes edited; "
                  f"stream {r['stream_seconds']:.2f}s = {rate / MiB:.0f} MiB/s (ratio to copy {rate / copy_rate:.2f}); "
                  f"bake() incl. planning {r['seconds']:.2f}s (ratio {r['bytes_total'] / r['seconds'] / copy_rate:.2f}); "
                  f"peak RSS {r['hwm'] / MiB:.0f} MiB (after imports {r['rss_after_imports'] / MiB:.0f} MiB, "
                  f"bake adds {(r['hwm'] - r['rss_after_imports']) / MiB:.0f} MiB)"
                  + (f", all processes {r['tree_peak'] / MiB:.0f} MiB" if workers > 1 else "")
                  + f"; imports before {r['startup']:.1f}s, process wall {r['process_wall']:.1f}s")

    name, workers, r, rate = rows[0]
    ratio_ok = rate / copy_rate >= 0.8
    rss_ok = r["hwm"] <= rss_limit
    print(f"targets (window edit, workers={workers}): ratio {rate / copy_rate:.2f} >= 0.8: "
          f"{'met' if ratio_ok else 'NOT met'}; peak RSS {r['hwm'] / MiB:.0f} MiB <= 2 x {info['largest_bytes'] / MiB:.1f} "
          f"MiB + 512 MiB = {rss_limit / MiB:.0f} MiB: {'met' if rss_ok else 'NOT met'}")

    binary = None if args.no_senbonzakura else find_senbonzakura(args.senbonzakura)
    if binary is None:
        print("senbonzakura: not found (pass --senbonzakura BIN, or install it in /work/venv-senbonzakura); skipped")
    else:
        s = senbonzakura_bake(binary, src, inputs["senbonzakura"], work / "senbonzakura-out")
        if s["rc"] != 0:
            print(f"senbonzakura stream-bake failed (exit {s['rc']}):\n{s['output'][-2000:]}")
        else:
            ours = next((row[2] for row in rows if row[0] == "all_writers" and row[1] == 1), None)
            print(f"senbonzakura stream-bake ({binary}; every residual writer of every layer, plain projection; "
                  f"{s['summary']}): whole process {s['wall']:.1f}s, peak RSS {s['hwm'] / MiB:.0f} MiB"
                  + (f" | intervene, same edit, whole process {ours['process_wall']:.1f}s, peak RSS "
                     f"{ours['hwm'] / MiB:.0f} MiB" if ours else ""))
        shutil.rmtree(work / "senbonzakura-out", ignore_errors=True)
    return 0 if (ratio_ok and rss_ok) else 1


if __name__ == "__main__":
    sys.exit(main())
