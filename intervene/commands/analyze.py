"""``intervene analyze``: per-layer statistics of a measurements file, plot, recommended config."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..arch import text_config
from ..errors import InputError
from ..io.files import write_json
from ..io.measurements import load_measurements
from ..io.sources import check_supported, load_model_config
from ..measure.analyze import DEFAULT_BAND, analyze, recommend
from .common import add_verb

SUMMARY = "which layers carry the direction: cos, norms, SNR, signal quality, router divergence"
DESCRIPTION = """Per layer: cos(harmful_mean, harmless_mean), the norms, SNR = |r| / mean(|h|, |m|) and signal quality =
(1 - cos) * SNR; on MoE models the Jensen-Shannon divergence (nats) of expert frequencies and the
experts over-selected on harmful prompts. Recommends a config: the direction from the best-quality layer
within the depth band, edited from BEFORE layers ahead of it to AFTER layers past it (default: a quarter
of the depth before, through the last layer). Files measured with attribution also get where the direction
grows, by component (attention, dense MLP, shared experts, each routed expert) and the regime it names
(experts / mixed / residual), which the recommended config follows."""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_verb(sub, "analyze", run, summary=SUMMARY, description=DESCRIPTION)
    p.add_argument("measurements", help="measurements file (.safetensors from 'intervene measure', or a .refuse file)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a plot of the per-layer curves")
    p.add_argument("--config-out", default=None, metavar="YAML", help="write the recommended intervention config")
    p.add_argument("--json", default=None, metavar="FILE", help="write the full analysis as JSON")
    p.add_argument("--model", default=None,
                   help="model to put in the config (default: the one recorded in the file); its config is checked "
                        "against the measurements (hidden size, layer count)")
    p.add_argument("--band", nargs=2, type=float, default=None, metavar=("LO", "HI"),
                   help="depth band (fractions of the layer count) searched for the source layer (default: 0.30 0.85)")
    p.add_argument("--before", type=int, default=None, help="edited layers start this many layers before the source")
    p.add_argument("--after", type=int, default=None, help="edited layers end this many layers after the source "
                                                           "(default: the last layer)")
    p.add_argument("--top-experts", type=int, default=5, help="over-selected experts listed per MoE layer (default: 5)")
    p.add_argument("--expert-plot", default=None, metavar="PNG",
                   help="MoE: heat map layers x experts of the risk difference p_harmful - p_harmless (last-token "
                        "statistics where the file has them)")
    p.add_argument("--attribution-plot", default=None, metavar="PNG",
                   help="plot where the refusal direction grows: each component's write along each layer's direction "
                        "(files measured with attribution; needs matplotlib)")
    p.add_argument("--attribution-layer", type=int, default=None, metavar="L",
                   help="print (and plot) every routed expert's attribution at layer L")
    p.add_argument("--router-bias-top", type=int, default=None, metavar="N",
                   help="MoE: add router_bias (experts: 'top:N', bias -inf) over the suggested layers to the "
                        "recommended config")
    return p


def run(args: argparse.Namespace) -> int:
    band = tuple(args.band) if args.band else DEFAULT_BAND
    if not 0 <= band[0] <= band[1] <= 1:
        raise InputError(f"--band must be two fractions 0 <= LO <= HI <= 1, got {band[0]} {band[1]}")
    meas = load_measurements(args.measurements)
    if args.model:  # the config will name this model: check the measurements belong to it
        check_supported(args.model)
        tconf = text_config(load_model_config(args.model))
        meas.check_model(int(tconf.hidden_size), int(tconf.num_hidden_layers), what=f"model {args.model}")
    report = analyze(meas, band=band, top_experts=args.top_experts)
    print(report.table())
    if (args.attribution_plot or args.attribution_layer is not None) and report.attribution is None:
        raise InputError(f"{args.measurements} has no attribution.* tensors (measured with --no-attribution, or by an "
                         "older intervene): re-measure to get the attribution")
    if args.attribution_layer is not None:
        print(report.attribution.table(layer=args.attribution_layer))
    if args.attribution_plot:
        report.attribution.plot(args.attribution_plot, layer=args.attribution_layer, source=args.measurements)
        print(f"attribution plot -> {args.attribution_plot}")
    if args.plot:
        report.plot(args.plot)
        print(f"plot -> {args.plot}")
    if args.expert_plot:
        report.plot_experts(args.expert_plot)
        print(f"expert heat map -> {args.expert_plot}")
    if args.json:
        write_json(args.json, report.to_dict())
        print(f"analysis -> {args.json}")
    if args.config_out:
        out = Path(args.config_out)
        # the measurements path is written relative to the config file, where load_config looks first
        rel = os.path.relpath(os.path.abspath(args.measurements), os.path.abspath(out.parent or "."))
        cfg = recommend(meas, model=args.model, measurements=rel, band=band, before=args.before, after=args.after,
                        report=report, router_bias_top=args.router_bias_top)
        out.parent.mkdir(parents=True, exist_ok=True)
        cfg.save(out)
        print(f"recommended config -> {out}: {cfg.notes}")
        print(f"next: intervene try {out}")
    return 0
