"""The one judge every front member meets, whoever made it: on the eval split, greedy answers to the
harmful prompts (``max_new_tokens``) classed refused / degenerate / complied by intervene's markers and
repetition measure; first-token KL(organism || model) and full-answer KL (teacher-forced over the
organism's greedy harmless answers) on the harmless prompts; and the perplexity capability check of
``intervene eval --capability`` (the shipped held-out text). Built from intervene's metrics
(``intervene.live.metrics``) over ``TransformersBackend``s; the organism's side is computed once."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from intervene.live.capability import heldout_text, perplexity
from intervene.live.generate import Intervention, PromptFormat, TransformersBackend
from intervene.live.metrics import AnswerKL, FirstTokenKL, Refusals

from .records import EvalScore

ANSWER_BATCH = 8  # teacher-forced passes hold [batch, answer, vocab] log-probs: keep batches small


class EvalJudge:
    """Scores any model that shares the organism's tokenizer against the organism (``model``)."""

    def __init__(self, model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str],
                 max_new_tokens: int, batch_size: int, window: int = 256):
        self.tokenizer, self.harmful, self.harmless = tokenizer, list(harmful), list(harmless)
        self.max_new_tokens, self.batch_size, self.window = max_new_tokens, batch_size, window
        self.text = heldout_text()
        self.base = self._backend(model)
        with torch.no_grad():
            self.base_first = self.base.first_token_logprobs(self.harmless)
            self.base_answers = self.base.generate_ids(self.harmless, max_new_tokens)
            self.base_perplexity, _ = perplexity(model, tokenizer, self.text, window)
        self.baseline = self.score(model, compare=False)

    def _backend(self, model: Any, context: Intervention | None = None) -> TransformersBackend:
        return TransformersBackend(model, self.tokenizer, PromptFormat(), self.batch_size, False, context,
                                   answer_batch_size=ANSWER_BATCH)

    @torch.no_grad()
    def score(self, model: Any, context: Intervention | None = None, compare: bool = True) -> EvalScore:
        """``model`` (inside ``context``, e.g. a live intervention, if given) on the eval prompts."""
        new = self._backend(model, context)
        counts = Refusals().compute(new.generate(self.harmful, self.max_new_tokens, desc="judge"))
        if compare:
            first_kl = FirstTokenKL().compute(self.base_first, new.first_token_logprobs(self.harmless))
            answer_kl = AnswerKL().compute(self.base, new, self.harmless, self.base_answers)
            ppl, _ = perplexity(model, self.tokenizer, self.text, self.window, context=context)
        else:
            first_kl, answer_kl, ppl = 0.0, 0.0, self.base_perplexity
        return EvalScore(counts.refusals, counts.degenerate, counts.complied, counts.total, first_kl, answer_kl,
                         ppl, ppl / self.base_perplexity)


__all__ = ["EvalJudge", "ANSWER_BATCH"]
