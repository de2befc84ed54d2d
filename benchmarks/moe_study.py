#!/usr/bin/env python
"""The reference guide's MoE hypotheses, measured (issue 21 item 3, issue 16 item 5).

    python benchmarks/moe_study.py                                 # organism-moe, measured on the train split
    python benchmarks/moe_study.py --measurements m.safetensors --json study.json --markdown study.md
    python benchmarks/moe_study.py --rows attention write+router_bias   # a subset of the rows

Every row is one live intervention (hooks, nothing written) at the same direction and layers unless
the row says otherwise: the direction ``analyze`` recommends (its best layer) projected out of the
layers of its recommended band. Rows add one target at a time (attention; + the dense layers' MLP
down; + the routed experts' down; + the shared experts' down; + the routed experts' gate/up; + the
shared experts' gate/up; + the router input at ½ and at full scale), then expert deactivation
(``router_bias`` top:N at -inf over the MoE layers, alone and with the projection), then the layer
range (the band vs the MoE layers only vs every layer) and the scale (1.0 / 1.5 / 2.0).

Columns, all on the built-in eval split (greedy, ``--max-new-tokens``):

* harmful / harmless: refused and degenerate answers (:func:`intervene.live.evaluate.classify`);
* KL: first-token KL(baseline ‖ intervened) on the harmless prompts (nats);
* changed: fraction of (token, MoE layer) pairs, over every non-pad prompt token of both sets,
  whose top-k expert SET differs from the baseline's (:func:`intervene.live.route.changed_fraction`);
* JS: Jensen-Shannon divergence of the expert-selection frequencies, harmful vs harmless, at the last
  prompt token, mean over the MoE layers (baseline in the header; intervened per row).

The JSON holds every row's config, per-layer numbers, the versions, the date and the load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass
class Row:
    name: str
    what: str  # one line for the table
    targets: list[str] | None = None  # None: no projection
    router_scale: float | None = None  # scale of the router target (when in targets)
    layers: str = "band"  # band | moe | all
    scale: float = 1.0
    router_bias_top: int | None = None


def rows_for(has_dense_in_band: bool, bias_top: int) -> list[Row]:
    write = ["attention", "mlp", "experts", "shared_experts"]
    rows = [Row("attention", "attention only", ["attention"])]
    if has_dense_in_band:
        rows.append(Row("+mlp", "+ dense layers' MLP down", ["attention", "mlp"]))
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
    ]
    return rows


def main() -> None:
    from intervene.arch import arch_for_config, text_config
    from intervene.config.schema import parse_config
    from intervene.hooks.apply import apply
    from intervene.io.measurements import load_measurements, save_measurements
    from intervene.io.models import load_model, versions
    from intervene.io.prompts import load_prompts
    from intervene.live.evaluate import (classify, decode_answers, first_token_logprobs, generate_ids,
                                         kl_divergence, refusal_counts)
    from intervene.live.route import changed_fraction, router_choices, selection_freq
    from intervene.live.tryout import prepare
    from intervene.maths import js_divergence
    from intervene.measure.analyze import analyze, recommend
    from intervene.measure.collect import measure
    from intervene.products.organism_moe import last_token_routing

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism-moe")
    ap.add_argument("--measurements", default=None,
                    help="measurements file (default: measure the model on the train split and save it beside --json)")
    ap.add_argument("--rows", nargs="*", default=None, help="run only these rows (names in the table)")
    ap.add_argument("--bias-top", type=int, default=2, help="N of router_bias top:N (default 2)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--limit", type=int, default=None, help="first N eval prompts of each set (quick runs)")
    ap.add_argument("--every", type=int, default=1, help="every Nth eval prompt of each set (spread over the categories)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--json", default="moe_study.json")
    ap.add_argument("--markdown", default=None, help="also write the table here")
    args = ap.parse_args()
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
        meas = load_measurements(args.measurements)
        meas_path = args.measurements
    else:
        meas = measure(model, tokenizer, load_prompts("builtin:harmful:train"), load_prompts("builtin:harmless:train"),
                       model_path=args.model)
        meas_path = str(Path(args.json).with_suffix(".measurements.safetensors"))
        save_measurements(meas, meas_path)
    report = analyze(meas)
    base_cfg = recommend(meas, model=args.model, measurements=meas_path, report=report)
    source = int(base_cfg.ablate[0].measurement)
    band = list(base_cfg.ablate[0].layers)
    layer_sets = {"band": band, "moe": moe_layers, "all": list(range(n_layers))}
    has_dense = any(i not in moe_layers for i in band)
    rows = rows_for(has_dense, args.bias_top)
    if args.rows:
        unknown = sorted(set(args.rows) - {r.name for r in rows})
        if unknown:
            sys.exit(f"unknown row(s) {unknown}; rows: {[r.name for r in rows]}")
        rows = [r for r in rows if r.name in args.rows]

    harmful = load_prompts("builtin:harmful:eval")[::args.every][:args.limit]
    harmless = load_prompts("builtin:harmless:eval")[::args.every][:args.limit]
    prompts = {"harmful": harmful, "harmless": harmless}
    print(f"{args.model}: direction {source}, band {band[0]}..{band[-1]}, MoE layers {moe_layers[0]}..{moe_layers[-1]}, "
          f"{len(harmful)} + {len(harmless)} eval prompts, {args.max_new_tokens} tokens", file=sys.stderr)

    def observe() -> dict[str, Any]:
        """Answers, first-token logprobs and routing of the model as it is now."""
        ids = {k: generate_ids(model, tokenizer, ps, max_new_tokens=args.max_new_tokens, progress=False)
               for k, ps in prompts.items()}
        texts = {k: decode_answers(tokenizer, v) for k, v in ids.items()}
        counts = {k: refusal_counts(texts[k], classify(texts[k], prompts[k])) for k in prompts}
        return {"counts": counts,
                "logprobs": first_token_logprobs(model, tokenizer, harmless, progress=False),
                "choices": {k: router_choices(model, tokenizer, ps) for k, ps in prompts.items()},
                "last": {k: last_token_routing(model, tokenizer, ps) for k, ps in prompts.items()}}

    def last_js(obs: dict[str, Any]) -> dict[int, float]:
        return {i: js_divergence(selection_freq(obs["last"]["harmful"][i], num_experts),
                                 selection_freq(obs["last"]["harmless"][i], num_experts)) for i in moe_layers}

    def counts_dict(c: Any) -> dict[str, int]:
        return {"refused": c.refusals, "degenerate": c.degenerate, "complied": c.complied, "total": c.total}

    with torch.no_grad():
        t = time.time()
        base = observe()
    base_js = last_js(base)
    results: dict[str, Any] = {
        "kind": "moe_study", "model": args.model, "measurements": meas_path, "direction_layer": source,
        "band": band, "moe_layers": moe_layers, "max_new_tokens": args.max_new_tokens,
        "prompts": {k: len(v) for k, v in prompts.items()}, "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
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
        data: dict[str, Any] = {"method": "project", "biprojection": True, "model": args.model,
                                "measurements": meas_path, "ablate": []}
        layers = layer_sets[row.layers]
        if row.targets is not None:
            scale: Any = row.scale
            if row.router_scale is not None:
                scale = {t_: (row.router_scale if t_ == "router" else row.scale) for t_ in row.targets}
            data["ablate"] = [{"layers": layers, "measurement": source, "scale": scale, "targets": row.targets}]
        if row.router_bias_top is not None:
            data["router_bias"] = [{"layers": [i for i in layers if i in moe_layers] or moe_layers,
                                    "experts": f"top:{row.router_bias_top}", "bias": "-inf"}]
        cfg = parse_config(data, where=f"row {row.name}")
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
        print(f"{row.name:<14} harmful {out['harmful']['refused']}/{len(harmful)} (+{out['harmful']['degenerate']} deg) "
              f"harmless {out['harmless']['refused']}/{len(harmless)} KL {out['kl']:.3f} changed {both:.3f} "
              f"JS {out['js_last_token_mean']:.4f} ({out['seconds']:.0f} s)", file=sys.stderr)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")  # a partial study survives a stop

    results["seconds"] = round(time.time() - started, 1)
    results["load_average"] = {"min": min(loads), "max": max(loads)}
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


def markdown(results: dict[str, Any]) -> str:
    b = results["baseline"]
    nh, nl = results["prompts"]["harmful"], results["prompts"]["harmless"]

    def cell(c: dict[str, int], n: int) -> str:
        return f"{c['refused']}/{n}" + (f" (+{c['degenerate']} deg.)" if c["degenerate"] else "")

    lines = ["| row | harmful refused | harmless refused | first-token KL | top-k set changed | JS harmful vs harmless (last token) |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| no edit | {cell(b['harmful'], nh)} | {cell(b['harmless'], nl)} | 0 | 0 | {b['js_last_token_mean']:.4f} |"]
    for r in results["rows"]:
        lines.append(f"| {r['what']} | {cell(r['harmful'], nh)} | {cell(r['harmless'], nl)} | {r['kl']:.3f} | "
                     f"{r['changed_fraction']:.1%} | {r['js_last_token_mean']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
