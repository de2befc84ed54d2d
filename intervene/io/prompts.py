"""Prompt sets: the built-in harmful/harmless splits and loaders for user files.

Spec forms accepted by :func:`load_prompts` (and every ``--harmful`` / ``--harmless`` flag):
    builtin:harmful[:train|eval]     built-in sets written for this project (default split: train)
    builtin:harmless[:train|eval]
    path.txt                         one prompt per line, blank lines skipped
    path.json                        a list of strings, or a list of objects (``field``)
    path.jsonl                       one JSON string or object per line
    path.csv / path.parquet          one column (``field``)
    hf:NAME[:split]                  a Hugging Face dataset (needs the ``datasets`` package)

Without ``field``, objects and tables are read from the first of ``prompt``, ``instruction``,
``text`` (or the only column, for a one-column table).
"""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import InputError

KINDS = ("harmful", "harmless")
SPLITS = ("train", "eval")
DEFAULT_FIELDS = ("prompt", "instruction", "text")
FORMATS = (".txt", ".json", ".jsonl", ".csv", ".parquet")


# ---- built-in sets ---------------------------------------------------------------------------

def _data_text(name: str) -> str:
    return resources.files("intervene").joinpath("data", name).read_text(encoding="utf-8")


def builtin(kind: str, split: str = "train") -> list[str]:
    """The built-in prompt set ``kind`` (harmful|harmless), split ``train`` or ``eval``."""
    if kind not in KINDS or split not in SPLITS:
        raise InputError(f"unknown built-in prompt set '{kind}:{split}'; valid: "
                         + ", ".join(f"builtin:{k}:{s}" for k in KINDS for s in SPLITS))
    return _lines(_data_text(f"{kind}_{split}.txt"))


def builtin_categories(kind: str, split: str = "train") -> dict[str, list[str]]:
    """The built-in set split by category (``twin``, ``near_miss``, ``generic``; ``harmful``)."""
    prompts = builtin(kind, split)
    sections = json.loads(_data_text("categories.json"))[f"{kind}_{split}"]
    out: dict[str, list[str]] = {}
    start = 0
    for name, count in sections:
        out[name] = prompts[start:start + count]
        start += count
    if start != len(prompts):  # the data files and categories.json must be edited together
        raise InputError(f"intervene/data/categories.json lists {start} prompts for {kind}_{split}, "
                         f"the file has {len(prompts)}")
    return out


# ---- loaders --------------------------------------------------------------------------------

def load_prompts(spec: str, field: str | None = None, limit: int | None = None) -> list[str]:
    """Load a prompt set from a spec (see module docstring); at most ``limit`` prompts."""
    spec = str(spec)
    if spec.startswith("builtin:"):
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise InputError(f"bad built-in prompt spec '{spec}'; expected builtin:harmful|harmless[:train|eval]")
        prompts = builtin(parts[1], parts[2] if len(parts) == 3 else "train")
    elif spec.startswith("hf:"):
        prompts = _load_hf(spec, field)
    else:
        prompts = _load_file(Path(spec).expanduser(), field)
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit must be >= 1, got {limit}")
        prompts = prompts[:limit]
    if not prompts:
        raise InputError(f"prompt set {spec} is empty")
    return prompts


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_text(path: Path) -> str:
    if not path.exists():
        raise InputError(f"prompt file not found: {path}")
    if not path.is_file():
        raise InputError(f"prompt path is not a file: {path}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"prompt file {path} is not UTF-8 text (byte {e.start})") from None


def _load_file(path: Path, field: str | None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"unknown prompt file type '{suffix or path.name}' for {path}; "
                         f"use {', '.join(FORMATS)}, hf:NAME[:split] or builtin:harmful|harmless[:train|eval]")
    if suffix == ".parquet":
        return _load_parquet(path, field)
    text = _read_text(path)
    if suffix == ".txt":
        return _lines(text)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict):  # {"prompts": [...]}-style wrapper with a single list
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise InputError(f"{path}: expected a JSON list of prompts (or an object holding one list)")
            data = lists[0]
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of prompts")
        return _from_records(data, field, path)
    if suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
        return _from_records(records, field, path)
    # .csv
    rows = list(csv.DictReader(text.splitlines()))
    columns = list(rows[0].keys()) if rows else next(csv.reader(text.splitlines()), [])
    column = _pick_column(columns, field, path)
    return [str(row[column]).strip() for row in rows if row.get(column) and str(row[column]).strip()]


def _pick_field(keys: list[str], field: str | None, where: str) -> str:
    if field is not None:
        if field not in keys:
            raise InputError(f"{where} has no field '{field}' (fields: {', '.join(keys) or 'none'})")
        return field
    for name in DEFAULT_FIELDS:
        if name in keys:
            return name
    raise InputError(f"{where} has none of the fields {', '.join(DEFAULT_FIELDS)} "
                     f"(fields: {', '.join(keys) or 'none'}); pass --field")


def _pick_column(columns: list[str], field: str | None, path: Any) -> str:
    if field is None and len(columns) == 1:
        return columns[0]
    return _pick_field(list(columns), field, str(path))


def _from_records(records: list[Any], field: str | None, path: Any) -> list[str]:
    out = []
    for i, record in enumerate(records):
        if isinstance(record, str):
            value: Any = record
        elif isinstance(record, dict):
            value = record[_pick_field(list(record), field, f"{path} item {i}")]
        else:
            raise InputError(f"{path} item {i} is a {type(record).__name__}; expected a string or an object")
        if not isinstance(value, str):
            raise InputError(f"{path} item {i}: field value is a {type(value).__name__}, expected a string")
        if value.strip():
            out.append(value.strip())
    return out


def _load_parquet(path: Path, field: str | None) -> list[str]:
    if not path.exists():
        raise InputError(f"prompt file not found: {path}")
    try:
        import pandas as pd
    except ImportError:
        raise InputError(f"reading {path} needs pandas and pyarrow: pip install pandas pyarrow") from None
    try:
        frame = pd.read_parquet(path)
    except ImportError:
        raise InputError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    except Exception as e:  # pyarrow raises several types for non-parquet input
        raise InputError(f"cannot read {path} as parquet: {str(e).splitlines()[0]}") from None
    column = _pick_column([str(c) for c in frame.columns], field, path)
    return [str(v).strip() for v in frame[column].tolist() if isinstance(v, str) and v.strip()]


def _load_hf(spec: str, field: str | None) -> list[str]:
    """``hf:NAME[:split]``, e.g. ``hf:mlabonne/harmful_behaviors:test`` (default split: train)."""
    rest = spec[3:]
    name, _, split = rest.partition(":")
    if not name:
        raise InputError(f"bad dataset spec '{spec}'; expected hf:NAME[:split]")
    try:
        import datasets
    except ImportError:
        raise InputError(f"loading {spec} needs the 'datasets' package: pip install datasets") from None
    try:
        data = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # network, missing split, unknown dataset: one line for the user
        raise InputError(f"cannot load dataset {name} (split {split or 'train'}): {str(e).splitlines()[0]}") from None
    column = _pick_column(list(data.column_names), field, f"dataset {name}")
    return [v.strip() for v in data[column] if isinstance(v, str) and v.strip()]


__all__ = ["load_prompts", "builtin", "builtin_categories", "KINDS", "SPLITS"]
