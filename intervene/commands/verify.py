"""``intervene verify``: baked logits == live-hooked logits, within a dtype tolerance."""

from __future__ import annotations

import argparse

from ..bake.verify import save_result, verify
from .common import add_reference_options, add_verb, load_cli_config

SUMMARY = "check a baked checkpoint reproduces the live intervention (max |Δlogit|)"
DESCRIPTION = """Loads the original model with the config applied live and the baked checkpoint (same
dtype), runs both on the same prompts and compares the logits at every non-padding position. Exit
status 1 when max |baked - live| exceeds the tolerance. Default tolerance: float32 1e-4·max(1,
max|logit|/10); bfloat16/float16 8·eps·max(1, max|logit|)."""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_verb(sub, "verify", run, summary=SUMMARY, description=DESCRIPTION)
    p.add_argument("config", help="intervention config (YAML) that was baked")
    p.add_argument("baked", help="baked checkpoint directory, or the adapter directory of `bake --lora` (loaded with PEFT on the original)")
    p.add_argument("--model", default=None, help="original model (default: 'model' in the config)")
    p.add_argument("--measurements", default=None, help="measurements file (default: 'measurements' in the config)")
    p.add_argument("--prompts", default=None,
                   help="prompt set (file or builtin:...; default: 8 built-in harmful + 8 harmless eval prompts)")
    p.add_argument("--limit", type=int, default=None, help="use at most N prompts (per built-in set by default)")
    p.add_argument("--random-tokens", type=int, default=None, metavar="N",
                   help="use N random sequences of 16 token ids instead of prompts (models without a tokenizer)")
    p.add_argument("--tolerance", type=float, default=None, help="max allowed |Δlogit| (default: from the dtype)")
    p.add_argument("--sequential", action="store_true",
                   help="load the two models one after the other (less memory; logits kept on the CPU)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("model loading")
    g.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    g.add_argument("--device-map", default=None, help="transformers device_map, e.g. 'auto' (default: CPU)")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    g.add_argument("--system-prompt", default=None, help="system message added before each prompt")
    g.add_argument("--no-chat-template", action="store_true", help="feed raw prompt text")
    add_reference_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    result = verify(load_cli_config(args), args.baked, model=args.model, measurements=args.measurements, prompts=args.prompts,
                    random_tokens=args.random_tokens, tolerance=args.tolerance, dtype=args.dtype,
                    device_map=args.device_map, batch_size=args.batch_size, system_prompt=args.system_prompt,
                    chat_template=False if args.no_chat_template else None, sequential=args.sequential,
                    limit=args.limit, progress=not args.no_progress)
    print(result.summary())
    if args.json:
        save_result(result, args.json)
    return 0 if result.passed else 1
