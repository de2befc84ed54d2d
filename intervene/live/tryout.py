"""``intervene try``: score a config live, baseline vs hooked model, one process, one load. The
config is validated against the model's config (layers, targets, measurements) BEFORE the weights
load; :func:`intervene.live.evaluate.evaluate` then runs the baseline outside and the intervened
model inside ``apply`` (hooks, or in-memory weight swaps for ``norm_preserving`` and expert
subsets), and nothing is written but the optional JSON report (``try_config("configs/organism.yaml")
.to_dict()``). :func:`prepare` (config -> model, tokenizer and the config bound to the model, resolved
once) is shared by ``try``, ``route`` and ``chat``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from ..config import load_config
from ..config.resolve import Bound, LayerEdit, bind
from ..config.schema import InterventionConfig
from ..errors import ConfigError
from ..hooks.apply import apply, plan_sites
from ..io.measurements import Measurements, measurements_for
from ..io.models import PromptFormat, Quantization, load_model
from ..io.prompts import load_prompts
from ..io.sources import load_model_config
from ..runner import RunOptions
from .evaluate import EvalReport, FirstTokenReport, Intervention, evaluate
from .server import ServerClient, ServerOptions, served_evaluate


@dataclass
class Prepared:
    """A config bound to a loaded model (resolved once, before the weights loaded)."""

    model: Any
    tokenizer: Any
    bound: Bound
    model_spec: str | None

    @property
    def config(self) -> InterventionConfig:
        return self.bound.config

    @property
    def measurements(self) -> Measurements:
        return self.bound.measurements

    @property
    def edits(self) -> tuple[LayerEdit, ...]:
        """The projections (``bound.router_biases``: the router biases)."""
        return self.bound.projections

    def intervention(self) -> Intervention:
        """A zero-argument callable returning the live context manager (what evaluate/route take)."""
        return lambda: apply(self.model, self.bound)

    def sites(self) -> list[dict[str, str]]:
        spec = self.bound.spec
        return [{"site": s.name, "mechanism": s.mechanism} for s in plan_sites(self.model, self.edits, spec=spec)] + [
            {"site": f"layers.{layer}.router.bias", "mechanism": "hook" if spec.selection_bias == "logits" else "swap"}
            for layer in sorted(self.bound.router_biases)]

    @property
    def system_prompt(self) -> str | None:
        return self.config.system_prompt

    @property
    def chat_template(self) -> bool:
        return self.config.chat_template


def prepare(config: InterventionConfig | str | os.PathLike, model_spec: str | None = None,
            measurements: Measurements | str | os.PathLike | None = None, dtype: str | None = None,
            device_map: str | None = None, model: Any = None, tokenizer: Any = None,
            quantization: Quantization | None = None) -> Prepared:
    """Load the config (and its measurements), validate it against the model config, then load the
    model (unless ``model``/``tokenizer`` are given) and resolve the edits.

    ``model_spec``, ``dtype`` and ``device_map`` override the config's ``model``, ``dtype`` and
    ``device_map``; the default dtype is ``auto`` (the checkpoint's own)."""
    cfg = config if isinstance(config, InterventionConfig) else load_config(config, model=model_spec)
    spec = model_spec or cfg.model
    meas = measurements_for(measurements, cfg.measurements, cfg.source)
    if model is None:
        if not spec:
            raise ConfigError(f"{cfg.source or 'config'}: no model given (set 'model' in the config or pass --model)")
        bound = bind(cfg, meas, load_model_config(spec))  # named errors before weights load
        model, tokenizer = load_model(spec, dtype=dtype or cfg.dtype or "auto",
                                      device_map=device_map or cfg.device_map, quantization=quantization)
    elif tokenizer is None:
        raise ConfigError("prepare: a model was given without its tokenizer")
    else:
        bound = bind(cfg, meas, model.config)
    return Prepared(model, tokenizer, bound, spec)


@dataclass
class PromptSources:
    """Where the prompts came from: each set's spec (or ``"N prompts"`` for a list given directly)."""

    harmful: str
    harmless: str
    field: str | None
    limit: int | None

    @classmethod
    def of(cls, harmful: str | Sequence[str], harmless: str | Sequence[str], field: str | None = None,
           limit: int | None = None) -> PromptSources:
        def name(spec: str | Sequence[str]) -> str:
            return spec if isinstance(spec, str) else f"{len(spec)} prompts"

        return cls(name(harmful), name(harmless), field, limit)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TryReport:
    """:func:`try_config`'s result: the evaluate report and what was scored (config, model, sites)."""

    evaluation: EvalReport
    model: str | None
    measurements: str | None
    config_path: str | None
    sites: list[dict[str, str]]  # {site, mechanism} per hook site
    prompt_sources: PromptSources

    def to_dict(self) -> dict[str, Any]:
        """The JSON report: the evaluate report's keys, then these."""
        return self.evaluation.to_dict() | {
            "kind": "try", "model": self.model, "measurements": self.measurements, "config_path": self.config_path,
            "sites": [dict(s) for s in self.sites], "prompt_sources": self.prompt_sources.to_dict(),
        }


@dataclass
class EvalRunReport:
    """``intervene eval``'s JSON report: the evaluate report and the model, config and prompts it ran on."""

    evaluation: EvalReport
    model: str
    config_path: str | None
    prompt_sources: PromptSources
    reference: str | None = None  # the source model the baseline numbers are from (--reference)
    capability: Any = None  # a live.capability.CapabilityReport (--capability)

    def to_dict(self) -> dict[str, Any]:
        return self.evaluation.to_dict() | {"kind": "eval", "model": self.model, "config_path": self.config_path,
                                            "prompt_sources": self.prompt_sources.to_dict(),
                                            "reference": self.reference,
                                            "capability": self.capability.to_dict() if self.capability else None}


@dataclass
class FirstTokenRunReport:
    """``intervene eval --first-token``'s JSON report: the first-token numbers under ``first_token``."""

    first_token: FirstTokenReport
    model: str
    config_path: str | None
    prompt_sources: PromptSources

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "eval_first_token", "model": self.model, "config_path": self.config_path,
                "prompt_sources": self.prompt_sources.to_dict(), "first_token": self.first_token.to_dict()}


def try_config(config: InterventionConfig | str | os.PathLike, harmful: str | list[str] = "builtin:harmful:eval",
               harmless: str | list[str] = "builtin:harmless:eval", *, field: str | None = None,
               limit: int | None = None, model_spec: str | None = None,
               measurements: Measurements | str | os.PathLike | None = None, dtype: str | None = None,
               device_map: str | None = None, batch_size: int = 16, max_new_tokens: int = 48, samples: int = 4,
               system_prompt: str | None = None, chat_template: bool | None = None, progress: bool = True,
               prepared: Prepared | None = None, quantization: Quantization | None = None,
               server: ServerOptions | None = None) -> TryReport:
    """Evaluate baseline vs live-intervened model on two prompt sets: the evaluate report
    (``report.evaluation.harmful.refusals``, ``.kl_divergence``, ``.samples`` ...) with the model,
    measurements, hook sites and prompt sources.

    ``harmful``/``harmless`` are prompt specs (see :mod:`intervene.io.prompts`) or lists of prompts.
    ``system_prompt``/``chat_template`` default to the config's values. ``server``: the greedy answers come from a
    serving engine, the config served as its exact LoRA adapter (:func:`intervene.live.server.served_evaluate`)."""
    served_model = ServerClient(server.url, server.timeout).model_name(server.model) if server else None
    run = prepare_run(config, harmful, harmless, field=field, limit=limit, model_spec=model_spec,
                      measurements=measurements, dtype=dtype, device_map=device_map, system_prompt=system_prompt,
                      chat_template=chat_template, prepared=prepared, quantization=quantization)
    p = run.prepared
    if server is not None:
        report = served_evaluate(server, p.model, p.tokenizer, p.model_spec, run.harmful, run.harmless,
                                 config=p.config, measurements=p.measurements, intervention=p.intervention(),
                                 served_model=served_model, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 n_samples=samples, prompt_format=run.prompt_format,
                                 progress=progress)
        return TryReport(report, p.model_spec, p.measurements.path, p.config.source, p.sites(), run.prompt_sources)
    report = evaluate(p.model, p.tokenizer, run.harmful, run.harmless, intervention=p.intervention(),
                      max_new_tokens=max_new_tokens, n_samples=samples, prompt_format=run.prompt_format,
                      run=RunOptions(batch_size=batch_size, progress=progress), config=p.config.to_dict())
    return TryReport(report, p.model_spec, p.measurements.path, p.config.source, p.sites(), run.prompt_sources)


@dataclass
class LiveRun:
    """A config prepared for a live run (try, route): the loaded model and its edits, the prompt
    sets, and the prompt format (the values given, else the config's)."""

    prepared: Prepared
    harmful: list[str]
    harmless: list[str]
    prompt_format: PromptFormat
    prompt_sources: PromptSources


def prepare_run(config: InterventionConfig | str | os.PathLike, harmful: str | Sequence[str],
                harmless: str | Sequence[str], *, field: str | None = None, limit: int | None = None,
                model_spec: str | None = None, measurements: Measurements | str | os.PathLike | None = None,
                dtype: str | None = None, device_map: str | None = None, system_prompt: str | None = None,
                chat_template: bool | None = None, prepared: Prepared | None = None,
                quantization: Quantization | None = None) -> LiveRun:
    """Load the prompt sets (first: a bad prompt file fails before any weights load), then
    :func:`prepare` the config unless ``prepared`` is given."""
    harmful_prompts = load_prompt_set(harmful, field, limit)
    harmless_prompts = load_prompt_set(harmless, field, limit)
    p = prepared or prepare(config, model_spec=model_spec, measurements=measurements, dtype=dtype,
                            device_map=device_map, quantization=quantization)
    return LiveRun(p, harmful_prompts, harmless_prompts,
                   PromptFormat(system_prompt if system_prompt is not None else p.system_prompt,
                                p.chat_template if chat_template is None else chat_template),
                   PromptSources.of(harmful, harmless, field, limit))


def load_prompt_set(spec: str | Sequence[str], field: str | None = None, limit: int | None = None) -> list[str]:
    """A prompt spec (see :mod:`intervene.io.prompts`) loaded, or a list of prompts cut to ``limit``."""
    if isinstance(spec, str):
        return load_prompts(spec, field=field, limit=limit)
    return list(spec)[:limit] if limit else list(spec)


__all__ = ["Prepared", "prepare", "PromptSources", "TryReport", "EvalRunReport", "FirstTokenRunReport", "try_config",
           "LiveRun", "prepare_run",
           "load_prompt_set"]
