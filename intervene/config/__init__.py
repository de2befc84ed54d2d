"""Intervention configs: the YAML schema (``schema``), the reference tool's schema translated
(``reference``), and a config bound to a model (``resolve.bind``), which the live hooks and the bake
both consume."""

from .resolve import Bound, LayerEdit, RouterBiasEdit, bind, resolve  # noqa: F401
from .schema import AblateEntry, InterventionConfig, Method, RouterBiasEntry, parse_config  # noqa: F401
from .reference import load_any_config as load_config  # noqa: F401  (native or reference schema)

__all__ = ["AblateEntry", "Bound", "InterventionConfig", "LayerEdit", "Method", "RouterBiasEdit", "RouterBiasEntry",
           "bind", "load_config", "parse_config", "resolve"]
