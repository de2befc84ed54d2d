"""``intervene try``: score a config live -- baseline vs hooked model, one process, one load.

    report = try_config("configs/organism.yaml", harmful="builtin:harmful:eval",
                        harmless="builtin:harmless:eval")

The config is validated against the model's config (layers, targets, measurements) BEFORE the
weights are loaded; then the model is loaded once and :func:`intervene.live.evaluate.evaluate` runs
the baseline outside and the intervened model inside ``apply_edits`` (hooks, or in-memory
weight swaps for ``norm_preserving`` and expert subsets). Nothing is written to disk except the
optional JSON report, which carries the config, the hook sites used and the versions.

:func:`prepare` (config -> model, tokenizer, measurements, resolved edits) is shared by
``try``, ``route`` and ``chat``.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config.schema import InterventionConfig, LayerEdit, load_config, resolve
from ..errors import ConfigError
from ..io.measurements import Measurements


@dataclass
class Prepared:
    """A config resolved against a loaded model."""

    config: InterventionConfig
    measurements: Measurements
    model: Any
    tokenizer: Any
    edits: list[LayerEdit]
    model_spec: str | None

    def intervention(self) -> Callable[[], AbstractContextManager]:
        """A zero-argument callable returning the live context manager (what evaluate/route take)."""
        from ..hooks.apply import apply_edits

        return lambda: apply_edits(self.model, self.edits)

    def sites(self) -> list[dict[str, str]]:
        from ..hooks.apply import plan_sites

        return [{"site": s.name, "mechanism": s.mechanism} for s in plan_sites(self.model, self.edits)]

    @property
    def system_prompt(self) -> str | None:
        return self.config.system_prompt

    @property
    def chat_template(self) -> bool:
        return self.config.chat_template


def prepare(config: InterventionConfig | str | os.PathLike, model_spec: str | None = None,
            measurements: Measurements | str | os.PathLike | None = None, dtype: str | None = None,
            device_map: str | None = None, model: Any = None, tokenizer: Any = None) -> Prepared:
    """Load the config (and its measurements), validate it against the model config, then load the
    model (unless ``model``/``tokenizer`` are given) and resolve the edits.

    ``model_spec``, ``dtype`` and ``device_map`` override the config's ``model``, ``dtype`` and
    ``device_map``; the default dtype is float32."""
    from ..arch import arch_for_config, text_config
    from ..hooks.apply import load_config_measurements, resolve_for_model

    cfg = config if isinstance(config, InterventionConfig) else load_config(config)
    spec = model_spec or cfg.model
    meas = load_config_measurements(cfg, measurements)
    if model is None:
        if not spec:
            raise ConfigError(f"{cfg.source or 'config'}: no model given (set 'model' in the config or pass --model)")
        from ..io.sources import load_model_config
        from ..io.models import load_model

        hf_config = load_model_config(spec)
        resolve(cfg, arch_for_config(hf_config), text_config(hf_config), meas)  # named errors before weights load
        model, tokenizer = load_model(spec, dtype=dtype or cfg.dtype or "float32",
                                      device_map=device_map or cfg.device_map)
    elif tokenizer is None:
        raise ConfigError("prepare: a model was given without its tokenizer")
    edits = resolve_for_model(model, cfg, meas)
    return Prepared(cfg, meas, model, tokenizer, edits, spec)


def try_config(config: InterventionConfig | str | os.PathLike, harmful: str | list[str] = "builtin:harmful:eval",
               harmless: str | list[str] = "builtin:harmless:eval", *, field: str | None = None,
               limit: int | None = None, model_spec: str | None = None,
               measurements: Measurements | str | os.PathLike | None = None, dtype: str | None = None,
               device_map: str | None = None, batch_size: int = 16, max_new_tokens: int = 48, samples: int = 4,
               system_prompt: str | None = None, chat_template: bool | None = None, progress: bool = True,
               prepared: Prepared | None = None) -> dict[str, Any]:
    """Evaluate baseline vs live-intervened model on two prompt sets; returns the evaluate report
    (``harmful.refusals/total``, ``harmless.refusals/total``, ``kl_divergence``, ``samples`` ...)
    plus ``config``, ``model``, ``measurements``, ``sites`` and ``prompt_sources``.

    ``harmful``/``harmless`` are prompt specs (see :mod:`intervene.io.prompts`) or lists of prompts.
    ``system_prompt``/``chat_template`` default to the config's values."""
    from .evaluate import evaluate
    from ..io.prompts import load_prompts

    harmful_prompts = _prompts(harmful, field, limit, load_prompts)
    harmless_prompts = _prompts(harmless, field, limit, load_prompts)
    p = prepared or prepare(config, model_spec=model_spec, measurements=measurements, dtype=dtype,
                            device_map=device_map)
    report = evaluate(
        p.model, p.tokenizer, harmful_prompts, harmless_prompts, intervention=p.intervention(),
        max_new_tokens=max_new_tokens, batch_size=batch_size, n_samples=samples,
        system_prompt=system_prompt if system_prompt is not None else p.system_prompt,
        chat_template=p.chat_template if chat_template is None else chat_template,
        config=p.config.to_dict(), progress=progress,
    )
    report.update({
        "kind": "try",
        "model": p.model_spec,
        "measurements": p.measurements.path,
        "config_path": p.config.source,
        "sites": p.sites(),
        "prompt_sources": {"harmful": harmful if isinstance(harmful, str) else f"{len(harmful)} prompts",
                           "harmless": harmless if isinstance(harmless, str) else f"{len(harmless)} prompts",
                           "field": field, "limit": limit},
    })
    return report


def _prompts(spec: str | list[str], field: str | None, limit: int | None, load: Callable) -> list[str]:
    if isinstance(spec, str):
        return load(spec, field=field, limit=limit)
    return list(spec)[:limit] if limit else list(spec)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write a JSON report atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=_jsonable)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


__all__ = ["Prepared", "prepare", "try_config", "write_json"]
