"""Interop with TransformerLens and nnsight (optional extras; the core never imports them).

    pip install 'intervene[lens]'      # TransformerLens 4.x: intervene.interop.lens
    pip install 'intervene[nnsight]'   # nnsight 0.8: intervene.interop.nnsight

Both modules offer the same functions, with the same semantics as intervene's own hooks:

``capture_batch``    one forward through the library; the sites of :func:`intervene.capture`
                     (``embed``, ``layers.L.resid_out`` at the last position,
                     ``layers.L.router.logits`` / ``.topk`` on MoE layers)
``capture_means``    :func:`intervene.measure.collect.measure` done through the library: a
                     :class:`~intervene.io.measurements.Measurements` with the same keys and numbers
``resolve_edits``    a config (+ measurements) -> the resolved list of ``LayerEdit`` that live
                     hooks and the bake consume (:func:`intervene.config.resolve`)
``run_with_config``  logits under a config's projections, applied through the library
``lens_hooks`` / ``nnsight_edits``  the projections as the library's own interventions

:mod:`intervene.interop.export` converts a measurements file to a plain dict keyed the
TransformerLens way (``blocks.{L}.hook_resid_post``) and back; it needs neither library.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import an optional dependency, or fail with the install command that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is not installed (needed by intervene.interop.{extra}); "
            f"install it with: pip install 'intervene[{extra}]' ({e})"
        ) from e


__all__ = ["require"]
