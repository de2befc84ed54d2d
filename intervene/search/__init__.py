"""Optuna search over live interventions: the space, the objective, the Pareto maths, the study loop
and its report. ``search(...)`` is the entry point."""


def __getattr__(name: str):
    if name == "search":  # lazy: optuna is an optional extra
        from .study import search

        return search
    raise AttributeError(f"module 'intervene.search' has no attribute '{name}'")


__all__ = ["search"]
