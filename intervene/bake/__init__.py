"""Streamed, sharded, MoE-aware weight edits: ``plan`` (config + checkpoint headers -> tensor edits),
``writer`` (one shard, one tensor at a time), ``workers`` (the shard jobs, in worker processes or
not), ``outputs`` (metadata, side files, index, model card, hashes), ``publish`` (temporary
directory, fsync, atomic exchange, stale tidy-up), ``run`` (``bake``: all of these in order) and
``verify`` (baked logits == live-hooked logits)."""

from .plan import BakePlan, TensorEdit, plan_bake  # noqa: F401
from .run import BakeResult, bake, execute  # noqa: F401

__all__ = ["bake", "execute", "plan_bake", "BakePlan", "BakeResult", "TensorEdit"]
