"""Logits compared on the same prompt batches: the batches (prompts through the chat template, or random
ids), one forward's logits, and max |Δlogit| / max |logit| over non-padding positions. ``verify`` (baked ==
live) and the GGUF export's check share them."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Sequence

import torch

from ..errors import InputError
from ..io.models import PromptFormat, batches, encode, has_chat_template, model_device
from ..io.prompts import load_prompts

DEFAULT_PROMPTS = ("builtin:harmful:eval", "builtin:harmless:eval")
DEFAULT_PER_SET = 8
RANDOM_SEQ_LEN = 16


def comparison_batches(model: Any, tokenizer: Any, prompts: Sequence[str] | str | None, random_tokens: int | None,
                       limit: int | None, prompt_format: PromptFormat, batch_size: int
                       ) -> tuple[list[dict[str, torch.Tensor]], str]:
    """Batches on ``model``'s device, and a description of them: ``random_tokens`` sequences of random ids (also
    when there is no tokenizer), else the prompts (default: the first ``limit`` of each eval split)."""
    device = model_device(model)
    if random_tokens is None and tokenizer is None:
        random_tokens = DEFAULT_PER_SET
        note = f"{random_tokens} random sequences of {RANDOM_SEQ_LEN} ids (no tokenizer found)"
    else:
        note = ""
    if random_tokens is not None:
        if random_tokens < 1:
            raise InputError(f"--random-tokens must be >= 1, got {random_tokens}")
        gen = torch.Generator().manual_seed(0)
        vocab = int(model.get_input_embeddings().weight.shape[0])
        ids = torch.randint(0, vocab, (random_tokens, RANDOM_SEQ_LEN), generator=gen)
        out = [{"input_ids": chunk.to(device), "attention_mask": torch.ones_like(chunk).to(device)}
               for chunk in ids.split(batch_size)]
        return out, note or f"{random_tokens} random sequences of {RANDOM_SEQ_LEN} ids"
    if prompts is None:
        n = limit or DEFAULT_PER_SET
        texts = [p for spec in DEFAULT_PROMPTS for p in load_prompts(spec, limit=n)]
        what = f"{len(texts)} prompts: first {n} of {' and '.join(DEFAULT_PROMPTS)}"
    elif isinstance(prompts, str):
        texts = load_prompts(prompts, limit=limit)
        what = f"{len(texts)} prompts from {prompts}"
    else:
        texts = list(prompts)[:limit] if limit else list(prompts)
        what = f"{len(texts)} prompts"
        if not texts:
            raise InputError("no prompts to verify with")
    use_template = prompt_format.chat_template and has_chat_template(tokenizer)
    formatted = replace(prompt_format, chat_template=use_template).render(tokenizer, texts)
    out = [dict(encode(tokenizer, list(chunk), device)) for chunk in batches(formatted, batch_size)]
    for b in out:
        b.setdefault("attention_mask", torch.ones_like(b["input_ids"]))
    return out, what + ("" if use_template else ", raw text (no chat template)")


@torch.no_grad()
def logits_of(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 logits on the CPU, [B, T, V]."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits.float().cpu()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    """max |a - b| over non-padding positions; NaN anywhere counts as infinite (never a pass)."""
    mask = batch["attention_mask"].cpu().bool()
    if not mask.any():
        return 0.0
    d = (a - b).abs()[mask]
    return math.inf if bool(torch.isnan(d).any()) else float(d.max())


def max_abs(a: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    """max |a| over non-padding positions."""
    mask = batch["attention_mask"].cpu().bool()
    return float(a.abs()[mask].max()) if mask.any() else 0.0
