"""intervene: find, try live, and bake directional interventions in dense and MoE transformers.

    with intervene.capture(model, layers) as acts: ...      # residuals, router logits, top-k
    with intervene.apply(model, config, measurements): ...  # live projection, hooks removed on exit
"""

from .errors import (
    ArchitectureError,
    CheckpointError,
    ConfigError,
    InputError,
    InterveneError,
    MeasurementError,
)
from .version import __version__


def __getattr__(name: str):
    # lazy public API: importing intervene stays cheap (no transformers import)
    if name == "capture":
        from .hooks.capture import capture

        return capture
    if name == "apply":
        from .hooks.apply import apply

        return apply
    if name in ("load_model", "load_tokenizer"):
        from .io import models

        return getattr(models, name)
    if name in ("load_config", "parse_config"):
        from . import config

        return getattr(config, name)
    if name == "load_measurements":
        from .io.measurements import load_measurements

        return load_measurements
    raise AttributeError(f"module 'intervene' has no attribute '{name}'")


__all__ = [
    "__version__", "capture", "apply", "load_model", "load_tokenizer", "load_config", "parse_config",
    "load_measurements", "InterveneError", "InputError", "ConfigError", "ArchitectureError",
    "CheckpointError", "MeasurementError",
]
