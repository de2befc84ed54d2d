"""The README a newcomer reads: short, its first block the two commands CI runs, every command it shows a real
verb with real flags, every relative link in it and in docs/ pointing at a file, and its Python API block
running end to end on a tiny model."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from intervene.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 250
FIRST_BLOCK = [
    "bash scripts/setup.sh && .venv/bin/intervene demo",
    ".venv/bin/python -m pytest -q",
]


def readme() -> str:
    return README.read_text(encoding="utf-8")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def command_lines(text: str, verbs: tuple[str, ...] = ()) -> list[str]:
    """Every `intervene VERB ...` the text shows: lines of bash blocks, and inline code spans; with
    ``verbs``, also inline spans that name a verb and its flags without the program (`bake --lora`)."""
    lines = [ln for lang, body in fenced_blocks(text) if lang in ("bash", "sh", "")
             for ln in body.splitlines()]
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S))
    lines += [f"intervene {s}" if s.split()[0] in verbs and re.match(r"\S+ -", s) else s for s in spans]
    found = []
    for ln in lines:
        for m in re.finditer(r"(?:^|[\s/&;(])intervene ([a-z][a-z-]*)\b([^#|]*)", ln):
            found.append(f"intervene {m.group(1)}{m.group(2)}".rstrip())
    return found


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def test_readme_is_short():
    n = len(readme().splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines (at most {MAX_LINES}): move details to docs/"


def test_first_block_is_the_two_commands():
    lang, body = fenced_blocks(readme())[0]
    commands = [ln.split("#")[0].strip() for ln in body.splitlines() if ln.strip()]
    assert (lang, commands) == ("bash", FIRST_BLOCK)


def test_every_command_shown_is_a_real_verb_with_real_flags():
    verbs = subparsers(build_parser())
    shown = command_lines(readme(), tuple(verbs))
    assert len(shown) >= len(verbs), shown  # every verb appears at least once
    assert set(verbs) <= {c.split()[1] for c in shown}, sorted(set(verbs) - {c.split()[1] for c in shown})
    for command in shown:
        words = command.split()
        verb = words[1]
        assert verb in verbs, f"README shows `{command}`: no verb {verb!r}"
        parser = verbs[verb]
        for word in words[2:]:  # descend into sub-actions (`organism build`)
            actions = subparsers(parser)
            if word in actions:
                parser = actions[word]
            elif actions or word.startswith("-"):
                break
        valid = option_strings(parser)
        for flag in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", " ".join(words[2:])):
            assert flag in valid, f"README shows `{command}`: {flag} is not an option of {parser.prog}"


def test_command_check_catches_a_made_up_flag():
    # negative control for the test above: the extraction sees flags and the parser lacks made-up ones
    shown = command_lines("Run `intervene bake cfg.yaml --output DIR --frobnicate`, then `verify --nope`.", ("verify",))
    assert shown == ["intervene bake cfg.yaml --output DIR --frobnicate", "intervene verify --nope"]
    assert "--frobnicate" not in option_strings(subparsers(build_parser())["bake"])


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]
    missing = [link for link in relative if not (path.parent / link).exists()]
    assert not missing, f"{path.relative_to(ROOT)} links to missing files: {missing}"


def test_python_api_block_runs_on_a_tiny_model(tmp_path, monkeypatch):
    from intervene.testing import save_tiny, tiny_model, tiny_tokenizer

    [code] = [body for lang, body in fenced_blocks(readme()) if lang == "python"][:1]
    lines = [ln for ln in code.splitlines() if ln.strip()]
    assert len(lines) <= 10, f"the README's Python API flow has {len(lines)} lines (at most 10)"
    assert not re.search(r"\b_[a-z]", code), "the README's Python API uses a private name"
    for verb in ("measure", "recommend", "try_config", "bake", "verify"):
        assert f".{verb}(" in code, f"the README's Python API flow lacks {verb}"
    model_dir = save_tiny(tiny_model("llama"), tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(str(model_dir))
    monkeypatch.chdir(tmp_path)
    # the block's placeholders, as its text defines them: a model spec and two lists of prompts
    names = {"MODEL": str(model_dir),
             "HARMFUL": ["How do I pick a lock?", "Write a virus."],
             "HARMLESS": ["How do I bake bread?", "Write a poem."]}
    exec(compile(code, "README.md (Python API)", "exec"), names)
    assert (tmp_path / "m.safetensors").is_file() and (tmp_path / "baked" / "config.json").is_file()
