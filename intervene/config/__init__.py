"""Intervention configs: the YAML schema (``schema``) and the resolved edits that the live hooks
and the bake both consume (``resolve``)."""

from .schema import AblateEntry, InterventionConfig, LayerEdit, load_config, parse_config, resolve  # noqa: F401

__all__ = ["AblateEntry", "InterventionConfig", "LayerEdit", "load_config", "parse_config", "resolve"]
