"""``intervene eval`` as one library call: a model (by spec), optionally under a config applied live and
against a reference model, scored on two prompt sets -- the full eval (generation, answer KL, a judge,
capability) or the first-token numbers only, whole or one decoder layer at a time
(:mod:`intervene.runner` refuses what ``--stream-layers`` cannot do). Returns the report the command
prints and writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..config import load_config
from ..errors import InputError
from ..hooks.apply import apply, bind_model
from ..io.measurements import measurements_for
from ..io.models import PromptFormat, load_model, load_tokenizer
from ..io.prompts import load_prompts
from ..runner import RunOptions, check_stream_layers
from .capability import capability
from .evaluate import evaluate, first_token_scores
from .judge import load_judge
from .server import ServerClient, ServerOptions, served_evaluate
from .stream_eval import first_token_streamed
from .tryout import EvalRunReport, FirstTokenRunReport, PromptSources


def run_eval(model: str | None, harmful: str = "builtin:harmful:eval", harmless: str = "builtin:harmless:eval", *,
             field: str | None = None, limit: int | None = None, config: str | None = None,
             measurements: str | None = None, reference: str | None = None, judge: str | None = None,
             first_token: bool = False, answer_kl: bool = True, with_capability: bool = False,
             capability_text: str | None = None, lm_eval_tasks: Sequence[str] = (), lm_eval_limit: int | None = None,
             max_new_tokens: int = 48, samples: int = 4, system_prompt: str | None = None,
             chat_template: bool | None = None, run: RunOptions | None = None, server: ServerOptions | None = None
             ) -> EvalRunReport | FirstTokenRunReport:
    """``model`` (a MODEL spec; None: the config's ``model``) with ``config`` (a YAML path, native or
    reference schema) applied live, or against ``reference`` (the baseline model), on ``harmful`` /
    ``harmless`` (prompt specs, ``field``, at most ``limit`` each). ``first_token``: the first-token
    numbers only (:class:`FirstTokenRunReport`), streamed with ``run.stream_layers``; else the full
    :func:`~intervene.live.evaluate.evaluate` (:class:`EvalRunReport`), with ``judge`` (a judge model
    directory) and capability (``with_capability``, ``capability_text`` file, lm-eval ``lm_eval_tasks``).
    ``system_prompt`` / ``chat_template`` left None: the config's (else none / True). ``server``: the greedy
    answers come from a serving engine (:mod:`intervene.live.server`; the config served as its LoRA adapter), the
    log-probs from the model loaded here unless the server returns the whole vocabulary."""
    run = run or RunOptions()
    wants_capability = bool(with_capability or capability_text or lm_eval_tasks)
    if server is not None:
        bad = [flag for flag, given in (("--first-token", first_token), ("--stream-layers", run.stream_layers),
                                        ("--reference", reference), ("--capability", wants_capability)) if given]
        if bad:
            raise InputError(f"--server generates on the server; {bad[0]} runs in process only (drop one)")
    if run.stream_layers:
        check_stream_layers(generates=not first_token, device_map=run.device_map, hidden_on=run.hidden_on)
    if first_token:
        bad = [flag for flag, given in (("--reference", reference), ("--judge", judge),
                                        ("--capability", wants_capability), ("--no-answer-kl", not answer_kl)) if given]
        if bad:
            raise InputError(f"--first-token scores the first token only; {bad[0]} needs the full eval (drop one)")
    cfg = None
    if config:
        cfg = load_config(config, model=model)  # native, or reference-schema translated
    model_spec = model or (cfg.model if cfg else None)
    if not model_spec:
        raise InputError("MODEL is required (or a --config whose 'model' names it)")
    if measurements and cfg is None:
        raise InputError("--measurements needs --config")
    harmful_set = load_prompts(harmful, field=field, limit=limit)
    harmless_set = load_prompts(harmless, field=field, limit=limit)
    system_prompt = system_prompt if system_prompt is not None else (cfg.system_prompt if cfg else None)
    chat_template = chat_template if chat_template is not None else (cfg.chat_template if cfg else True)
    sources = PromptSources(harmful, harmless, field, limit)
    common = dict(prompt_format=PromptFormat(system_prompt, chat_template), run=run)

    if first_token:
        meas = _measurements(cfg, measurements, config)
        if run.stream_layers:
            report = first_token_streamed(model_spec, load_tokenizer(model_spec), harmful_set, harmless_set, cfg,
                                          meas, dtype=run.dtype, device=run.device, hidden_on=run.hidden_on,
                                          **common)
        else:
            loaded, tokenizer = load_model(model_spec, dtype=run.dtype, device_map=run.device_map)
            report = first_token_scores(loaded, tokenizer, harmful_set, harmless_set,
                                        intervention=_intervention(loaded, cfg, meas),
                                        config=cfg.to_dict() if cfg else None, **common)
        return FirstTokenRunReport(report, model_spec, config, sources)

    judge_model = load_judge(judge) if judge else None
    text = None
    if capability_text:
        if not Path(capability_text).is_file():
            raise InputError(f"--capability-text {capability_text}: no such file")
        text = Path(capability_text).read_text(encoding="utf-8")
    meas = _measurements(cfg, measurements, config)
    if server is not None:
        name = ServerClient(server.url, server.timeout).model_name(server.model)  # named before anything loads
        loaded, tokenizer = load_model(model_spec, dtype=run.dtype, device_map=run.device_map)
        report = served_evaluate(server, loaded, tokenizer, model_spec, harmful_set, harmless_set, config=cfg,
                                 measurements=meas, intervention=_intervention(loaded, cfg, meas),
                                 served_model=name, max_new_tokens=max_new_tokens, batch_size=run.batch_size,
                                 n_samples=samples, prompt_format=PromptFormat(system_prompt, chat_template),
                                 judge=judge_model, full_answer_kl=answer_kl, progress=run.progress)
        return EvalRunReport(report, model_spec, config, sources)
    loaded, tokenizer = load_model(model_spec, dtype=run.dtype, device_map=run.device_map)
    reference_loaded = load_model(reference, dtype=run.dtype, device_map=run.device_map) if reference else None
    intervention = _intervention(loaded, cfg, meas)
    report = evaluate(loaded, tokenizer, harmful_set, harmless_set, intervention=intervention,
                      max_new_tokens=max_new_tokens, n_samples=samples, config=cfg.to_dict() if cfg else None,
                      reference=reference_loaded, judge=judge_model, full_answer_kl=answer_kl,
                      **common)
    capability_report = None
    if wants_capability:
        capability_report = capability(loaded, tokenizer, intervention=intervention, reference=reference_loaded,
                                       text=text, text_name=capability_text, lm_eval_tasks=lm_eval_tasks,
                                       lm_eval_limit=lm_eval_limit)
    return EvalRunReport(report, model_spec, config, sources, reference=reference, capability=capability_report)


def _measurements(cfg: Any, override: str | None, config_path: str | None) -> Any:
    """The measurements of the config: ``override`` (``--measurements``) or the config's own file."""
    return measurements_for(override, cfg.measurements, config_path) if cfg is not None else None


def _intervention(model: Any, cfg: Any, measurements: Any) -> Any:
    """The config applied live on ``model`` as a context factory, or None without a config; the config's
    errors surface here, not after the baseline has run."""
    if cfg is None:
        return None
    bound = bind_model(model, cfg, measurements)  # resolved once, re-applied by each entry
    with apply(model, bound):
        pass
    return lambda: apply(model, bound)


__all__ = ["run_eval"]
