#!/usr/bin/env python
"""The reference guide's MoE hypotheses, measured (issue 21 item 3, issue 16 item 5, issue 30 item 3).

    python benchmarks/moe_study.py                                 # organism-moe, measured on the train split
    python benchmarks/moe_study.py --model organism-moe-experts --json experts.json --markdown experts.md
    python benchmarks/moe_study.py --rows attention write+router_bias   # a subset of the rows
    python benchmarks/moe_study.py --combine moe.json experts.json --markdown side_by_side.md

Every row is one live intervention (hooks, nothing written) at the same direction and layers unless
the row says otherwise: the direction ``analyze`` recommends (its best layer) projected out of the
layers of its recommended band. Rows add one target at a time (attention; + the dense layers' MLP
down; + the routed experts' down; + the shared experts' down; + the routed experts' gate/up; + the
shared experts' gate/up; + the router input at ½ and at full scale), then expert deactivation
(``router_bias`` top:N at -inf over the MoE layers, alone and with the projection), then the layer
range (the band vs the MoE layers only vs every layer) and the scale (1.0 / 1.5 / 2.0).

The reference tool's rows (llm-abliteration's GLM-4.5-Air ``sharded_ablate.py``) are built as a reference-schema
config — one ``{layer, measurement, scale: 1, sparsity: 0}`` order per layer of the band, the same direction —
and translated by :func:`intervene.config.reference.translate` (norm-preserving, biprojected against the residual
entering each layer): ``reference-documented`` (o_proj + shared experts' down + router input at ½ on MoE layers,
o_proj + mlp down on dense ones, as its guide documents), ``reference-as-run`` (what its code did on GLM-4.5-Air:
the router's shape check skipped it, the dense layers matched no MoE key pattern so only their o_proj),
``ablate-individual-experts`` (+ every routed expert's down and gate/up; ``-as-run``: their down only, the code
skipped their gate/up) and ``expert-subset-attribution`` (the
same restricted per MoE layer to the ``--subset-top`` experts with the largest attribution value, ``analyze``'s
per-(layer, expert) rows). ``write-except-experts`` is every write site but the routed experts (attention, dense MLP,
shared experts' down: the edit the reference code made on GLM-4.5-Air, at scale 1); on an organism that records its
ground truth (``planted_experts`` in ``intervene_organism.json``: ``organism-moe-experts``) two more rows edit exactly
the planted experts: ``planted-bias`` (``router_bias: -inf`` on them) and ``planted-project`` (r projected out of
their outputs, ``targets: [experts]`` with ``experts: {layer: ids}``).

Columns, all on the built-in eval split (greedy, ``--max-new-tokens``):

* harmful / harmless: refused and degenerate answers (:func:`intervene.live.evaluate.classify`);
* KL: first-token KL(baseline ‖ intervened) on the harmless prompts (nats);
* changed: fraction of (token, MoE layer) pairs, over every non-pad prompt token of both sets,
  whose top-k expert SET differs from the baseline's (:func:`intervene.live.route.changed_fraction`);
* JS: Jensen-Shannon divergence of the expert-selection frequencies, harmful vs harmless, at the last
  prompt token, mean over the MoE layers (baseline in the header; intervened per row).

The JSON (one per model) holds every row's config, per-layer numbers, the attribution's regime and top experts, the
versions, the date and the load average; ``--combine`` renders several into one side-by-side table (a column group
per model, "—" where a model lacks a row).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import yaml

from intervene.arch import ArchSpec, arch_for_config, text_config
from intervene.config.reference import Order, ReferenceConfig, translate
from intervene.config.schema import InterventionConfig, parse_config
from intervene.hooks.apply import apply
from intervene.io.files import atomic_write_text
from intervene.io.measurements import Measurements, load_measurements, save_measurements
from intervene.io.models import load_model, versions
from intervene.io.prompts import load_prompts
from intervene.io.sources import resolve_model
from intervene.live.evaluate import (
    classify,
    decode_answers,
    first_token_logprobs,
    generate_ids,
    kl_divergence,
    refusal_counts,
)
from intervene.live.route import changed_fraction, router_choices, selection_freq
from intervene.live.tryout import prepare
from intervene.maths import js_divergence
from intervene.measure.analyze import analyze, recommend
from intervene.measure.attribution import Attribution
from intervene.measure.collect import measure
from intervene.products.organism import read_meta
from intervene.products.organism_moe import last_token_routing
from intervene.runner import RunOptions

Reference = Literal["documented", "as-run", "individual", "individual-as-run", "subset"]


@dataclass
class Row:
    name: str
    what: str  # one line for the table
    targets: list[str] | None = None  # None: no projection
    router_scale: float | None = None  # scale of the router target (when in targets)
    layers: str = "band"  # band | moe | all
    scale: float = 1.0
    router_bias_top: int | None = None
    reference: Reference | None = None  # a reference-schema config translated (module docstring)
    planted: Literal["bias", "project"] | None = None  # the organism's planted experts (ground truth) edited


@dataclass
class Study:
    """What every row's config is built from: one direction, one band, the model's MoE layers."""

    model: str
    measurements: str
    source: int  # the direction: output of decoder layer `source`
    band: list[int]
    moe_layers: list[int]
    num_layers: int
    spec: ArchSpec
    text_config: Any
    attribution: Attribution | None = None
    subset_top: int = 2
    planted: dict[int, list[int]] | None = None  # the organism's ground truth (intervene_organism.json)

    @property
    def layer_sets(self) -> dict[str, list[int]]:
        return {"band": self.band, "moe": self.moe_layers, "all": list(range(self.num_layers))}

    def top_experts(self) -> dict[int, list[int]]:
        """Per MoE layer of the band, the ``subset_top`` experts with the largest attribution value."""
        if self.attribution is None:
            return {}
        return {layer: sorted(int(r.expert) for r in self.attribution.ranked_experts([layer])[:self.subset_top])
                for layer in self.band if layer in self.moe_layers and self.attribution.ranked_experts([layer])}


def rows_for(has_dense_in_band: bool, bias_top: int, subset_top: int = 2, planted: bool = False) -> list[Row]:
    write = ["attention", "mlp", "experts", "shared_experts"]
    rows = [Row("attention", "attention only", ["attention"])]
    if has_dense_in_band:
        rows.append(Row("+mlp", "+ dense layers' MLP down", ["attention", "mlp"]))
    rows.append(Row("write-except-experts", "every write site but the routed experts (attention, dense MLP, shared "
                    "experts' down)", ["attention", "mlp", "shared_experts"]))
    if planted:
        rows += [Row("planted-bias", "ground truth: the planted experts deactivated (router_bias -inf)", planted="bias"),
                 Row("planted-project", "ground truth: r projected out of the planted experts' outputs",
                     planted="project")]
    rows += [
        Row("+experts", "+ routed experts' down", ["attention", "mlp", "experts"]),
        Row("write", "+ shared experts' down (every write site)", write),
        Row("+routed_in", "+ routed experts' gate/up (read)", write + ["routed_expert_inputs"]),
        Row("+expert_in", "+ shared experts' gate/up (read)", write + ["expert_inputs"]),
        Row("+router_half", "+ router input, ½ scale", write + ["expert_inputs", "router"], router_scale=0.5),
        Row("+router_full", "+ router input, full scale", write + ["expert_inputs", "router"], router_scale=1.0),
        Row("router_only", "router input only (full scale)", ["router"], router_scale=1.0),
        Row("bias_only", f"expert deactivation only (router_bias top:{bias_top}, -inf)", None,
            router_bias_top=bias_top),
        Row("bias_only_1", "expert deactivation only (router_bias top:1, -inf)", None, router_bias_top=1),
        Row("write+bias", f"every write site + router_bias top:{bias_top}", write, router_bias_top=bias_top),
        Row("write_moe", "every write site, MoE layers only", write, layers="moe"),
        Row("write_all", "every write site, every layer", write, layers="all"),
        Row("write_x1.5", "every write site, scale 1.5", write, scale=1.5),
        Row("write_x2", "every write site, scale 2.0", write, scale=2.0),
        Row("reference-documented", "reference defaults as documented (norm-preserving; MoE: o_proj + shared "
            "experts' down + router ½; dense: o_proj + mlp down)", reference="documented"),
        Row("reference-as-run", "reference defaults as its code ran (router skipped by its shape check; dense "
            "layers o_proj only)", reference="as-run"),
        Row("ablate-individual-experts", "reference + ablate_individual_experts (every routed expert's down + "
            "gate/up)", reference="individual"),
        Row("ablate-individual-experts-as-run", "reference + ablate_individual_experts as its code ran (experts' "
            "down only: their gate/up and the router skipped)", reference="individual-as-run"),
        Row("expert-subset-attribution", f"reference + ablate_individual_experts, expert_subset = the attribution's "
            f"top {subset_top} per MoE layer", reference="subset"),
    ]
    return rows


def row_config(row: Row, study: Study) -> InterventionConfig:
    """The native config a row runs (reference rows: translated from the reference schema)."""
    if row.reference is not None:
        return reference_config(row.reference, study, where=f"row {row.name}")
    data: dict[str, Any] = {"method": "project", "biprojection": True, "model": study.model,
                            "measurements": study.measurements, "ablate": []}
    layers = study.layer_sets[row.layers]
    if row.planted is not None:
        planted = study.planted or {}
        if row.planted == "bias":
            data["router_bias"] = [{"layers": [layer], "experts": ids, "bias": "-inf"} for layer, ids in planted.items()]
        else:
            data["ablate"] = [{"layers": sorted(planted), "measurement": study.source, "scale": 1.0,
                               "targets": ["experts"]}]
            data["experts"] = {layer: ids for layer, ids in planted.items()}
        return parse_config(data, where=f"row {row.name}")
    if row.targets is not None:
        scale: Any = row.scale
        if row.router_scale is not None:
            scale = {t: (row.router_scale if t == "router" else row.scale) for t in row.targets}
        data["ablate"] = [{"layers": layers, "measurement": study.source, "scale": scale, "targets": row.targets}]
    if row.router_bias_top is not None:
        data["router_bias"] = [{"layers": [i for i in layers if i in study.moe_layers] or study.moe_layers,
                                "experts": f"top:{row.router_bias_top}", "bias": "-inf"}]
    return parse_config(data, where=f"row {row.name}")


def reference_config(kind: Reference, study: Study, where: str) -> InterventionConfig:
    """The reference tool's config over the band (one order per layer, the study's direction, scale 1,
    sparsity 0), translated; ``as-run`` drops what its code skipped on GLM-4.5-Air (the router, the experts'
    gate/up, a dense layer's mlp), ``subset`` restricts the experts to the attribution's top ones per MoE layer."""
    ref = ReferenceConfig(
        orders=[Order(layer=layer, measurement=study.source + 1, scale=1.0, sparsity=0.0) for layer in study.band],
        model=study.model, measurements=study.measurements,
        ablate_individual_experts=kind in ("individual", "individual-as-run", "subset"), source=where,
        why="built by moe_study")
    cfg = translate(ref, study.spec, study.text_config).config
    if kind.endswith("as-run"):  # skipped by its code: the router, every expert's gate/up, a dense layer's mlp
        for entry in cfg.ablate:
            dense = not study.spec.is_moe_layer(study.text_config, entry.layers[0])
            entry.targets = [t for t in entry.targets
                             if t not in ("router", "routed_expert_inputs") and not (dense and t == "mlp")]
            entry.scale = {t: s for t, s in entry.scale.items() if t in entry.targets}
    if kind == "subset":
        top = study.top_experts()
        missing = [layer for layer in study.band if layer in study.moe_layers and layer not in top]
        if missing:
            raise SystemExit(f"{where}: no attribution rows for MoE layer(s) {missing} (measure with attribution, "
                             "the default) to pick the experts from")
        cfg.experts = top
    return parse_config(cfg.to_dict(), where=where)  # the dict round trip checks it as a YAML would be


def counts_dict(c: Any) -> dict[str, int]:
    return {"refused": c.refusals, "degenerate": c.degenerate, "complied": c.complied, "total": c.total}


def attribution_summary(study: Study) -> dict[str, Any] | None:
    a = study.attribution
    if a is None:
        return None
    return {"regime": a.regime, "experts_share": a.experts_share, "regime_line": a.regime_line(),
            "top_experts": {str(k): v for k, v in study.top_experts().items()}}


def planted_experts(model: str) -> dict[int, list[int]] | None:
    """The ground truth an organism records (``planted_experts`` of its ``intervene_organism.json``), if any."""
    meta = read_meta(resolve_model(model).path)
    planted = (meta or {}).get("planted_experts")
    return {int(k): [int(e) for e in v] for k, v in planted.items()} if planted else None


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    loads = [os.getloadavg()[0]]
    model, tokenizer = load_model(args.model, dtype="float32")
    spec, hf = arch_for_config(model.config), text_config(model.config)
    n_layers = int(hf.num_hidden_layers)
    moe_layers = [i for i in range(n_layers) if spec.is_moe_layer(hf, i)]
    if not moe_layers:
        sys.exit(f"{args.model}: not a MoE model")
    num_experts = spec.num_experts(hf)

    if args.measurements:
        meas: Measurements = load_measurements(args.measurements)
        meas_path = args.measurements
    else:
        meas = measure(model, tokenizer, load_prompts("builtin:harmful:train"), load_prompts("builtin:harmless:train"),
                       model_path=args.model)
        meas_path = str(Path(args.json).with_suffix(".measurements.safetensors"))
        save_measurements(meas, meas_path)
    report = analyze(meas)
    base_cfg = recommend(meas, model=args.model, measurements=meas_path, report=report)
    study = Study(model=args.model, measurements=meas_path, source=int(base_cfg.ablate[0].measurement),
                  band=list(base_cfg.ablate[0].layers), moe_layers=moe_layers, num_layers=n_layers, spec=spec,
                  text_config=hf, attribution=report.attribution, subset_top=args.subset_top,
                  planted=planted_experts(args.model))
    has_dense = any(i not in moe_layers for i in study.band)
    rows = rows_for(has_dense, args.bias_top, args.subset_top, planted=bool(study.planted))
    if args.rows:
        unknown = sorted(set(args.rows) - {r.name for r in rows})
        if unknown:
            sys.exit(f"unknown row(s) {unknown}; rows: {[r.name for r in rows]}")
        rows = [r for r in rows if r.name in args.rows]
    configs = {r.name: row_config(r, study) for r in rows}  # every row's config checked before any eval

    harmful = load_prompts("builtin:harmful:eval")[::args.every][:args.limit]
    harmless = load_prompts("builtin:harmless:eval")[::args.every][:args.limit]
    prompts = {"harmful": harmful, "harmless": harmless}
    attrib = attribution_summary(study)
    print(f"{args.model}: direction {study.source}, band {study.band[0]}..{study.band[-1]}, MoE layers "
          f"{moe_layers[0]}..{moe_layers[-1]}, {len(harmful)} + {len(harmless)} eval prompts, {args.max_new_tokens} "
          f"tokens; {attrib['regime_line'] if attrib else 'no attribution in the measurements'}", file=sys.stderr)

    def observe() -> dict[str, Any]:
        """Answers, first-token logprobs and routing of the model as it is now."""
        ids = {k: generate_ids(model, tokenizer, ps, max_new_tokens=args.max_new_tokens, run=RunOptions(progress=False))
               for k, ps in prompts.items()}
        texts = {k: decode_answers(tokenizer, v) for k, v in ids.items()}
        counts = {k: refusal_counts(texts[k], classify(texts[k], prompts[k])) for k in prompts}
        return {"counts": counts,
                "logprobs": first_token_logprobs(model, tokenizer, harmless, run=RunOptions(progress=False)),
                "choices": {k: router_choices(model, tokenizer, ps) for k, ps in prompts.items()},
                "last": {k: last_token_routing(model, tokenizer, ps) for k, ps in prompts.items()}}

    def last_js(obs: dict[str, Any]) -> dict[int, float]:
        return {i: js_divergence(selection_freq(obs["last"]["harmful"][i], num_experts),
                                 selection_freq(obs["last"]["harmless"][i], num_experts)) for i in moe_layers}

    with torch.no_grad():
        t = time.time()
        base = observe()
    base_js = last_js(base)
    results: dict[str, Any] = {
        "kind": "moe_study", "model": args.model, "model_type": getattr(hf, "model_type", None),
        "measurements": meas_path, "direction_layer": study.source, "band": study.band, "moe_layers": moe_layers,
        "max_new_tokens": args.max_new_tokens, "prompts": {k: len(v) for k, v in prompts.items()},
        "attribution": attrib, "planted_experts": {str(k): v for k, v in (study.planted or {}).items()} or None,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_threads": torch.get_num_threads(), "command": sys.argv,
        "baseline": {"harmful": counts_dict(base["counts"]["harmful"]), "harmless": counts_dict(base["counts"]["harmless"]),
                     "js_last_token": {str(i): v for i, v in base_js.items()},
                     "js_last_token_mean": sum(base_js.values()) / len(base_js), "seconds": round(time.time() - t, 1)},
        "rows": [],
    }
    print(f"baseline: harmful {base['counts']['harmful'].refusals}/{len(harmful)}, harmless "
          f"{base['counts']['harmless'].refusals}/{len(harmless)}, JS {results['baseline']['js_last_token_mean']:.4f} "
          f"({time.time() - t:.0f} s)", file=sys.stderr)

    for row in rows:
        t = time.time()
        cfg = configs[row.name]
        prepared = prepare(cfg, model=model, tokenizer=tokenizer, measurements=meas)
        with torch.no_grad(), apply(model, prepared.bound):
            obs = observe()
        js = last_js(obs)
        changed = {k: sum(changed_fraction(base["choices"][k][i], obs["choices"][k][i]) * len(base["choices"][k][i])
                          for i in moe_layers) / sum(len(base["choices"][k][i]) for i in moe_layers) for k in prompts}
        both = sum(changed[k] * sum(len(base["choices"][k][i]) for i in moe_layers) for k in prompts) / sum(
            len(base["choices"][k][i]) for k in prompts for i in moe_layers)
        out = {"name": row.name, "what": row.what, "config": cfg.to_dict(),
               "harmful": counts_dict(obs["counts"]["harmful"]), "harmless": counts_dict(obs["counts"]["harmless"]),
               "kl": kl_divergence(base["logprobs"], obs["logprobs"]),
               "changed_fraction": both, "changed_fraction_per_set": changed,
               "js_last_token": {str(i): v for i, v in js.items()}, "js_last_token_mean": sum(js.values()) / len(js),
               "seconds": round(time.time() - t, 1)}
        results["rows"].append(out)
        loads.append(os.getloadavg()[0])
        results["load_average"] = {"min": min(loads), "max": max(loads)}
        print(f"{row.name:<14} harmful {out['harmful']['refused']}/{len(harmful)} (+{out['harmful']['degenerate']} deg) "
              f"harmless {out['harmless']['refused']}/{len(harmless)} KL {out['kl']:.3f} changed {both:.3f} "
              f"JS {out['js_last_token_mean']:.4f} ({out['seconds']:.0f} s)", file=sys.stderr)
        atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")  # a partial study survives a stop

    results["seconds"] = round(time.time() - started, 1)
    results["load_average"] = {"min": min(loads), "max": max(loads)}
    atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism-moe", help="any MODEL spec (default organism-moe)")
    ap.add_argument("--measurements", default=None,
                    help="measurements file (default: measure the model on the train split and save it beside --json)")
    ap.add_argument("--rows", nargs="*", default=None, help="run only these rows (names in the table)")
    ap.add_argument("--bias-top", type=int, default=2, help="N of router_bias top:N (default 2)")
    ap.add_argument("--subset-top", type=int, default=2,
                    help="expert-subset-attribution: the N experts per MoE layer with the largest attribution (default 2)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--limit", type=int, default=None, help="first N eval prompts of each set (quick runs)")
    ap.add_argument("--every", type=int, default=1, help="every Nth eval prompt of each set (spread over the categories)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--json", default="moe_study.json")
    ap.add_argument("--markdown", default=None, help="also write the table here")
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                    help="render these study JSONs (one per model) side by side into --markdown; runs nothing")
    args = ap.parse_args(argv)
    if args.combine:
        studies = [json.loads(Path(p).read_text()) for p in args.combine]
        table = combined_markdown(studies)
    else:
        table = markdown(run_study(args))
    print(table)
    if args.markdown:
        atomic_write_text(args.markdown, table + "\n")
    return 0


def _cell(c: dict[str, int] | None, n: int) -> str:
    if c is None:
        return "—"
    return f"{c['refused']}/{n}" + (f" (+{c['degenerate']} deg.)" if c["degenerate"] else "")


def label(results: dict[str, Any]) -> str:
    return Path(results["model"]).name  # a MODEL spec (organism-moe) or a directory's name


def header_lines(results: dict[str, Any]) -> list[str]:
    """Where a study's numbers come from: model, regime, prompts, date, machine load, versions (one bullet)."""
    a = results.get("attribution")
    load = results.get("load_average") or {}
    vers = ", ".join(f"{k} {v}" for k, v in sorted((results.get("versions") or {}).items()))
    return [f"- **{label(results)}** ({results.get('model_type') or '?'}): "
            + (a["regime_line"] if a else "no attribution in the measurements")
            + (f"; top experts per layer {a['top_experts']}" if a and a.get("top_experts") else "")
            + f"; direction {results['direction_layer']}, band {results['band'][0]}..{results['band'][-1]}; "
            f"{results['prompts']['harmful']} + {results['prompts']['harmless']} eval prompts, "
            f"{results['max_new_tokens']} tokens; {results['date']}, load average "
            f"{load.get('min', float('nan')):.1f}–{load.get('max', float('nan')):.1f}, "
            f"{results.get('torch_threads', '?')} torch threads, {results.get('seconds', '?')} s; {vers}"]


def configs_block(studies: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["", "<details><summary>every row's config</summary>", ""]
    for results in studies:
        for r in results["rows"]:
            lines += [f"`{label(results)}` · `{r['name']}`:", "", "```yaml",
                      yaml.safe_dump(r["config"], sort_keys=False, default_flow_style=None, width=120).rstrip(), "```", ""]
    return lines + ["</details>"]


def markdown(results: dict[str, Any]) -> str:
    b = results["baseline"]
    nh, nl = results["prompts"]["harmful"], results["prompts"]["harmless"]
    lines = header_lines(results) + ["",
             "| row | harmful refused | harmless refused | first-token KL | top-k set changed | JS harmful vs harmless (last token) |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| no edit | {_cell(b['harmful'], nh)} | {_cell(b['harmless'], nl)} | 0 | 0 | {b['js_last_token_mean']:.4f} |"]
    for r in results["rows"]:
        lines.append(f"| {r['what']} | {_cell(r['harmful'], nh)} | {_cell(r['harmless'], nl)} | {r['kl']:.3f} | "
                     f"{r['changed_fraction']:.1%} | {r['js_last_token_mean']:.4f} |")
    return "\n".join(lines + configs_block([results]))


def combined_markdown(studies: Sequence[dict[str, Any]]) -> str:
    """One table, a column group (harmful refused, harmless refused, KL, top-k changed) per study, rows matched
    by name in order of first appearance; "—" where a study lacks the row."""
    if not studies:
        raise SystemExit("--combine: no study JSON given")
    order: dict[str, str] = {}
    for results in studies:
        for r in results["rows"]:
            order.setdefault(r["name"], r["what"])
    head = ["| row |"]
    rule = ["| --- |"]
    for results in studies:
        m = label(results)
        head.append(f" {m}: harmful | {m}: harmless | {m}: KL | {m}: changed |")
        rule.append(" --- | --- | --- | --- |")
    lines = []
    for results in studies:
        lines += header_lines(results)
    lines += ["", "".join(head), "".join(rule)]
    base = ["| no edit |"]
    for results in studies:
        b, p = results["baseline"], results["prompts"]
        base.append(f" {_cell(b['harmful'], p['harmful'])} | {_cell(b['harmless'], p['harmless'])} | 0 | 0 |")
    lines.append("".join(base))
    for name, what in order.items():
        cells = [f"| {what} |"]
        for results in studies:
            r = next((x for x in results["rows"] if x["name"] == name), None)
            p = results["prompts"]
            if r is None:
                cells.append(" — | — | — | — |")
            else:
                cells.append(f" {_cell(r['harmful'], p['harmful'])} | {_cell(r['harmless'], p['harmless'])} | "
                             f"{r['kl']:.3f} | {r['changed_fraction']:.1%} |")
        lines.append("".join(cells))
    return "\n".join(lines + configs_block(studies))


if __name__ == "__main__":
    sys.exit(main())
