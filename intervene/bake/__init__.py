"""Streamed, sharded, MoE-aware weight edits: ``plan`` (config + checkpoint headers -> tensor
edits), ``reader``/``writer`` (safetensors byte ranges, one tensor at a time), ``run`` (temporary
directory, workers, rename)."""

from .plan import BakePlan, TensorEdit, plan_bake  # noqa: F401
from .run import BakeResult, bake, execute  # noqa: F401

__all__ = ["bake", "execute", "plan_bake", "BakePlan", "BakeResult", "TensorEdit"]
