"""intervene's own ``search``, in process, as ``intervene search`` runs it by default (the whitening λ
searched when ``measure`` stored the moments): measure on the train prompts, the common trial and
start-up budget and seed, the search objective on the train prompts, no eval inside the search. Each
front member is judged live (hooks on the organism), then baked to a checkpoint whose tensors are read
against the organism's like every other opponent's (the bake is deleted afterwards)."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from typing import Any

from .base import Setup
from .records import Member, OpponentRun, mark_front
from .tensors import diff_checkpoints


def describe(params: dict[str, Any]) -> str:
    return (f"dir {params['direction']:.2f}, window {params['center']:.1f}±{params['width']:.1f}, {params['method']}, "
            + (f"whiten {params['whiten']:.2f}" if "whiten" in params else "whiten off"))


@dataclass
class InterveneSearch:
    """Needs the organism loaded in this process: ``model`` and ``tokenizer`` (the judge's)."""

    model: Any
    tokenizer: Any
    name: str = "intervene"

    def unavailable(self) -> str | None:
        return None

    def version(self) -> str:
        from intervene.io.models import versions

        return versions()["intervene"]

    def run(self, setup: Setup) -> OpponentRun:
        from intervene.arch import arch_for_config, text_config
        from intervene.bake.run import bake
        from intervene.config.resolve import bind
        from intervene.hooks.apply import apply
        from intervene.measure.collect import measure
        from intervene.runner import RunOptions
        from intervene.search.objective import PromptObjective
        from intervene.search.space import SearchSpace
        from intervene.search.study import SearchSettings, run_search

        model, tokenizer = self.model, self.tokenizer
        out = setup.fresh_dir(self.name)
        harmful, harmless = setup.prompts("harmful_train"), setup.prompts("harmless_train")
        start = time.time()
        meas = measure(model, tokenizer, harmful, harmless,
                       run=RunOptions(batch_size=setup.batch_size, progress=False), model_path=str(setup.model_dir))
        meas_path = out / "measurements.safetensors"
        meas.save(meas_path)
        meas.path = str(meas_path)
        objective = PromptObjective(model, tokenizer, harmful, harmless, batch_size=setup.batch_size,
                                    max_new_tokens=setup.search_new_tokens, label="search",
                                    sources={"harmful": str(setup.files["harmful_train"]),
                                             "harmless": str(setup.files["harmless_train"])})
        space = SearchSpace.default(arch_for_config(model.config), text_config(model.config), meas, whiten_range="auto")
        settings = SearchSettings(trials=setup.trials, seed=setup.seed,
                                  startup_trials=min(setup.startup_trials, setup.trials), full_eval_top=0)
        result = run_search(model, meas, space, objective, out, settings, model_spec=str(setup.model_dir),
                            measurements_path=str(meas_path.resolve()), progress=setup.progress)
        run = OpponentRun(self.name, self.version(), "ok", setup.trials, wall_s=time.time() - start,
                          trial_loop_s=result.seconds)
        for rec in result.front:
            member = Member(rec.number, rec.refusals, rec.total, rec.kl, detail=describe(rec.params))
            bound = bind(rec.config(), meas, model.config)
            member.eval = setup.judge.score(model, context=lambda bound=bound: apply(model, bound))
            baked = out / f"baked_{rec.number:04d}"
            bake(rec.config(), baked, overwrite=True, progress=False, model=str(setup.model_dir), measurements=meas,
                 threads=setup.threads)
            member.edited_tensors = diff_checkpoints(setup.model_dir, baked).changed_names
            shutil.rmtree(baked, ignore_errors=True)
            run.members.append(member)
        mark_front(run.members)
        return run


__all__ = ["describe", "InterveneSearch"]
