"""heretic (``heretic-llm``), from its own venv, offline: a ``config.toml`` in its work directory names the
local model and the local prompt files (one prompt a line; heretic reads a plain text file as a dataset),
its search objective is scored on the TRAIN prompts like every other opponent's, float32 on the CPU,
``export_strategy = "merge"`` so each saved trial is a full checkpoint. Its final menus are answered by
:mod:`peers.menu`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import Setup, package_version, venv_missing
from .driven import run_driven
from .records import OpponentRun

DEFAULT_PYTHON = Path("~/.cache/intervene/venv-heretic/bin/python").expanduser()


def toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def default_system_prompt(tokenizer: Any) -> str:
    """The system text the chat template inserts when none is given (SmolLM2 has one): heretic and abliterix
    always send a system message, so they get exactly the one intervene's prompts carry."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False,
                                         add_generation_prompt=True)
    match = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    return match.group(1) if match else ""


def heretic_config(setup: Setup, system_prompt: str) -> str:
    def dataset(key: str) -> str:
        return f"dataset = {toml_str(str(setup.files[key].resolve()))}\n"

    return (
        f"model = {toml_str(str(setup.model_dir))}\n"
        "dtypes = [\"float32\"]\n"
        "device_map = \"cpu\"\n"
        f"batch_size = {setup.batch_size}\n"
        f"max_response_length = {setup.search_new_tokens}\n"
        "response_prefix = \"\"\n"
        f"n_trials = {setup.trials}\n"
        f"n_startup_trials = {min(setup.startup_trials, setup.trials)}\n"
        f"seed = {setup.seed}\n"
        f"system_prompt = {toml_str(system_prompt)}\n"
        "export_strategy = \"merge\"\n"
        "study_checkpoint_dir = \"checkpoints\"\n"
        "\n[good_prompts]\n" + dataset("harmless_train")
        + "\n[bad_prompts]\n" + dataset("harmful_train")
        # its search objective on the TRAIN prompts, like intervene's; eval is judged afterwards
        + "\n[good_evaluation_prompts]\n" + dataset("harmless_train")
        + "\n[bad_evaluation_prompts]\n" + dataset("harmful_train")
    )


@dataclass
class Heretic:
    python: Path = DEFAULT_PYTHON
    name: str = "heretic"

    def unavailable(self) -> str | None:
        return venv_missing(self.python, "scripts/peer_venvs.sh heretic")

    def version(self) -> str:
        return package_version(self.python, "heretic-llm")

    def run(self, setup: Setup) -> OpponentRun:
        out = setup.fresh_dir(self.name)
        (out / "config.toml").write_text(heretic_config(setup, default_system_prompt(setup.judge.tokenizer)))
        script = self.python.parent / "heretic"
        cmd = [str(script)] if script.exists() else [str(self.python), "-m", "heretic.main"]
        env = setup.child_env(COLAB_GPU="1", COLUMNS="250", TERM="dumb")  # notebook mode: numbered menus on stdin
        return run_driven(setup, self.name, self.version(), cmd, out, env)


__all__ = ["DEFAULT_PYTHON", "toml_str", "default_system_prompt", "heretic_config", "Heretic"]
