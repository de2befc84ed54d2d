"""One small error hierarchy. The CLI prints ``str(error)`` on one line and exits non-zero."""

from __future__ import annotations


class InterveneError(Exception):
    """Base class for every error intervene raises on purpose (user mistakes, bad input)."""


class InputError(InterveneError):
    """A file, directory, prompt set or argument given by the user is missing or malformed."""


class ConfigError(InterveneError):
    """A YAML config is invalid: unknown key, bad value, layer out of range, unknown target."""


class ArchitectureError(InterveneError):
    """The model's architecture is not supported, or lacks a module the request needs."""


class CheckpointError(InterveneError):
    """A checkpoint on disk is inconsistent, quantized, or cannot be edited as asked."""


class MeasurementError(InterveneError):
    """A measurements file is unreadable or does not belong to the model at hand."""
