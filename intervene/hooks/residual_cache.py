"""The residual entering every decoder layer, cached from the UNEDITED model, so that a forward for
a model edited at layers >= k only runs layers k..L-1: layers 0..k-1 are swapped for passthroughs
and a forward pre-hook feeds the cached residual into layer k (a cost of (L - k) / L of a full
forward). The search uses it to score trials; :meth:`ResidualCache.self_check` says whether a
model's layers allow it."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch

from ..arch import decoder_layers


class _Passthrough(torch.nn.Module):
    """Stands in for a decoder layer that would recompute the cached baseline: returns its input."""

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states if hidden_states is not None else kwargs["hidden_states"]


def _last_logits(model: Any, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"), logits_to_keep=1).logits


class ResidualCache:
    """Per batch of ``encoded``: the residual entering each decoder layer (``entries``) and the
    unedited model's last-position log-softmax (``logprobs``, on the CPU)."""

    def __init__(self, model: Any, encoded: Sequence[dict[str, torch.Tensor]]):
        layers = decoder_layers(model)
        self.entries: list[list[torch.Tensor]] = []
        self.logprobs: list[torch.Tensor] = []
        for enc in encoded:
            seen: list[torch.Tensor | None] = [None] * len(layers)

            def keep(index: int) -> Callable:
                def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
                    seen[index] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
                return pre_hook

            handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
            try:
                with torch.no_grad():
                    logits = _last_logits(model, enc)
            finally:
                for h in handles:
                    h.remove()
            self.logprobs.append(torch.log_softmax(logits[:, -1, :].float(), dim=-1).cpu())
            self.entries.append([t for t in seen])  # type: ignore[misc]

    @contextlib.contextmanager
    def starting_at(self, model: Any, batch: int, start: int) -> Iterator[None]:
        """Inside the block, a forward on batch ``batch`` skips layers ``0..start-1``."""
        layers = decoder_layers(model)
        cached = self.entries[batch][start]
        originals = [layers[i] for i in range(start)]

        def feed(module: Any, args: tuple, kwargs: dict) -> Any:
            if args:
                return (cached,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": cached}

        handle = layers[start].register_forward_pre_hook(feed, with_kwargs=True)
        try:
            for i in range(start):
                layers[i] = _Passthrough()
            yield
        finally:
            for i, original in enumerate(originals):
                layers[i] = original
            handle.remove()

    def self_check(self, model: Any, enc: dict[str, torch.Tensor]) -> bool:
        """A forward started half-way must give the full forward's logits (else: no skipping)."""
        start = len(decoder_layers(model)) // 2
        if start == 0:
            return False
        try:
            with torch.no_grad():
                full = _last_logits(model, enc)
                with self.starting_at(model, 0, start):
                    skipped = _last_logits(model, enc)
        except Exception:  # a model whose layers do not pass one tensor along
            return False
        return bool(torch.allclose(full, skipped, atol=1e-5, rtol=1e-5))


__all__ = ["ResidualCache"]
