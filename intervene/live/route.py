"""Router study: what an intervention does to expert selection, layer by layer. Forward passes
only; every non-pad token of every chat-formatted prompt counts, and each MoE layer's top-k choice
is recorded once on the model as is ("baseline") and once inside ``intervention()``
("intervened"), on the same tokens. The statistics (natural logarithms) are defined on
:class:`LayerRouting`; ``route_study(...).to_dict()`` is the JSON report (``intervene route --json``).
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..arch import arch_for_config, text_config
from ..config.schema import InterventionConfig
from ..errors import ArchitectureError, InputError
from ..hooks.capture import capture, router_site
from ..io.measurements import Measurements
from ..io.models import PromptFormat, batches, encode, model_device, versions
from ..maths import js_divergence
from ..runner import RunOptions
from .evaluate import SETS, Intervention, PerSet
from .tryout import Prepared, PromptSources, prepare_run

Condition = Literal["baseline", "intervened"]
CONDITIONS: tuple[Condition, Condition] = ("baseline", "intervened")


@dataclass
class ExpertChange:
    expert: int
    delta: float  # intervened minus baseline selection frequency


@dataclass
class RoutingJS:
    """Jensen-Shannon divergences (nats) between ``freq`` vectors."""

    harmful: float  # baseline vs intervened, harmful prompts
    harmless: float  # baseline vs intervened, harmless prompts
    harmful_vs_harmless_baseline: float
    harmful_vs_harmless_intervened: float


@dataclass
class LayerRouting:
    """One MoE layer.

    * ``freq[set][condition][e]``  fraction of top-k token-slots that chose expert e,
      ``count(e) / (n_tokens · k)``; sums to 1 over experts (uniform routing: 1/E), as the
      ``router.*_freq`` tensors of a measurements file.
    * ``changed_fraction``  fraction of tokens whose top-k SET (order ignored) differs between
      baseline and intervened.
    * ``js``  Jensen-Shannon divergence ``½KL(p‖m) + ½KL(q‖m)``, ``m = (p+q)/2``, between two
      ``freq`` vectors (:func:`intervene.maths.js_divergence`); 0 for identical routing, at most ln 2.
    * ``delta[e]``  intervened minus baseline ``freq[e]``; ``gained``/``lost`` list the experts with
      the largest positive/negative delta.
    * ``harmful_preference[e]``  harmful minus harmless baseline ``freq[e]``: experts the model
      routes harmful prompts to more often (candidates for ``experts:`` subsets).
    """

    layer: int  # decoder layer index
    freq: PerSet[dict[Condition, list[float]]]
    changed_fraction: PerSet[float]
    js: RoutingJS
    delta: PerSet[list[float]]
    gained: PerSet[list[ExpertChange]]
    lost: PerSet[list[ExpertChange]]
    harmful_preference: list[float]


@dataclass
class SteeredExpert:
    """An expert a config's ``router_bias`` steers, and its selection frequency before and after
    (a -inf bias sends ``freq.<set>.intervened`` to 0)."""

    layer: int
    expert: int
    bias: float  # summed over the config's entries on this layer
    freq: PerSet[dict[Condition, float]]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if math.isinf(self.bias):
            d["bias"] = "-inf" if self.bias < 0 else "inf"
        return d


@dataclass
class RoutingSummary:
    changed_fraction: PerSet[float]  # token-weighted over layers
    js: RoutingJS  # mean over layers
    most_changed_layer: int | None  # the layer with the largest harmful js


@dataclass
class RouteReport:
    """What :func:`route_study` found; :func:`route_config` adds the measurements, hook sites and
    prompt sources of the config it ran."""

    num_experts: int
    top_k: int
    tokens: PerSet[int]  # non-pad tokens per prompt set
    layers: list[LayerRouting]
    summary: RoutingSummary
    model: str | None = None
    config: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    prompts: PerSet[int] | None = None  # prompts per set
    intervened: bool = False
    measurements: str | None = None
    sites: list[dict[str, str]] | None = None
    prompt_sources: PromptSources | None = None  # the last three are in the JSON when this is set
    steered: list[SteeredExpert] = field(default_factory=list)  # router_bias experts (route_config)

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (key order as written)."""
        d = asdict(self)
        d = {k: d[k] for k in ("num_experts", "top_k", "tokens", "layers", "summary")} | {"kind": "route"} | {
            k: d[k] for k in ("model", "config", "versions", "prompts", "intervened")}
        if self.steered:
            d["steered"] = [s.to_dict() for s in self.steered]
        if self.prompt_sources is not None:
            d |= {"measurements": self.measurements, "sites": [dict(s) for s in self.sites or []],
                  "prompt_sources": self.prompt_sources.to_dict()}
        return d


# ---- pure statistics ------------------------------------------------------------------------------

def selection_freq(topk: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``topk`` [N, k] expert indices -> fraction of the N·k slots choosing each expert, [E] float64."""
    counts = torch.bincount(topk.reshape(-1).to(torch.int64), minlength=num_experts).to(torch.float64)
    total = counts.sum()
    return counts / total if total > 0 else counts


def changed_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of rows of two [N, k] index tensors whose SETS differ (order within a row ignored)."""
    if a.shape != b.shape:
        raise ValueError(f"top-k shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.shape[0] == 0:
        return math.nan
    differ = (a.sort(dim=-1).values != b.sort(dim=-1).values).any(dim=-1)
    return float(differ.to(torch.float64).mean())


def top_changes(delta: torch.Tensor, n: int, sign: Literal[1, -1]) -> list[ExpertChange]:
    """The ``n`` experts with the largest ``sign·delta`` (strictly > 0)."""
    order = torch.argsort(sign * delta, descending=True, stable=True)
    return [ExpertChange(int(e), float(delta[e])) for e in order[:n] if sign * float(delta[e]) > 0]


# ---- capture ------------------------------------------------------------------------------------

@torch.no_grad()
def router_choices(model: Any, tokenizer: Any, prompts: Sequence[str], *, prompt_format: PromptFormat | None = None,
                   run: RunOptions | None = None, desc: str = "routing") -> dict[int, torch.Tensor]:
    """Top-k expert indices per MoE layer over every non-pad token: ``{layer: [N_tokens, k]}``
    (``run`` defaults to no progress bar).

    Tokens are in prompt order, then position order, so two calls on the same prompts align
    token by token."""
    spec = arch_for_config(model.config)
    config = text_config(model.config)
    moe_layers = [layer for layer in range(int(config.num_hidden_layers)) if spec.is_moe_layer(config, layer)]
    if not moe_layers:
        raise ArchitectureError(f"model type '{spec.name}' has no MoE layers: nothing to route")
    run = run or RunOptions(progress=False)
    texts = (prompt_format or PromptFormat()).render(tokenizer, prompts)
    device = model_device(model)
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in moe_layers}
    with tqdm(total=len(texts), desc=desc, unit="prompt", file=sys.stderr, disable=not run.progress,
              leave=False) as bar:
        for chunk in batches(texts, run.batch_size):
            enc = encode(tokenizer, chunk, device)
            with capture(model, layers=moe_layers, router=True) as acts:
                _forward(model, enc)
            mask = acts.token_mask()
            for layer in moe_layers:
                out[layer].append(acts[router_site(layer, "topk")][mask])
            bar.update(len(chunk))
    return {layer: torch.cat(rows) for layer, rows in out.items()}


def _forward(model: Any, enc: dict[str, torch.Tensor]) -> None:
    try:
        model(**enc, logits_to_keep=1)
    except TypeError:  # forward without logits_to_keep
        model(**enc)


# ---- the study ----------------------------------------------------------------------------------

def route_study(model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str],
                intervention: Intervention | None = None, *, prompt_format: PromptFormat | None = None,
                run: RunOptions | None = None, top: int = 5, config: dict[str, Any] | None = None,
                model_name: str | None = None) -> RouteReport:
    """Expert-selection statistics on harmful and harmless prompts, baseline vs ``intervention()``
    (a zero-argument callable returning a context manager). See :class:`LayerRouting`."""
    if not harmful or not harmless:
        raise InputError("route needs at least one harmful and one harmless prompt")
    spec = arch_for_config(model.config)
    num_experts = spec.num_experts(text_config(model.config))
    kw = dict(prompt_format=prompt_format, run=run or RunOptions())
    prompts = PerSet(harmful, harmless)
    choices: dict[Condition, PerSet[dict[int, torch.Tensor]]] = {}
    for condition in CONDITIONS:
        context = intervention() if (condition == "intervened" and intervention is not None) else nullcontext()
        with context:
            choices[condition] = PerSet.of(
                lambda name: router_choices(model, tokenizer, prompts[name], desc=f"{condition}: {name}", **kw))
    report = summarize(choices, num_experts, top=top)
    report.model, report.config, report.versions = model_name, config, versions()
    report.prompts = PerSet(len(harmful), len(harmless))
    report.intervened = intervention is not None
    return report


def summarize(choices: dict[Condition, PerSet[dict[int, torch.Tensor]]], num_experts: int,
              top: int = 5) -> RouteReport:
    """The report body from ``choices[condition][set][layer] = [N, k]`` top-k indices."""
    base, new = choices["baseline"], choices["intervened"]
    layers_out: list[LayerRouting] = []
    changed_tokens = {name: 0.0 for name in SETS}  # summed over layers, for the token-weighted summary
    all_tokens = {name: 0 for name in SETS}
    layers = sorted(base.harmful)
    for layer in layers:
        freq = PerSet.of(lambda name: {c: selection_freq(choices[c][name][layer], num_experts) for c in CONDITIONS})
        delta = PerSet.of(lambda name: freq[name]["intervened"] - freq[name]["baseline"])
        changed = PerSet.of(lambda name: changed_fraction(base[name][layer], new[name][layer]))
        for name in SETS:
            n = int(base[name][layer].shape[0])
            changed_tokens[name] += changed[name] * n
            all_tokens[name] += n
        layers_out.append(LayerRouting(
            layer=layer,
            freq=PerSet.of(lambda name: {c: freq[name][c].tolist() for c in CONDITIONS}),
            changed_fraction=changed,
            js=RoutingJS(
                harmful=js_divergence(freq.harmful["baseline"], freq.harmful["intervened"]),
                harmless=js_divergence(freq.harmless["baseline"], freq.harmless["intervened"]),
                harmful_vs_harmless_baseline=js_divergence(freq.harmful["baseline"], freq.harmless["baseline"]),
                harmful_vs_harmless_intervened=js_divergence(freq.harmful["intervened"], freq.harmless["intervened"]),
            ),
            delta=PerSet.of(lambda name: delta[name].tolist()),
            gained=PerSet.of(lambda name: top_changes(delta[name], top, +1)),
            lost=PerSet.of(lambda name: top_changes(delta[name], top, -1)),
            harmful_preference=(freq.harmful["baseline"] - freq.harmless["baseline"]).tolist(),
        ))

    def mean_js(key: str) -> float:
        return sum(getattr(row.js, key) for row in layers_out) / len(layers_out) if layers_out else math.nan

    summary = RoutingSummary(
        changed_fraction=PerSet.of(
            lambda name: changed_tokens[name] / all_tokens[name] if all_tokens[name] else math.nan),
        js=RoutingJS(**{f.name: mean_js(f.name) for f in fields(RoutingJS)}),
        most_changed_layer=max(layers_out, key=lambda row: row.js.harmful).layer if layers_out else None,
    )
    return RouteReport(
        num_experts=num_experts, top_k=int(base.harmful[layers[0]].shape[-1]) if layers else 0,
        tokens=PerSet.of(lambda name: int(base[name][layers[0]].shape[0]) if layers else 0),
        layers=layers_out, summary=summary,
    )


def route_config(config: InterventionConfig | str | os.PathLike, harmful: str | Sequence[str] = "builtin:harmful:eval",
                 harmless: str | Sequence[str] = "builtin:harmless:eval", *, field: str | None = None,
                 limit: int | None = None, model_spec: str | None = None,
                 measurements: Measurements | str | os.PathLike | None = None,
                 dtype: str | None = None, device_map: str | None = None, batch_size: int = 16,
                 system_prompt: str | None = None, chat_template: bool | None = None, top: int = 5,
                 progress: bool = True, prepared: Prepared | None = None) -> RouteReport:
    """:func:`route_study` of a config (path or :class:`~intervene.config.schema.InterventionConfig`)
    applied live, as :func:`~intervene.live.tryout.try_config` scores one: prompt specs or lists,
    ``system_prompt``/``chat_template`` defaulting to the config's. The report also names the
    measurements, hook sites and prompt sources."""
    run = prepare_run(config, harmful, harmless, field=field, limit=limit, model_spec=model_spec,
                      measurements=measurements, dtype=dtype, device_map=device_map, system_prompt=system_prompt,
                      chat_template=chat_template, prepared=prepared)
    p = run.prepared
    report = route_study(p.model, p.tokenizer, run.harmful, run.harmless, intervention=p.intervention(),
                         prompt_format=run.prompt_format, run=RunOptions(batch_size=batch_size, progress=progress),
                         top=top, config=p.config.to_dict(), model_name=p.model_spec)
    report.measurements, report.sites, report.prompt_sources = p.measurements.path, p.sites(), run.prompt_sources
    report.steered = steered_experts(report, p.bound.router_biases)
    return report


def steered_experts(report: RouteReport, router_biases: Mapping[int, torch.Tensor]) -> list[SteeredExpert]:
    """The experts ``router_biases`` (``Bound.router_biases``) steer, with their frequencies from ``report``."""
    rows = {row.layer: row for row in report.layers}
    out = []
    for layer, vec in sorted(router_biases.items()):
        row = rows.get(layer)
        if row is None:
            continue
        for e in torch.nonzero(vec).flatten().tolist():
            out.append(SteeredExpert(layer, int(e), float(vec[e]), PerSet.of(
                lambda name: {c: float(row.freq[name][c][e]) for c in CONDITIONS})))
    return out


# ---- presentation -------------------------------------------------------------------------------

def format_report(report: RouteReport, top: int = 3) -> str:
    """A printable per-layer table."""
    def pct(x: float) -> str:
        return "   n/a" if x != x else f"{100 * x:5.1f}%"

    def changes(items: list[ExpertChange]) -> str:
        return " ".join(f"{c.expert}:{c.delta:+.3f}" for c in items[:top]) or "-"

    def columns(changed: PerSet[float], js: RoutingJS) -> str:
        return (f"{pct(changed.harmful):>8} {pct(changed.harmless):>8}  {js.harmful:>8.4f} {js.harmless:>8.4f}  "
                f"{js.harmful_vs_harmless_baseline:>9.4f} {js.harmful_vs_harmless_intervened:>9.4f}  ")

    lines = [f"routing on {report.tokens.harmful} harmful / {report.tokens.harmless} harmless tokens, "
             f"{report.num_experts} experts, top-{report.top_k}",
             f"{'layer':>5}  {'top-k changed':^17}  {'JS base→int':^17}  {'JS harmful↔harmless':^19}  "
             f"{'harmful: gained':<28}{'harmful: lost':<28}",
             f"{'':>5}  {'harmful':>8} {'harmless':>8}  {'harmful':>8} {'harmless':>8}  {'base':>9} {'int':>9}"]
    for row in report.layers:
        lines.append(f"{row.layer:>5}  {columns(row.changed_fraction, row.js)}{changes(row.gained.harmful):<28}"
                     f"{changes(row.lost.harmful):<28}")
    s = report.summary
    lines.append(f"{'all':>5}  {columns(s.changed_fraction, s.js)}(mean JS over layers; changed: token-weighted)")
    if report.steered:
        lines.append("router_bias: steered experts' selection frequency, baseline -> intervened")
        lines.append(f"{'layer':>5} {'expert':>6} {'bias':>8}  {'harmful':^17}  {'harmless':^17}")
        for st in report.steered:
            f = st.freq
            lines.append(f"{st.layer:>5} {st.expert:>6} {st.bias:>8g}  {f.harmful['baseline']:7.4f} -> "
                         f"{f.harmful['intervened']:6.4f}  {f.harmless['baseline']:7.4f} -> {f.harmless['intervened']:6.4f}")
    return "\n".join(lines)


def plot(report: RouteReport, path: str, title: str | None = None) -> None:
    """Heat maps layers × experts: harmful baseline, harmful intervened, their difference, and the
    baseline harmful − harmless preference (which experts harmful prompts favour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report.layers
    if not rows:
        raise InputError("nothing to plot: the report has no MoE layers")
    layers = [r.layer for r in rows]
    base = np.array([r.freq.harmful["baseline"] for r in rows])
    new = np.array([r.freq.harmful["intervened"] for r in rows])
    diff = new - base
    pref = np.array([r.harmful_preference for r in rows])
    n_exp = base.shape[1]
    width = min(28.0, 6.0 + 0.12 * n_exp * 2)
    height = min(30.0, 3.0 + 0.28 * len(layers) * 2)
    fig, axes = plt.subplots(2, 2, figsize=(width, height), squeeze=False)
    vmax = float(max(base.max(), new.max()))
    panels = [
        (axes[0][0], base, "harmful, baseline", "viridis", 0.0, vmax),
        (axes[0][1], new, "harmful, intervened", "viridis", 0.0, vmax),
        (axes[1][0], diff, "harmful: intervened − baseline", "RdBu_r", None, None),
        (axes[1][1], pref, "baseline: harmful − harmless", "PuOr_r", None, None),
    ]
    for ax, data, name, cmap, lo, hi in panels:
        if lo is None:
            bound = float(np.abs(data).max()) or 1e-12
            lo, hi = -bound, bound
        im = ax.imshow(data, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        step = max(1, len(layers) // 24)  # at most ~24 labelled rows
        ax.set_yticks(range(0, len(layers), step))
        ax.set_yticklabels([str(layer) for layer in layers[::step]])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="selection frequency" if cmap == "viridis" else "Δ")
    s = report.summary
    fig.suptitle((title or "expert routing") + f" — top-k set changed on {100 * s.changed_fraction.harmful:.1f}% "
                 f"of harmful tokens, mean JS {s.js.harmful:.4f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["Condition", "CONDITIONS", "ExpertChange", "SteeredExpert", "steered_experts", "RoutingJS", "LayerRouting", "RoutingSummary",
           "RouteReport", "route_study", "route_config", "router_choices", "summarize", "selection_freq",
           "changed_fraction", "top_changes", "format_report", "plot"]
