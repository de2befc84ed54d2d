"""Generation and log-probabilities behind one small interface: :class:`GenerationBackend` is what the
metrics (:mod:`intervene.live.metrics`) and :func:`intervene.live.evaluate.evaluate` read from -- greedy
answers (token ids and text), first-response-token log-probabilities, teacher-forced log-probabilities
of given answers, and the log-probability of each token of a text. :class:`TransformersBackend` is the
in-process implementation (a loaded transformers model, batched with left padding, greedy decoding;
``context``, e.g. an intervention, entered around each forward). A serving-engine backend (vLLM, an
OpenAI-compatible server rendering prompts with the chat template and calling ``/v1/completions``)
only needs to implement the protocol; nothing else changes.
"""

from __future__ import annotations

import contextlib
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from ..io.models import PromptFormat, batches, encode, model_device

Intervention = Callable[[], AbstractContextManager]


class GenerationBackend(Protocol):
    """What the metrics need from a model. Token ids are the backend tokenizer's."""

    tokenizer: Any

    def generate_ids(self, prompts: Sequence[str], max_new_tokens: int, desc: str = "generating") -> list[list[int]]:
        """Greedy new-token ids per prompt, cut after the first end token (kept)."""

    def generate(self, prompts: Sequence[str], max_new_tokens: int, desc: str = "generating") -> list[str]:
        """Greedy answers as text (special tokens dropped, stripped)."""

    def first_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        """Log-probabilities of the first response token, [N, V] float32 on the CPU."""

    def answer_logprobs(self, prompts: Sequence[str], answers: Sequence[Sequence[int]]) -> Iterator[torch.Tensor]:
        """Per prompt, in order and lazily: the next-token log-probabilities at each position that
        predicts an answer token (prompt + answer teacher-forced), [len(answer), V] float32, CPU."""

    def token_logprobs(self, token_ids: Sequence[int]) -> torch.Tensor:
        """log p(token t+1 | tokens <= t) for each token after the first of ``token_ids``, [n - 1] float32."""


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="prompt", file=sys.stderr, disable=not enabled, leave=False)


def stop_ids(model: Any) -> set[int]:
    """The tokens ``generate`` stops a row at (the generation config's eos ids): padding only follows them."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return {int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])}


def decode_answers(tokenizer: Any, ids: Sequence[Sequence[int]]) -> list[str]:
    """New-token ids -> text, special tokens dropped, stripped."""
    return [t.strip() for t in tokenizer.batch_decode([list(i) for i in ids], skip_special_tokens=True)]


@torch.no_grad()
def next_token_logprobs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """float32 log-softmax over the vocabulary at the last position, [batch, vocab]. One forward."""
    return tail_logprobs(model, input_ids, attention_mask, 1)[:, -1, :]


@torch.no_grad()
def tail_logprobs(model: Any, ids: torch.Tensor, mask: torch.Tensor | None, keep: int) -> torch.Tensor:
    """float32 log-softmax of the last ``keep`` positions' logits, [batch, keep, vocab], on the CPU."""
    try:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    except TypeError:  # models whose forward has no logits_to_keep
        logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.log_softmax(logits[:, -keep:, :].float(), dim=-1).cpu()


@dataclass
class TransformersBackend:
    """A loaded transformers model, in process: batches of ``batch_size`` prompts, left-padded,
    greedy ``model.generate``; ``context`` (e.g. an intervention) is entered around each forward or
    ``generate`` call; ``answer_batch_size`` batches the teacher-forced passes (default: ``batch_size``)."""

    model: Any
    tokenizer: Any
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    batch_size: int = 16
    progress: bool = True
    context: Intervention | None = None
    answer_batch_size: int | None = None

    def _inside(self) -> AbstractContextManager:
        return self.context() if self.context is not None else contextlib.nullcontext()

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    @torch.no_grad()
    def generate_ids(self, prompts: Sequence[str], max_new_tokens: int, desc: str = "generating") -> list[list[int]]:
        texts = self.prompt_format.render(self.tokenizer, prompts)
        device = model_device(self.model)
        stops = stop_ids(self.model)
        outputs: list[list[int]] = []
        with _progress(len(texts), desc, self.progress) as bar:
            for chunk in batches(texts, self.batch_size):
                enc = encode(self.tokenizer, chunk, device)
                with self._inside():
                    out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                              pad_token_id=self._pad_id(), temperature=None, top_p=None, top_k=None)
                for row in out[:, enc["input_ids"].shape[1]:].tolist():
                    cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
                    outputs.append(row[:cut])
                bar.update(len(chunk))
        return outputs

    def generate(self, prompts: Sequence[str], max_new_tokens: int, desc: str = "generating") -> list[str]:
        return decode_answers(self.tokenizer, self.generate_ids(prompts, max_new_tokens, desc))

    def first_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        texts = self.prompt_format.render(self.tokenizer, prompts)
        device = model_device(self.model)
        rows = []
        with _progress(len(texts), "first-token", self.progress) as bar:
            for chunk in batches(texts, self.batch_size):
                enc = encode(self.tokenizer, chunk, device)
                with self._inside():
                    rows.append(next_token_logprobs(self.model, enc["input_ids"], enc.get("attention_mask")))
                bar.update(len(chunk))
        return torch.cat(rows)

    @torch.no_grad()
    def answer_logprobs(self, prompts: Sequence[str], answers: Sequence[Sequence[int]]) -> Iterator[torch.Tensor]:
        if len(prompts) != len(answers):
            raise ValueError(f"answer log-probs: {len(prompts)} prompts vs {len(answers)} answers")
        texts = self.prompt_format.render(self.tokenizer, prompts)
        device = model_device(self.model)
        size = self.answer_batch_size or self.batch_size
        pad_id = self._pad_id()
        for start in range(0, len(texts), size):
            chunk, ans = texts[start:start + size], answers[start:start + size]
            enc = encode(self.tokenizer, chunk, "cpu")
            rows = [p[m.bool()].tolist() + list(a) for p, m, a in zip(enc["input_ids"], enc["attention_mask"], ans)]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            keep = max(len(a) for a in ans) + 1  # answers are right-aligned: only the last positions matter
            with self._inside():
                lp = tail_logprobs(self.model, ids, mask, keep)
            for row, a in enumerate(ans):
                yield lp[row, keep - len(a) - 1:keep - 1]  # logits at t predict token t + 1

    @torch.no_grad()
    def token_logprobs(self, token_ids: Sequence[int]) -> torch.Tensor:
        chunk = torch.tensor([list(token_ids)], device=model_device(self.model))
        with self._inside():
            logp = torch.log_softmax(self.model(input_ids=chunk).logits.float(), dim=-1)[0, :-1]
        target = chunk[0, 1:].to(logp.device)
        return logp.gather(-1, target[:, None])[:, 0]


__all__ = ["Intervention", "PromptFormat", "GenerationBackend", "TransformersBackend", "decode_answers",
           "next_token_logprobs", "tail_logprobs", "stop_ids"]
