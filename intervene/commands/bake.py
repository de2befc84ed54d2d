"""``intervene bake``: the config's edit, streamed into a new checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from ..bake import bake
from ..bake.lora import bake_lora
from ..errors import InputError
from ..io.files import write_json
from .common import add_reference_options, load_cli_config, reference_flags


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bake", help="write a new checkpoint with the config's edit baked into the weights (streamed, sharded)",
        description="Plans the tensor edits from the config and the architecture table (the same edits `try` applies "
                    "live), then streams every shard: edited tensors are projected in float32 and cast back to their "
                    "dtype, all others copied byte for byte. Memory stays around one tensor. The output is written "
                    "to a hidden temporary sibling directory and renamed at the end; the input is never modified. "
                    "FP8 block-scaled (DeepSeek-V3, GLM-4.5-Air-FP8) and MXFP4 (gpt-oss) checkpoints need --dequantize: "
                    "the edited (or all) quantized tensors are dequantized to bf16 one tensor at a time and "
                    "config.json's quantization_config is updated (or removed). GGUF is refused.")
    p.add_argument("config", help="intervention config (YAML)")
    p.add_argument("-o", "--output", default=None, help="output directory (default: 'output' in the config)")
    p.add_argument("--model", default=None, help="input checkpoint directory (default: 'model' in the config)")
    p.add_argument("--measurements", default=None, help="measurements file (default: 'measurements' in the config)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--dry-run", action="store_true", help="print the plan (keys, shapes, axes, layers) and write nothing")
    p.add_argument("--workers", type=int, default=1, help="shards written in parallel processes (default: 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the edit arithmetic (default: at most 4; 1 per worker with --workers; "
                        "use 1 when the machine's cores are busy)")
    p.add_argument("--verify-hashes", action="store_true",
                   help="check every untouched tensor is byte-identical to the input and write a SHA256SUMS manifest")
    p.add_argument("--lora", action="store_true",
                   help="write a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors, rank 1 per "
                        "projection, exact; fused [E, out, in] experts via PEFT target_parameters) instead of a full "
                        "checkpoint; needs the 'lora' extra (peft). Refused by name: norm_preserving, bias edits, "
                        "[E, in, out] experts, routers that are not nn.Linear")
    p.add_argument("--dequantize", choices=("edited", "all"), default=None,
                   help="FP8/MXFP4 input: dequantize the tensors the edit touches ('edited': the rest stay quantized "
                        "and are listed in quantization_config.modules_to_not_convert) or every quantized tensor "
                        "('all': quantization_config removed) to bf16; a dequantized copy is streamed to a hidden "
                        "sibling of the output first (disk: one more checkpoint), memory stays one tensor")
    p.add_argument("--gguf", nargs="?", const="f16", default=None, metavar="TYPE",
                   help="also convert the bake to OUTPUT/<name>-TYPE.gguf (f32, f16, bf16, q8_0; default f16) with "
                        "llama.cpp's converter and check it, as `intervene export-gguf` does; its refusals (type, "
                        "architecture, converter missing) come before anything is written")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the plan (dry run) or result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_reference_options(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    cfg = load_cli_config(args)
    if args.lora:
        if args.gguf is not None:
            raise InputError("--gguf converts a full checkpoint; it does not apply to --lora adapters")
        return _run_lora(args, cfg)
    result = bake(cfg, output=args.output, overwrite=args.overwrite, dry_run=args.dry_run,
                  workers=args.workers, progress=not args.no_progress, verify_hashes=args.verify_hashes,
                  model=args.model, measurements=args.measurements, threads=args.threads,
                  dequantize=args.dequantize, gguf=args.gguf)
    print(result.summary())
    if args.json:
        data = {"dry_run": result.dry_run, "output": str(result.output) if result.output else None,
                "plan": result.plan.rows(), "bytes_total": result.bytes_total, "bytes_edited": result.bytes_edited,
                "tensors_edited": result.tensors_edited, "seconds": result.seconds,
                "gguf": result.gguf.to_dict() if result.gguf else None}
        write_json(args.json, data)
    if not result.dry_run:
        print(f"next: intervene verify {args.config} {result.output}{reference_flags(args)}")
    return 0


def _run_lora(args: argparse.Namespace, cfg: Any) -> int:
    result = bake_lora(cfg, output=args.output, overwrite=args.overwrite, dry_run=args.dry_run,
                       model=args.model, measurements=args.measurements)
    print(result.summary())
    if args.json:
        write_json(args.json, result.to_dict())
    if not result.dry_run:
        print(f"next: intervene verify {args.config} {result.output}{reference_flags(args)}")
    return 0
