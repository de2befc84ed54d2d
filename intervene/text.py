"""Formatting shared by error messages and reports (bottom layer: imports nothing of intervene)."""

from __future__ import annotations

from typing import Sequence


def format_ranges(xs: Sequence[int], empty: str = "none", dash: str = "-", comma: str = ",") -> str:
    """Sorted integers as runs: ``[0, 1, 2, 5]`` -> ``"0-2,5"`` (``dash``/``comma`` choose the
    separators, ``empty`` what an empty list reads as)."""
    xs = list(xs)
    if not xs:
        return empty
    parts, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(str(start) if start == prev else f"{start}{dash}{prev}")
        if x is not None:
            start = prev = x
    return comma.join(parts)


__all__ = ["format_ranges"]
