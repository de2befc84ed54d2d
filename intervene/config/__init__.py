"""Intervention configs: the YAML schema (``schema``) and the resolved edits that the live hooks
and the bake both consume (``resolve``)."""

from .resolve import LayerEdit, resolve  # noqa: F401
from .schema import AblateEntry, InterventionConfig, Method, load_config, parse_config  # noqa: F401

__all__ = ["AblateEntry", "InterventionConfig", "LayerEdit", "Method", "load_config", "parse_config", "resolve"]
