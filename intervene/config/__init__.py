"""Intervention configs: the YAML schema (``schema``) and the resolved edits that the live hooks
and the bake both consume (``resolve``)."""

from .resolve import LayerEdit, RouterBiasEdit, resolve  # noqa: F401
from .schema import AblateEntry, InterventionConfig, Method, RouterBiasEntry, load_config, parse_config  # noqa: F401

__all__ = ["AblateEntry", "InterventionConfig", "LayerEdit", "Method", "RouterBiasEdit", "RouterBiasEntry", "load_config",
           "parse_config", "resolve"]
