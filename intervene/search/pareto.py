"""Pareto maths for the search, pure functions: dominance (every objective minimised), the
non-dominated front, an even spread along a front, and the "best so far" trial the progress bar
shows."""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, TypeVar


class Scored(Protocol):
    """What :func:`best_so_far` reads from a trial (a :class:`~intervene.search.report.TrialRecord`)."""

    proxy: float
    kl: float
    refusals: int | None

    @property
    def refusal_rate(self) -> float | None: ...


ScoredT = TypeVar("ScoredT", bound=Scored)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(items: Sequence[Any], key: Callable[[Any], Sequence[float]]) -> list[Any]:
    """Non-dominated items (ties both kept), in input order."""
    points = [tuple(key(i)) for i in items]
    return [item for item, p in zip(items, points) if not any(dominates(q, p) for q in points)]


def spread(items: Sequence[Any], k: int) -> list[Any]:
    """At most ``k`` items evenly spaced along ``items`` (both ends kept)."""
    if k <= 0:
        return []
    if len(items) <= k:
        return list(items)
    if k == 1:
        return [items[0]]
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]


def best_so_far(records: Sequence[ScoredT], target_rate: float) -> ScoredT | None:
    """Lowest KL among generation-scored trials at or under the target refusal rate; else fewest
    refusals (then lowest KL); else, with no generation at all, lowest proxy."""
    scored = [r for r in records if r.refusals is not None]
    if scored:
        ok = [r for r in scored if (r.refusal_rate or 0.0) <= target_rate]
        if ok:
            return min(ok, key=lambda r: (r.kl, r.refusals))
        return min(scored, key=lambda r: (r.refusals, r.kl))
    return min(records, key=lambda r: (r.proxy, r.kl)) if records else None


__all__ = ["dominates", "pareto_front", "spread", "best_so_far"]
