"""``intervene inspect``: what the architecture table detects, from config and headers only."""

from __future__ import annotations

import argparse

from ..io.inspection import inspect_model
from .common import add_verb

SUMMARY = "show the detected architecture, MoE layers, router and on-disk expert layout"
DESCRIPTION = """Reads config.json and the safetensors headers only (never tensor data), so it answers in seconds for
checkpoints of any size: decoder layers, MoE vs dense layers, experts and top-k, router and
shared-expert modules, per-layer on-disk expert layout (per-expert or fused, with the hidden axis),
dtypes, total size, and quantized tensors (MXFP4, FP8)."""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_verb(sub, "inspect", run, summary=SUMMARY, description=DESCRIPTION)
    p.add_argument("model", help="model directory, .gguf file, or 'smollm2' / 'organism' / 'organism-moe' / 'organism-moe-experts'")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    report = inspect_model(args.model)
    print(report.to_json() if args.json else report.text())
    return 0
