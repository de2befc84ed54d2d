"""Router study: what an intervention does to expert selection, layer by layer.

    report = route_study(model, tokenizer, harmful, harmless,
                         intervention=lambda: intervene.apply(model, cfg))

Forward passes only (no generation). Every NON-PAD token of every chat-formatted prompt counts
(left padding; pad positions are excluded through the attention mask). For each MoE layer the
router's top-k choice is recorded per token, once on the model as is ("baseline") and once
inside ``intervention()`` ("intervened"), on the same tokens.

Definitions (natural logarithms throughout):

* ``freq[e]``  fraction of top-k token-slots that chose expert e: ``count(e) / (n_tokens · k)``.
  It sums to 1 over experts (uniform routing: 1/E); the same definition as the
  ``router.*_freq`` tensors of a measurements file.
* ``changed_fraction``  fraction of tokens whose top-k SET (order ignored) differs between
  baseline and intervened.
* ``js``  Jensen-Shannon divergence ``½KL(p‖m) + ½KL(q‖m)``, ``m = (p+q)/2``, between two
  ``freq`` vectors; 0 for identical routing, at most ln 2 ≈ 0.693.
* ``delta[e]``  intervened minus baseline ``freq[e]``; ``gained``/``lost`` list the experts with
  the largest positive/negative delta.
* ``harmful_preference[e]``  harmful minus harmless baseline ``freq[e]``: experts the model
  routes harmful prompts to more often (candidates for ``experts:`` subsets).

JSON report keys::

    kind: "route"; model; config; versions; num_experts; top_k
    prompts: {harmful: n, harmless: n}      tokens: {harmful: N, harmless: N}
    layers: [ {layer,                                  decoder layer index
               freq: {harmful: {baseline: [E], intervened: [E]}, harmless: {...}},
               changed_fraction: {harmful, harmless},
               js: {harmful, harmless,                  baseline vs intervened, per prompt set
                    harmful_vs_harmless_baseline, harmful_vs_harmless_intervened},
               delta: {harmful: [E], harmless: [E]},
               gained: {harmful: [{expert, delta}], harmless: [...]},  lost: {...},
               harmful_preference: [E]} ]
    summary: {changed_fraction: {harmful, harmless},   token-weighted over layers
              js: {harmful, harmless, harmful_vs_harmless_baseline, harmful_vs_harmless_intervened},
              most_changed_layer}                       layer with the largest harmful js
"""

from __future__ import annotations

import math
import sys
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Sequence

import torch

from ..arch import arch_for_config, text_config
from ..errors import ArchitectureError, InputError
from ..io.models import batches, encode, format_prompts, model_device

Intervention = Callable[[], AbstractContextManager]
SETS = ("harmful", "harmless")
CONDITIONS = ("baseline", "intervened")


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


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence (natural log) of two distributions (renormalised to sum 1)."""
    p = p.to(torch.float64) / p.sum()
    q = q.to(torch.float64) / q.sum()
    m = (p + q) / 2

    def kl(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x * (x.log() - m.log()), torch.zeros_like(x)).sum()

    return float(0.5 * kl(p) + 0.5 * kl(q))


def top_changes(delta: torch.Tensor, n: int, sign: int) -> list[dict[str, Any]]:
    """The ``n`` experts with the largest ``sign·delta`` (strictly > 0), as [{expert, delta}]."""
    order = torch.argsort(sign * delta, descending=True, stable=True)
    return [{"expert": int(e), "delta": float(delta[e])} for e in order[:n] if sign * float(delta[e]) > 0]


# ---- capture ------------------------------------------------------------------------------------

@torch.no_grad()
def router_choices(model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int = 16,
                   system_prompt: str | None = None, chat_template: bool = True, progress: bool = False,
                   desc: str = "routing") -> dict[int, torch.Tensor]:
    """Top-k expert indices per MoE layer over every non-pad token: ``{layer: [N_tokens, k]}``.

    Tokens are in prompt order, then position order, so two calls on the same prompts align
    token by token."""
    from tqdm.auto import tqdm

    from ..hooks.capture import capture, router_site

    spec = arch_for_config(model.config)
    config = text_config(model.config)
    moe_layers = [layer for layer in range(int(config.num_hidden_layers)) if spec.is_moe_layer(config, layer)]
    if not moe_layers:
        raise ArchitectureError(f"model type '{spec.name}' has no MoE layers: nothing to route")
    texts = format_prompts(tokenizer, prompts, system_prompt, chat_template)
    device = model_device(model)
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in moe_layers}
    with tqdm(total=len(texts), desc=desc, unit="prompt", file=sys.stderr, disable=not progress, leave=False) as bar:
        for chunk in batches(texts, batch_size):
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
                intervention: Intervention | None = None, batch_size: int = 16, system_prompt: str | None = None,
                chat_template: bool = True, top: int = 5, progress: bool = True,
                config: dict[str, Any] | None = None, model_name: str | None = None) -> dict[str, Any]:
    """Expert-selection statistics on harmful and harmless prompts, baseline vs ``intervention()``
    (a zero-argument callable returning a context manager). See the module docstring for keys."""
    from ..io.models import versions

    if not harmful or not harmless:
        raise InputError("route needs at least one harmful and one harmless prompt")
    spec = arch_for_config(model.config)
    num_experts = spec.num_experts(text_config(model.config))
    kw = dict(batch_size=batch_size, system_prompt=system_prompt, chat_template=chat_template, progress=progress)
    choices: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for condition in CONDITIONS:
        context = intervention() if (condition == "intervened" and intervention is not None) else nullcontext()
        with context:
            choices[condition] = {name: router_choices(model, tokenizer, prompts, desc=f"{condition}: {name}", **kw)
                                  for name, prompts in (("harmful", harmful), ("harmless", harmless))}
    return summarize(choices, num_experts, top=top) | {
        "kind": "route", "model": model_name, "config": config, "versions": versions(),
        "prompts": {"harmful": len(harmful), "harmless": len(harmless)},
        "intervened": intervention is not None,
    }


def summarize(choices: dict[str, dict[str, dict[int, torch.Tensor]]], num_experts: int,
              top: int = 5) -> dict[str, Any]:
    """The report body from ``choices[condition][set][layer] = [N, k]`` top-k indices."""
    base, new = choices["baseline"], choices["intervened"]
    layers_out = []
    weighted = {name: [0.0, 0] for name in SETS}
    layers = sorted(base["harmful"])
    for layer in layers:
        freq = {name: {c: selection_freq(choices[c][name][layer], num_experts) for c in CONDITIONS} for name in SETS}
        delta = {name: freq[name]["intervened"] - freq[name]["baseline"] for name in SETS}
        changed = {name: changed_fraction(base[name][layer], new[name][layer]) for name in SETS}
        for name in SETS:
            n = int(base[name][layer].shape[0])
            weighted[name][0] += changed[name] * n
            weighted[name][1] += n
        layers_out.append({
            "layer": layer,
            "freq": {name: {c: freq[name][c].tolist() for c in CONDITIONS} for name in SETS},
            "changed_fraction": changed,
            "js": {
                "harmful": js_divergence(freq["harmful"]["baseline"], freq["harmful"]["intervened"]),
                "harmless": js_divergence(freq["harmless"]["baseline"], freq["harmless"]["intervened"]),
                "harmful_vs_harmless_baseline": js_divergence(freq["harmful"]["baseline"], freq["harmless"]["baseline"]),
                "harmful_vs_harmless_intervened": js_divergence(freq["harmful"]["intervened"],
                                                                freq["harmless"]["intervened"]),
            },
            "delta": {name: delta[name].tolist() for name in SETS},
            "gained": {name: top_changes(delta[name], top, +1) for name in SETS},
            "lost": {name: top_changes(delta[name], top, -1) for name in SETS},
            "harmful_preference": (freq["harmful"]["baseline"] - freq["harmless"]["baseline"]).tolist(),
        })
    js_keys = ("harmful", "harmless", "harmful_vs_harmless_baseline", "harmful_vs_harmless_intervened")
    summary = {
        "changed_fraction": {name: (w / n if n else math.nan) for name, (w, n) in weighted.items()},
        "js": {k: (sum(row["js"][k] for row in layers_out) / len(layers_out) if layers_out else math.nan)
               for k in js_keys},
        "most_changed_layer": max(layers_out, key=lambda row: row["js"]["harmful"])["layer"] if layers_out else None,
    }
    top_k = int(base["harmful"][layers[0]].shape[-1]) if layers else 0
    return {
        "num_experts": num_experts, "top_k": top_k,
        "tokens": {name: int(base[name][layers[0]].shape[0]) if layers else 0 for name in SETS},
        "layers": layers_out, "summary": summary,
    }


# ---- presentation -------------------------------------------------------------------------------

def format_report(report: dict[str, Any], top: int = 3) -> str:
    """A printable per-layer table."""
    def pct(x: float) -> str:
        return "   n/a" if x != x else f"{100 * x:5.1f}%"

    def changes(items: list[dict[str, Any]]) -> str:
        return " ".join(f"{c['expert']}:{c['delta']:+.3f}" for c in items[:top]) or "-"

    lines = [f"routing on {report['tokens']['harmful']} harmful / {report['tokens']['harmless']} harmless tokens, "
             f"{report['num_experts']} experts, top-{report['top_k']}",
             f"{'layer':>5}  {'top-k changed':^17}  {'JS base→int':^17}  {'JS harmful↔harmless':^19}  "
             f"{'harmful: gained':<28}{'harmful: lost':<28}",
             f"{'':>5}  {'harmful':>8} {'harmless':>8}  {'harmful':>8} {'harmless':>8}  {'base':>9} {'int':>9}"]
    for row in report["layers"]:
        js = row["js"]
        lines.append(
            f"{row['layer']:>5}  {pct(row['changed_fraction']['harmful']):>8} {pct(row['changed_fraction']['harmless']):>8}  "
            f"{js['harmful']:>8.4f} {js['harmless']:>8.4f}  {js['harmful_vs_harmless_baseline']:>9.4f} "
            f"{js['harmful_vs_harmless_intervened']:>9.4f}  {changes(row['gained']['harmful']):<28}"
            f"{changes(row['lost']['harmful']):<28}")
    s = report["summary"]
    lines.append(f"{'all':>5}  {pct(s['changed_fraction']['harmful']):>8} {pct(s['changed_fraction']['harmless']):>8}  "
                 f"{s['js']['harmful']:>8.4f} {s['js']['harmless']:>8.4f}  {s['js']['harmful_vs_harmless_baseline']:>9.4f} "
                 f"{s['js']['harmful_vs_harmless_intervened']:>9.4f}  (mean JS over layers; changed: token-weighted)")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str, title: str | None = None) -> None:
    """Heat maps layers × experts: harmful baseline, harmful intervened, their difference, and the
    baseline harmful − harmless preference (which experts harmful prompts favour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = report["layers"]
    if not rows:
        raise InputError("nothing to plot: the report has no MoE layers")
    layers = [r["layer"] for r in rows]
    base = np.array([r["freq"]["harmful"]["baseline"] for r in rows])
    new = np.array([r["freq"]["harmful"]["intervened"] for r in rows])
    diff = new - base
    pref = np.array([r["harmful_preference"] for r in rows])
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
    s = report["summary"]
    fig.suptitle((title or "expert routing") + f" — top-k set changed on {100 * s['changed_fraction']['harmful']:.1f}% "
                 f"of harmful tokens, mean JS {s['js']['harmful']:.4f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["route_study", "router_choices", "summarize", "selection_freq", "changed_fraction", "js_divergence",
           "top_changes", "format_report", "plot"]
