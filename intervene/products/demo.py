"""The main job on the built-in example model, start to finish, unattended: organism (built once,
cached) → measure (train split) → analyze (table, plot, recommended config) → evaluate baseline vs
live-intervened model (eval split) → report.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config.schema import load_config
from ..hooks.apply import apply
from ..io.files import write_json
from ..io.models import load_model
from ..io.prompts import load_prompts
from ..live.evaluate import EvalReport, evaluate
from ..live.server import ServerClient, ServerOptions, served_evaluate
from ..measure.analyze import analyze, recommend
from ..measure.collect import measure
from .organism import build_organism, organism_dir
from ..runner import RunOptions


@dataclass
class DemoResult:
    out_dir: Path
    config_path: Path
    report: EvalReport
    seconds: float


def run_demo(out_dir: str | Path = "intervene-demo", max_new_tokens: int = 48, batch_size: int = 16,
             limit: int | None = None, say: Callable[[str], None] = print,
             server: ServerOptions | None = None) -> DemoResult:
    """``server``: the evaluation's greedy answers come from a server serving the organism (the recommended config
    as its LoRA adapter); measuring and the first-token numbers stay here."""
    start = time.time()
    served_model = ServerClient(server.url, server.timeout).model_name(server.model) if server else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    if not (organism_dir() / "config.json").exists():
        say(f"[1/4] building the model organism (safety-fine-tuned SmolLM2-135M) into {organism_dir()} ...")
        build_organism()
    else:
        say(f"[1/4] model organism found in {organism_dir()}")
    model, tokenizer = load_model("organism")

    say("[2/4] measuring harmful vs harmless residuals on the train split ...")
    harmful_train = load_prompts("builtin:harmful:train", limit=limit)
    harmless_train = load_prompts("builtin:harmless:train", limit=limit)
    meas = measure(model, tokenizer, harmful_train, harmless_train, run=RunOptions(batch_size=batch_size),
                   model_path="organism")
    meas_path = out / "measurements.safetensors"
    meas.save(meas_path)

    say("[3/4] analyzing which layers carry the direction ...")
    report = analyze(meas)
    say(report.table())
    report.plot(out / "analysis.png")
    cfg = recommend(meas, model="organism", measurements=str(meas_path.resolve()))
    config_path = out / "config.yaml"
    cfg.save(config_path)
    cfg = load_config(config_path)
    say(f"      recommended config written to {config_path}")

    say("[4/4] evaluating baseline vs live-intervened model on the eval split ...")
    harmful_eval = load_prompts("builtin:harmful:eval", limit=limit)
    harmless_eval = load_prompts("builtin:harmless:eval", limit=limit)
    if server is not None:
        result = served_evaluate(server, model, tokenizer, str(organism_dir()), harmful_eval, harmless_eval,
                                 config=cfg, measurements=meas, intervention=lambda: apply(model, cfg, meas),
                                 served_model=served_model, max_new_tokens=max_new_tokens, batch_size=batch_size)
    else:
        result = evaluate(model, tokenizer, harmful_eval, harmless_eval, intervention=lambda: apply(model, cfg, meas),
                          max_new_tokens=max_new_tokens, run=RunOptions(batch_size=batch_size), config=cfg.to_dict())
    write_json(out / "report.json", result.to_dict())
    return DemoResult(out, config_path, result, time.time() - start)
