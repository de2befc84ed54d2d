"""Argument groups shared by several verbs, so flags mean the same everywhere."""

from __future__ import annotations

import argparse


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model loading")
    g.add_argument("--dtype", default="float32",
                   help="weights dtype: float32, bfloat16, float16 or auto (default: float32)")
    g.add_argument("--device-map", default=None,
                   help="transformers device_map, e.g. 'auto' or 'cuda:0' (default: CPU)")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default: 16)")
    g.add_argument("--system-prompt", default=None, help="system message added before each prompt")
    g.add_argument("--no-chat-template", action="store_true",
                   help="feed raw prompt text (for models without a chat template)")


def add_prompt_options(p: argparse.ArgumentParser, split: str) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument("--harmful", default=f"builtin:harmful:{split}",
                   help=f"harmful prompts: .txt (one per line), .json/.jsonl, .csv/.parquet, hf:NAME[:split], "
                        f"or builtin:harmful:train|eval (default: builtin:harmful:{split})")
    g.add_argument("--harmless", default=f"builtin:harmless:{split}",
                   help=f"harmless prompts, same forms (default: builtin:harmless:{split})")
    g.add_argument("--field", default=None, help="field/column holding the prompt in .json/.jsonl/.csv/.parquet/hf: sets")
    g.add_argument("--limit", type=int, default=None, help="use at most N prompts from each set")
