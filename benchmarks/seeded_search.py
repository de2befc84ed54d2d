#!/usr/bin/env python
"""The trials a diagnosis-seeded search saves (issue 30 item 2).

    python benchmarks/seeded_search.py --model organism-moe --measurements m.safetensors --trials 8
    python benchmarks/seeded_search.py --model organism-moe-experts --measurements e.safetensors --trials 8 \\
        --json benchmarks/results/seeded_search_experts.json

Runs ``intervene search`` twice on the same model, measurements, prompts, trial budget and sampler seed: once as
it runs by default (the first trial is ``analyze``'s recommended config, :class:`~intervene.search.study.SearchSettings`
``seed_from_diagnosis=True``) and once without that seed (the sampler's own draws from the first trial). The space
is the default one in both, so on a ``residual``-regime model the routed experts' scales are left out in both runs
(the regime's other saving, a smaller space, is not what this measures).

For each run: the first trial (1-based count of trials run) at which the search reached the bar —
``generation``: a trial whose greedy-generation refusal rate on the search's harmful prompts is ≤ ``--bar-rate`` at
first-token KL ≤ ``--kl-cap`` (only trials that enter the running proxy front are generated, as in every search);
``proxy``: refusal proxy ≤ ``--proxy-fraction`` × the baseline's at KL ≤ ``--kl-cap`` —, the best-so-far after every
trial (:func:`intervene.search.pareto.best_so_far` at ``--bar-rate``), the final front, and the difference
(``trials_saved`` = unseeded − seeded; ``{"at_least": n}`` when only the seeded run reached the bar). One JSON, with
the settings, versions, date and load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from intervene.io.files import atomic_write_text
from intervene.io.models import versions
from intervene.runner import RunOptions
from intervene.search.pareto import best_so_far
from intervene.search.report import SearchResult, TrialRecord
from intervene.search.study import SearchPrompts, SearchSettings, search

RUNS = (("seeded", True), ("unseeded", False))


def first_at_bar(records: Sequence[TrialRecord], *, bar_rate: float, kl_cap: float, proxy_bar: float
                 ) -> dict[str, int | None]:
    """The 1-based count of trials after which each bar was first met (None: never)."""
    generation = next((i for i, r in enumerate(records, 1) if r.refusal_rate is not None
                       and r.refusal_rate <= bar_rate and r.kl <= kl_cap), None)
    proxy = next((i for i, r in enumerate(records, 1) if r.proxy <= proxy_bar and r.kl <= kl_cap), None)
    return {"generation": generation, "proxy": proxy}


def saved(seeded: int | None, unseeded: int | None, trials: int) -> int | dict[str, int] | None:
    """Trials the seed saved: unseeded - seeded; a bound when only one run got there (the other would have
    needed at least ``trials + 1``)."""
    if seeded is None:
        return None if unseeded is None else {"at_most": unseeded - trials - 1}
    if unseeded is None:
        return {"at_least": trials + 1 - seeded}
    return unseeded - seeded


def trajectory(records: Sequence[TrialRecord], bar_rate: float) -> list[dict[str, Any]]:
    out = []
    for i in range(1, len(records) + 1):
        best = best_so_far(records[:i], bar_rate)
        out.append({"after": i, "trial": best.number, "refusals": best.refusals, "total": best.total,
                    "kl": best.kl, "proxy": best.proxy})
    return out


def run_once(args: argparse.Namespace, name: str, seeded: bool) -> tuple[SearchResult, float]:
    out = Path(args.work) / name
    if (out / "study.db").exists():
        raise SystemExit(f"{out / 'study.db'} exists: a search there would resume it; pass a fresh --work")
    settings = SearchSettings(trials=args.trials, seed=args.seed, startup_trials=args.startup_trials,
                              full_eval_top=args.full_eval_top, target_refusal_rate=args.bar_rate,
                              seed_from_diagnosis=seeded)
    prompts = SearchPrompts(limit=args.limit, eval_limit=args.eval_limit, max_new_tokens=args.max_new_tokens,
                            search_new_tokens=args.search_new_tokens)
    start = time.time()
    result = search(args.model, args.measurements, out, settings=settings, prompts=prompts,
                    run=RunOptions(dtype=args.dtype, batch_size=args.batch_size, progress=args.progress))
    return result, time.time() - start


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism-moe", help="any MODEL spec (default organism-moe)")
    ap.add_argument("--measurements", required=True, help="its measurements (with attribution: the regime)")
    ap.add_argument("--trials", type=int, default=8, help="trials per run (default 8)")
    ap.add_argument("--seed", type=int, default=0, help="sampler seed, the same for both runs")
    ap.add_argument("--startup-trials", type=int, default=10, help="random trials before TPE (search's default 10)")
    ap.add_argument("--bar-rate", type=float, default=0.10, help="generation bar: refusal rate <= this (default 0.10)")
    ap.add_argument("--kl-cap", type=float, default=0.2, help="... at first-token KL <= this (default 0.2)")
    ap.add_argument("--proxy-fraction", type=float, default=0.25,
                    help="proxy bar: refusal proxy <= this x the baseline's, at KL <= --kl-cap (default 0.25)")
    ap.add_argument("--limit", type=int, default=64, help="search prompts of each set (search's default 64)")
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--full-eval-top", type=int, default=0,
                    help="front members re-scored on the eval split (default 0: the search-generation front)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--search-new-tokens", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--work", default="seeded_search_work", help="the two studies go to WORK/seeded, WORK/unseeded")
    ap.add_argument("--json", default=None,
                    help="default benchmarks/results/seeded_search_<model>_<date>.json")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    date = datetime.datetime.now(datetime.timezone.utc)
    path = Path(args.json or Path(__file__).parent / "results" /
                f"seeded_search_{Path(args.model).name}_{date.date().isoformat()}.json")
    loads = [os.getloadavg()[0]]
    doc: dict[str, Any] = {
        "kind": "seeded_search", "model": args.model, "measurements": args.measurements,
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "progress")},
        "bar": {"generation": f"refusal rate <= {args.bar_rate} on the search's harmful prompts (greedy, "
                              f"{args.search_new_tokens} tokens) at first-token KL <= {args.kl_cap}",
                "proxy": f"refusal proxy <= {args.proxy_fraction} x baseline at KL <= {args.kl_cap}"},
        "versions": versions(), "date": date.isoformat(timespec="seconds"), "command": sys.argv, "runs": {},
    }
    for name, seeded in RUNS:
        result, seconds = run_once(args, name, seeded)
        loads.append(os.getloadavg()[0])
        proxy_bar = args.proxy_fraction * float(result.baseline["proxy"])
        reached = first_at_bar(result.records, bar_rate=args.bar_rate, kl_cap=args.kl_cap, proxy_bar=proxy_bar)
        doc["baseline"] = result.baseline
        doc["runs"][name] = {
            "seed_from_diagnosis": seeded, "trials": len(result.records), "seconds": round(seconds, 1),
            "first_trial_params": result.records[0].params if result.records else None,
            "reached_bar_after": reached, "best_so_far": trajectory(result.records, args.bar_rate),
            "front_basis": result.basis, "front": [r.summary() for r in result.front],
            "records": [r.summary() for r in result.records], "out_dir": str(result.out_dir)}
        print(f"{name}: bar reached after {reached} trials ({seconds:.0f} s)", file=sys.stderr)
    s, u = doc["runs"]["seeded"]["reached_bar_after"], doc["runs"]["unseeded"]["reached_bar_after"]
    doc["trials_saved"] = {k: saved(s[k], u[k], args.trials) for k in s}
    doc["load_average"] = {"min": min(loads), "max": max(loads)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=1, default=str) + "\n")
    print(json.dumps({"trials_saved": doc["trials_saved"], "seeded": s, "unseeded": u, "json": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
