#!/usr/bin/env python
"""Refused / degenerate / delayed-refusal counts at several answer lengths (issue 18, item 4).

    python benchmarks/answer_lengths.py                          # organism, its two shipped configs, every 8th/18th eval prompt
    python benchmarks/answer_lengths.py --every 1 1 --lengths 32 64 128 --json out.json

One greedy generation per model at the longest length; the shorter lengths are its prefixes (greedy
decoding on the same batches: the first N tokens of a 128-token answer are the N-token answer).
Each prefix is classified by :func:`intervene.live.evaluate.refusal_counts`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from intervene.runner import RunOptions

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def main() -> None:
    from intervene.config.schema import load_config
    from intervene.hooks.apply import apply
    from intervene.io.models import load_model
    from intervene.io.prompts import load_prompts
    from intervene.live.evaluate import decode_answers, generate_ids, refusal_counts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism")
    ap.add_argument("--configs", nargs="*", default=[str(CONFIGS / "organism.yaml"), str(CONFIGS / "organism_search.yaml")])
    ap.add_argument("--lengths", nargs="+", type=int, default=[32, 64, 128])
    ap.add_argument("--every", nargs=2, type=int, default=[8, 18], metavar=("HARMFUL", "HARMLESS"),
                    help="take every Nth eval prompt of each set (default: 8 18)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype="float32")
    prompts = {"harmful": load_prompts("builtin:harmful:eval")[::args.every[0]],
               "harmless": load_prompts("builtin:harmless:eval")[::args.every[1]]}
    longest = max(args.lengths)
    results, seconds = {}, {}
    for name in ["baseline", *args.configs]:
        started = time.time()
        context = (torch.no_grad() if name == "baseline" else apply(model, load_config(name)))
        with context:
            ids = {kind: generate_ids(model, tokenizer, ps, max_new_tokens=longest, run=RunOptions(progress=False))
                   for kind, ps in prompts.items()}
        results[name] = {n: {kind: refusal_counts(decode_answers(tokenizer, [a[:n] for a in ids[kind]])).to_dict()
                             for kind in prompts} for n in args.lengths}
        for n in args.lengths:
            row = results[name][n]
            print(f"{Path(name).name:<22} {n:>4} tokens  " + "  ".join(
                f"{kind} refused {c['refusals']}/{c['total']} degenerate {c['degenerate']} "
                f"delayed {c['delayed_refusals']}" for kind, c in row.items()))
        seconds[name] = round(time.time() - started, 1)
        print(f"  ({seconds[name]:.0f} s)")
    if args.json:
        from intervene.io.files import write_json
        from intervene.io.models import versions

        write_json(args.json, {"model": args.model, "every": args.every, "lengths": args.lengths, "threads": args.threads,
                               "results": results, "seconds": seconds, "versions": versions(),
                               "date": time.strftime("%Y-%m-%d %H:%M %Z"), "load_average": os.getloadavg()})


if __name__ == "__main__":
    main()
