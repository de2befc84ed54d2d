"""intervene: find, try live, and bake directional interventions in dense and MoE transformers.

    with intervene.capture(model, layers) as acts: ...      # residuals, router logits, top-k
    with intervene.apply(model, config, measurements): ...  # live projection, hooks removed on exit
"""

import importlib

from .errors import (
    ArchitectureError,
    CheckpointError,
    ConfigError,
    InputError,
    InterveneError,
    MeasurementError,
)
from .version import __version__


# the public API, loaded on first use: importing intervene stays cheap (no torch or transformers import)
_LAZY: dict[str, tuple[str, str]] = {
    "capture": ("intervene.hooks.capture", "capture"),
    "apply": ("intervene.hooks.apply", "apply"),
    "bind": ("intervene.config.resolve", "bind"),
    "load_model": ("intervene.io.models", "load_model"),
    "load_tokenizer": ("intervene.io.models", "load_tokenizer"),
    "load_config": ("intervene.config", "load_config"),
    "parse_config": ("intervene.config", "parse_config"),
    "load_measurements": ("intervene.io.measurements", "load_measurements"),
    # the verbs, one library call each (``intervene.bake.bake`` and ``intervene.search.search`` live in
    # their packages: a top-level name would shadow the package)
    "measure_model": ("intervene.measure.run", "measure_model"),
    "analyze": ("intervene.measure.analyze", "analyze"),
    "recommend": ("intervene.measure.analyze", "recommend"),
    "run_eval": ("intervene.live.eval_run", "run_eval"),
    "evaluate": ("intervene.live.evaluate", "evaluate"),
    "try_config": ("intervene.live.tryout", "try_config"),
    "route_study": ("intervene.live.route", "route_study"),
    "verify": ("intervene.bake.verify", "verify"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'intervene' has no attribute '{name}'")


__all__ = [
    "__version__", *_LAZY, "InterveneError", "InputError", "ConfigError", "ArchitectureError",
    "CheckpointError", "MeasurementError",
]
