"""``intervene chat``: a small REPL to talk to a model with an intervention on, off, or both. Each
input line is one greedy user turn; the commands are ``/quit`` (end of input does the same),
``/reset`` (forget the conversation), ``/toggle`` (the intervention on/off; needs a config) and
``/help``. With ``side_by_side`` every turn is answered by the baseline and by the intervened model,
each continuing its own conversation; without it, replies stream token by token to a terminal.
When stdin is not a terminal it runs unattended: no prompt, lines until end of input, exit 0.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

import torch

from ..errors import InputError
from ..io.models import PromptFormat, has_chat_template, model_device
from .evaluate import Intervention

Command = Literal["/quit", "/reset", "/toggle", "/help"]
COMMANDS: tuple[Command, ...] = ("/quit", "/reset", "/toggle", "/help")
Side = Literal["baseline", "intervened", "single"]  # "single": one conversation, intervention toggled
HELP = "commands: /quit  /reset (forget the conversation)  /toggle (intervention on/off)  /help"


@dataclass
class Conversation:
    messages: list[dict[str, str]] = field(default_factory=list)

    def reset(self, system_prompt: str | None) -> None:
        self.messages = [{"role": "system", "content": system_prompt}] if system_prompt else []


@torch.no_grad()
def reply(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int = 256,
          chat_template: bool = True, streamer: Any = None) -> str:
    """One greedy reply to ``messages`` (new text only). Without a chat template the last user
    message is used as raw text."""
    if chat_template:
        if not has_chat_template(tokenizer):
            raise InputError("this model's tokenizer has no chat template; pass --no-chat-template to use raw prompts")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = messages[-1]["content"]
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not chat_template)
    enc = {k: v.to(model_device(model)) for k, v in enc.items()}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                         temperature=None, top_p=None, top_k=None, streamer=streamer)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _streamer(tokenizer: Any, output: TextIO) -> Any:
    from transformers import TextStreamer

    class _To(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            output.write(text + ("\n" if stream_end else ""))
            output.flush()

    return _To(tokenizer, skip_prompt=True, skip_special_tokens=True)


def chat(model: Any, tokenizer: Any, intervention: Intervention | None = None, side_by_side: bool = False,
         input: TextIO | None = None, output: TextIO | None = None, max_new_tokens: int = 256,
         prompt_format: PromptFormat | None = None, stream: bool | None = None) -> int:
    """Run the REPL until ``/quit`` or end of input; returns the number of user turns answered.

    ``intervention`` is a zero-argument callable returning a context manager (e.g.
    ``Prepared.intervention()``); None chats with the model as is."""
    prompt_format = prompt_format or PromptFormat()
    input = input or sys.stdin
    output = output or sys.stdout
    interactive = _isatty(input)
    stream = (_isatty(output) and not side_by_side) if stream is None else stream
    enabled = intervention is not None
    sides: list[Side] = ["baseline", "intervened"] if (side_by_side and intervention is not None) else ["single"]
    conversations = {side: Conversation() for side in sides}
    for c in conversations.values():
        c.reset(prompt_format.system_prompt)

    def say(text: str) -> None:
        output.write(text + "\n")
        output.flush()

    if interactive:
        state = "on" if enabled else ("off" if intervention is not None else "none")
        say(f"intervention: {state}{' (side by side)' if len(sides) == 2 else ''}. {HELP}")
    turns = 0
    while True:
        if interactive:
            output.write("you> ")
            output.flush()
        line = input.readline()
        if not line:
            break
        line = line.rstrip("\n").strip()
        if not line:
            continue
        if line.startswith("/"):
            command = line.split()[0].lower()
            if command == "/quit":
                break
            if command == "/reset":
                for c in conversations.values():
                    c.reset(prompt_format.system_prompt)
                say("[conversation reset]")
            elif command == "/toggle":
                if intervention is None:
                    say("[no config given: nothing to toggle]")
                elif len(sides) == 2:
                    say("[side by side shows both; /toggle has no effect]")
                else:
                    enabled = not enabled
                    say(f"[intervention {'on' if enabled else 'off'}]")
            elif command == "/help":
                say(HELP)
            else:
                say(f"[unknown command {command}; {HELP}]")
            continue
        turns += 1
        for side in sides:
            conv = conversations[side]
            conv.messages.append({"role": "user", "content": line})
            hooked = side == "intervened" or (side == "single" and enabled)
            label = {"baseline": "baseline", "intervened": "intervened",
                     "single": "intervened" if hooked else "model"}[side]
            with (intervention() if hooked else nullcontext()):
                if stream:
                    output.write(f"{label}> ")
                    output.flush()
                    text = reply(model, tokenizer, conv.messages, max_new_tokens, prompt_format.chat_template,
                                 streamer=_streamer(tokenizer, output))
                else:
                    text = reply(model, tokenizer, conv.messages, max_new_tokens, prompt_format.chat_template)
                    say(f"{label}> {text}")
            conv.messages.append({"role": "assistant", "content": text})
    return turns


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


__all__ = ["chat", "reply", "COMMANDS"]
