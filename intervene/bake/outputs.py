"""Everything a baked checkpoint holds besides its shards: the safetensors metadata recording the edit,
the input's config/tokenizer/generation files copied (weights in other formats left out: they would
carry the unedited model), the rewritten shard index, the model card (README.md), and with
``--verify-hashes`` the check that untouched tensors are byte-identical to the input and a
``SHA256SUMS`` manifest."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from ..errors import CheckpointError
from ..io.checkpoint import INDEX_NAME, read_header
from ..io.files import CHUNK, sha256_file
from .plan import BakePlan, plan_summary

MANIFEST = "SHA256SUMS"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx", ".npz")


def shard_metadata(plan: BakePlan, versions: dict[str, str]) -> dict[str, str]:
    """The safetensors metadata every output shard gets (merged over the input's): the edit, the
    config and the versions as JSON, and the config as YAML."""
    return {"intervene": json.dumps({"edit": plan_summary(plan), "config": plan.config.to_dict(),
                                     "versions": versions}, sort_keys=True, default=str),
            "intervene_config_yaml": plan.config.to_yaml()}


def write_side_files(plan: BakePlan, directory: Path, versions: dict[str, str]) -> list[str]:
    """Copy the input's other files, write the index and the model card into ``directory``.
    Returns the weight files in other formats that were not copied."""
    not_copied = _copy_side_files(plan.source, directory, {h.path.name for h in plan.checkpoint.shards})
    _write_index(plan, directory)
    (directory / "README.md").write_text(model_card(plan, versions))
    return not_copied


def read_source_card(source: Path) -> tuple[dict[str, Any], str]:
    """The source's README.md as (front matter, text below it); ({}, "") when it has none. Front matter
    that is not a YAML mapping is kept as text (the card's words are never dropped)."""
    path = source / "README.md"
    if not path.is_file():
        return {}, ""
    text = path.read_text(encoding="utf-8", errors="replace")
    m = re.match(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", text, re.S)
    if not m:
        return {}, text
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}, text
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        return {}, text
    return meta, text[m.end():]


def base_model_id(source: Path) -> str:
    """The source's hub id where its path tells it (a hub cache snapshot ``models--ORG--NAME/snapshots/SHA``),
    else its directory name."""
    for part in reversed(source.resolve().parts):
        if part.startswith("models--"):
            return "/".join(part[len("models--"):].split("--"))
    return source.resolve().name


def front_matter(source: Path, source_meta: dict[str, Any], library: str,
                 relation: str | None = None) -> str:
    """Hugging Face card metadata for an output of ``source``: ``base_model``, the source's licence
    (``license``, ``license_name``, ``license_link``; ``unknown`` when it states none), its tags plus
    ``intervene``, and ``library_name``."""
    meta: dict[str, Any] = {"base_model": base_model_id(source)}
    if relation:
        meta["base_model_relation"] = relation
    meta["license"] = source_meta.get("license", "unknown")
    for key in ("license_name", "license_link", "language", "pipeline_tag"):
        if key in source_meta:
            meta[key] = source_meta[key]
    tags = source_meta.get("tags") or []
    tags = [tags] if isinstance(tags, str) else list(tags)
    meta["tags"] = list(dict.fromkeys([*map(str, tags), "intervene"]))
    meta["library_name"] = library
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def with_source_card(source: Path, own: str, library: str, relation: str | None = None) -> str:
    """``own`` (intervene's section) between the front matter and the source card's text."""
    meta, text = read_source_card(source)
    out = front_matter(source, meta, library, relation) + "\n" + own.rstrip() + "\n"
    if text.strip():
        out += f"\n## The source model's card (`{base_model_id(source)}`)\n\n" + text.strip() + "\n"
    return out


def _copy_side_files(source: Path, directory: Path, shards: set[str]) -> list[str]:
    """Copy config, tokenizer, generation and chat-template files and anything else that is not a
    weight file (so every LICENSE / NOTICE / USE_POLICY file goes along). The input's README becomes
    the text below our model card. Returns weight files skipped."""
    skipped = []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if any(part.startswith(".") for part in rel.parts) or path.is_dir():
            continue
        if rel.as_posix() in (INDEX_NAME, "README.md", MANIFEST):
            continue  # rewritten for the output (a copied manifest would describe the input)
        if path.suffix.lower() in WEIGHT_SUFFIXES:
            if rel.as_posix() not in shards:
                skipped.append(rel.as_posix())
            continue
        dest = directory / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    return skipped


def _write_index(plan: BakePlan, directory: Path) -> None:
    index = plan.checkpoint.index
    if index is None:
        return
    out = json.loads(json.dumps(index))
    meta = out.setdefault("metadata", {})
    meta["total_size"] = sum(h.data_size for h in plan.checkpoint.shards)
    (directory / INDEX_NAME).write_text(json.dumps(out, indent=2) + "\n")


def model_card(plan: BakePlan, versions: dict[str, str]) -> str:
    s = plan_summary(plan)
    cfg = plan.config
    name = cfg.name or plan.source.name
    experts = s["experts"] if s["experts"] == "all" else json.dumps(s["experts"])
    lines = [
        f"# {name} — edited with intervene",
        "",
        f"This checkpoint is `{plan.source}` with a directional edit baked into its weights by "
        f"intervene {versions.get('intervene', '?')}.",
        "",
        "| | |",
        "|---|---|",
        f"| source model | `{plan.source}` ({s['architecture']}) |",
        f"| method | {s['method']} |",
        f"| layers | {', '.join(map(str, s['layers']))} |",
        f"| targets | {', '.join(s['targets'])} |",
        f"| scale | {', '.join(f'{x:g}' for x in s['scales'])} |",
        f"| experts | {experts} |",
        f"| tensors edited | {s['tensors_edited']} |",
        f"| measurements | `{s['measurements']}` (sha256 {s['measurements_sha256']}) |",
        f"| versions | {', '.join(f'{k} {v}' for k, v in sorted(versions.items()))} |",
        "",
        "Every edited tensor was projected in float32 and cast back to its stored dtype; all other tensors are",
        "byte-identical to the source. The same config applied live (`intervene try`) gives the same logits:",
        "check with `intervene verify CONFIG THIS_DIR`.",
        "",
        "## Config",
        "",
        "```yaml",
        cfg.to_yaml().rstrip(),
        "```",
        "",
    ]
    return with_source_card(plan.source, "\n".join(lines), "transformers")


def check_untouched(plan: BakePlan, out_dir: Path) -> int:
    """Compare every untouched tensor's bytes in ``out_dir`` with the input. Returns the count."""
    checked = 0
    for header in plan.checkpoint.shards:
        out_header = read_header(out_dir / header.path.name)
        out_by_key = out_header.by_key()
        edited = plan.edits_in_shard(header.path.name)
        with open(header.path, "rb") as a, open(out_dir / header.path.name, "rb") as b:
            for info in header.tensors:
                if info.key in edited:
                    continue
                o = out_by_key.get(info.key)
                if o is None or (o.dtype, o.shape, o.nbytes) != (info.dtype, info.shape, info.nbytes):
                    raise CheckpointError(f"verify-hashes: '{info.key}' changed its entry in {header.path.name}")
                if _range_hash(a, header.data_start + info.begin, info.nbytes) != \
                        _range_hash(b, out_header.data_start + o.begin, o.nbytes):
                    raise CheckpointError(f"verify-hashes: untouched tensor '{info.key}' differs from the input "
                                          f"in {header.path.name}")
                checked += 1
    return checked


def _range_hash(f: BinaryIO, offset: int, length: int) -> bytes:
    """sha256 of ``length`` bytes of ``f`` from ``offset`` (one tensor's data)."""
    h = hashlib.sha256()
    f.seek(offset)
    left = length
    while left:
        block = f.read(min(left, CHUNK))
        if not block:
            break
        h.update(block)
        left -= len(block)
    return h.digest()


def write_manifest(directory: Path) -> Path:
    """``SHA256SUMS`` (sha256sum format) over every file in ``directory``."""
    lines = [f"{sha256_file(path)}  {path.relative_to(directory).as_posix()}"
             for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)]
    target = directory / MANIFEST
    target.write_text("\n".join(lines) + "\n")
    return target
