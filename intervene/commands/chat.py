"""``intervene chat MODEL [--config CFG]``: talk to the model, intervention on/off or side by side."""

from __future__ import annotations

import argparse

from ..errors import InputError
from ..io.models import PromptFormat, load_model
from ..live.chat import chat
from ..live.tryout import prepare
from .common import add_model_argument, add_model_options, add_quantization_options, add_verb, check_at_least

SUMMARY = "interactive chat (greedy) with the intervention on, off, or side by side"
DESCRIPTION = """A REPL: each line is a user turn. Commands: /quit, /reset (forget the conversation), /toggle
(intervention on/off). When stdin is not a terminal it reads lines until end of input and exits
(unattended use, e.g. `intervene chat organism --config c.yaml < questions.txt`)."""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_verb(sub, "chat", run, summary=SUMMARY, description=DESCRIPTION)
    add_model_argument(p)
    p.add_argument("--config", default=None, help="intervention config (YAML) to apply live")
    p.add_argument("--measurements", default=None, help="override the config's 'measurements' file")
    p.add_argument("--side-by-side", action="store_true", help="answer every turn with baseline and intervened model")
    p.add_argument("--max-new-tokens", type=int, default=256, help="greedy tokens per reply (default: 256)")
    add_model_options(p)
    add_quantization_options(p)
    p.set_defaults(dtype=None)
    return p


def run(args: argparse.Namespace) -> int:
    check_at_least(args.max_new_tokens, 1, "--max-new-tokens")
    if args.config:
        p = prepare(args.config, model_spec=args.model, measurements=args.measurements, dtype=args.dtype,
                    device_map=args.device_map, quantization=args.quantization)
        model, tokenizer, intervention = p.model, p.tokenizer, p.intervention()
        system_prompt = args.system_prompt if args.system_prompt is not None else p.system_prompt
        chat_template = p.chat_template and not args.no_chat_template
    else:
        if not args.model:
            raise InputError("give MODEL (or --config with a 'model')")
        if args.side_by_side:
            raise InputError("--side-by-side needs --config (there is nothing to compare without an intervention)")
        model, tokenizer = load_model(args.model, dtype=args.dtype or "auto", device_map=args.device_map,
                                      quantization=args.quantization)
        intervention, system_prompt, chat_template = None, args.system_prompt, not args.no_chat_template
    chat(model, tokenizer, intervention=intervention, side_by_side=args.side_by_side,
         max_new_tokens=args.max_new_tokens, prompt_format=PromptFormat(system_prompt, chat_template))
    return 0
