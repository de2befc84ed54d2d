#!/usr/bin/env python
"""intervene's search against its peers (heretic, abliterix; senbonzakura on request) on a model organism.

Every opponent gets the same model, the same train prompts (directions and search objective), the same
trial budget and start-up trials, the same seed and search answer length; each runs its own search with
its own judge (heretic's and abliterix's keyword detectors, never an external judge API). Every member of
each opponent's own front is then met by ONE judge on the held-out eval prompts (``peers/judge.py``):
refused / degenerate / complied at ``--max-new-tokens`` greedy tokens, first-token KL and full-answer KL
against the organism, and the perplexity ratio of ``intervene eval --capability``. Per opponent it
records its front, trials per hour, the tensors it edits (read from each saved checkpoint against the
organism's, never assumed) and, when it fails, the error and how far it got.

    scripts/peer_venvs.sh                                   # the opponents' venvs (once)
    python benchmarks/vs_peers.py --model organism --trials 16 --json benchmarks/results/vs_peers_organism_DATE.json
    python benchmarks/vs_peers.py --model organism --trials 2 --limit 16 --eval-limit 8 --opponents abliterix heretic

heretic and abliterix are opponents, never dependencies: each runs as a child process from its own venv
(``--heretic-python``, ``--abliterix-python``), offline, on prompt files written into ``--work``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))
sys.path.insert(0, str(BENCHMARKS))

from intervene.errors import InterveneError  # noqa: E402
from intervene.io.files import atomic_write_text, write_json  # noqa: E402
from intervene.io.prompts import load_prompts  # noqa: E402
from intervene.io.sources import resolve_model  # noqa: E402
from peers import abliterix, heretic, senbonzakura  # noqa: E402
from peers.base import Opponent, OpponentFailure, Setup, read_lines  # noqa: E402
from peers.records import OpponentRun, markdown_table, results_doc, text_report  # noqa: E402

OPPONENTS = ("intervene", "heretic", "abliterix", "senbonzakura")
MODELS = ("organism", "organism-moe", "organism-moe-experts")


def write_prompts(work: Path, limit: int | None, eval_limit: int | None) -> dict[str, Path]:
    """The built-in prompt sets as files, one prompt a line (whitespace folded): what every tool reads."""
    out = {}
    (work / "prompts").mkdir(parents=True, exist_ok=True)
    for kind in ("harmful", "harmless"):
        for split, lim in (("train", limit), ("eval", eval_limit)):
            path = work / "prompts" / f"{kind}_{split}.txt"
            path.write_text("\n".join(" ".join(p.split()) for p in load_prompts(f"builtin:{kind}:{split}", limit=lim))
                            + "\n")
            out[f"{kind}_{split}"] = path
    return out


def model_dir(spec: str) -> Path:
    """The organism names, or a model directory."""
    path = Path(resolve_model(spec).path).resolve()  # an unbuilt organism: InputError naming its build command
    if not (path / "config.json").exists():
        raise InterveneError(f"--model {spec}: no config.json in {path}")
    return path


def make_opponents(names: list[str], args: argparse.Namespace, model, tokenizer) -> list[Opponent]:
    from peers.intervene_search import InterveneSearch

    made = {"intervene": lambda: InterveneSearch(model, tokenizer),
            "heretic": lambda: heretic.Heretic(Path(args.heretic_python).expanduser()),
            "abliterix": lambda: abliterix.Abliterix(Path(args.abliterix_python).expanduser()),
            "senbonzakura": lambda: senbonzakura.Senbonzakura(Path(args.senbonzakura_python).expanduser())}
    return [made[n]() for n in names]


def run_opponent(opponent: Opponent, setup: Setup) -> OpponentRun:
    """Its run; a missing venv is ``skipped``, any failure ``failed`` with its error and progress."""
    reason = opponent.unavailable()
    if reason is not None:
        return OpponentRun(opponent.name, "-", "skipped", setup.trials, error=reason)
    try:
        version = opponent.version()
    except Exception as e:  # noqa: BLE001 - a peer that cannot say its version is still run
        version = f"unknown ({type(e).__name__})"
    print(f"running {opponent.name} {version} ...", file=sys.stderr)
    try:
        return opponent.run(setup)
    except OpponentFailure as e:
        return OpponentRun(opponent.name, version, "failed", setup.trials, error=e.error, progress=e.progress)
    except Exception as e:  # noqa: BLE001 - a failing opponent is a result; the traceback goes to stderr
        traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        return OpponentRun(opponent.name, version, "failed", setup.trials, error=f"{type(e).__name__}: {first}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism", help=f"{' | '.join(MODELS)} | a model directory (default: organism)")
    p.add_argument("--opponents", nargs="+", choices=OPPONENTS, default=["intervene", "heretic", "abliterix"],
                   help="who runs, in this order (default: intervene heretic abliterix)")
    p.add_argument("--trials", type=int, default=16, help="trial budget per opponent (default: 16)")
    p.add_argument("--startup-trials", type=int, default=6, help="random start-up trials, every opponent (default: 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens per answer when judging (default: 48)")
    p.add_argument("--search-new-tokens", type=int, default=24,
                   help="tokens per answer while each opponent searches (default: 24, the same for every one)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="at most N train prompts per set (a quick check)")
    p.add_argument("--eval-limit", type=int, default=None, help="at most N eval prompts per set (a quick check)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads here and in every child process (OMP_NUM_THREADS; default: 1)")
    p.add_argument("--work", default="bench-vs-peers", help="work directory (default: bench-vs-peers)")
    p.add_argument("--heretic-python", default=str(heretic.DEFAULT_PYTHON), help="python of heretic's venv")
    p.add_argument("--abliterix-python", default=str(abliterix.DEFAULT_PYTHON), help="python of abliterix's venv")
    p.add_argument("--senbonzakura-python", default=str(senbonzakura.DEFAULT_PYTHON),
                   help="python of senbonzakura's venv")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds allowed per child-process opponent")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--markdown", default=None, help="write the README table (Markdown) here")
    p.add_argument("--progress", action="store_true", help="intervene's progress bars on stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/vs_peers.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    try:
        directory = model_dir(args.model)
    except InterveneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from intervene.io.models import load_model, versions
    from peers.judge import EvalJudge

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    files = write_prompts(work, args.limit, args.eval_limit)
    count = {key: len(read_lines(path)) for key, path in files.items()}
    model, tokenizer = load_model(str(directory))
    print(f"judging the organism on the eval prompts ({count['harmful_eval']} harmful / "
          f"{count['harmless_eval']} harmless) ...", file=sys.stderr)
    judge = EvalJudge(model, tokenizer, read_lines(files["harmful_eval"]), read_lines(files["harmless_eval"]),
                      args.max_new_tokens, args.batch_size)
    setup = Setup(directory, files, work, args.trials, args.startup_trials, args.seed, args.search_new_tokens,
                  args.batch_size, args.threads, args.timeout, judge, progress=args.progress)
    runs = [run_opponent(o, setup) for o in make_opponents(args.opponents, args, model, tokenizer)]

    settings = {"model": args.model, "model_dir": str(directory), "opponents": args.opponents, "trials": args.trials,
                "startup_trials": min(args.startup_trials, args.trials), "seed": args.seed,
                "max_new_tokens": args.max_new_tokens,
                "search_new_tokens": args.search_new_tokens, "batch_size": args.batch_size, "threads": args.threads,
                "limit": args.limit, "eval_limit": args.eval_limit, "timeout_s": args.timeout,
                "n_train": f"{count['harmful_train']} harmful / {count['harmless_train']} harmless",
                "n_eval": f"{count['harmful_eval']} harmful / {count['harmless_eval']} harmless"}
    header = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
              "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, {platform.system()}",
              "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
              "versions": {**versions(), **{r.name: r.version for r in runs}},
              "n_eval": settings["n_eval"], "max_new_tokens": args.max_new_tokens}
    text = text_report(runs, settings, judge.baseline)
    print(text)
    if args.json:
        write_json(args.json, results_doc(runs, settings, judge.baseline, header, text))
    if args.markdown:
        atomic_write_text(args.markdown, markdown_table(runs, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
