"""``intervene <verb>``: parses arguments and prints. Each verb lives in ``intervene/commands/<verb>.py``
with ``register(subparsers)`` (returns its parser, sets ``func``) and calls one library function."""

from __future__ import annotations

import argparse
import importlib
import sys

from .version import __version__
from .errors import InterveneError

# (verb, module): order is the order --help lists them, which follows the data flow
VERBS = (
    ("inspect", "intervene.commands.inspect"),
    ("measure", "intervene.commands.measure"),
    ("analyze", "intervene.commands.analyze"),
    ("organism", "intervene.commands.organism"),
    ("eval", "intervene.commands.eval"),
    ("try", "intervene.commands.try_"),
    ("route", "intervene.commands.route"),
    ("chat", "intervene.commands.chat"),
    ("import-config", "intervene.commands.import_config"),
    ("bake", "intervene.commands.bake"),
    ("verify", "intervene.commands.verify"),
    ("export-gguf", "intervene.commands.export_gguf"),
    ("search", "intervene.commands.search"),
    ("demo", "intervene.commands.demo"),
)

DESCRIPTION = """\
Find, try live, and bake directional interventions (e.g. refusal-direction ablation)
in dense and Mixture-of-Experts transformer language models.

Typical flow:
  intervene inspect MODEL                                  what was detected (layers, experts, router)
  intervene measure MODEL -o m.safetensors                 harmful vs harmless residual means
  intervene analyze m.safetensors --config-out cfg.yaml    which layers carry the direction
  intervene try cfg.yaml                                   live hooks: refusals, KL, routing, samples
  intervene bake cfg.yaml --output DIR                     the same edit, streamed into a checkpoint
  intervene verify cfg.yaml DIR                            baked logits == live-hooked logits
  intervene export-gguf DIR -o model.gguf                  GGUF for llama.cpp / Ollama, checked
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="intervene", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"intervene {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, module_path in VERBS:
        try:
            module = importlib.import_module(module_path)
        except ModuleNotFoundError as e:
            if e.name == module_path:  # verb not shipped in this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except InterveneError as e:
        print(f"intervene {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied...: the environment, not a bug; one line naming the file
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"intervene {args.verb}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"intervene {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
