"""Writing files so that nothing is ever half-written, and the hashes every output records.

Every file intervene writes goes through :func:`atomic_write` (a temporary sibling, then one
``os.replace``) or, for a directory, :func:`atomic_directory`; a crash or Ctrl-C leaves the old
file or nothing, never a truncated one. :func:`sha256_lines` is the one hash of a prompt set
(measurements, search studies and interop captures agree on it)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

CHUNK = 16 * 1024 * 1024


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None],
                 before_publish: Callable[[Path], None] | None = None) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``; it then replaces ``path`` in one rename.
    On any exception (Ctrl-C included) the temporary file is removed and ``path`` is untouched.
    ``before_publish(tmp)`` runs between the two (tests use it to interrupt a complete write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"  # O_EXCL below: never another's
    # the name is known before the file exists and it is created inside the try: a Ctrl-C that lands
    # right after the file appears (mkstemp returns only later) still removes it
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        write(tmp)
        if before_publish is not None:
            before_publish(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def jsonable(obj: Any) -> Any:
    """``json.dump(default=...)`` for tensors/arrays (``tolist``) and everything else (``str``)."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """A JSON report, indented, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, default=jsonable) + "\n")


@contextmanager
def atomic_directory(out: str | os.PathLike, tag: str = "tmp") -> Iterator[Path]:
    """Yields a temporary sibling directory of ``out``; when the block ends normally it replaces
    ``out``, on an exception (Ctrl-C included, at any instant) it is removed and ``out`` is kept.
    An existing ``out`` is first renamed aside and removed only once the new one is in place, so an
    interrupt between the two renames puts it back."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    # as in atomic_write: the names are known before anything exists and the directory is created
    # inside the try, so a Ctrl-C right after it appears (mkdtemp returns only later) removes it
    tmp = out.parent / f".{out.name}.{tag}.{token}"
    aside = out.parent / f".{out.name}.old.{token}"
    try:
        os.mkdir(tmp, 0o700)
        yield tmp
        if out.exists():
            os.replace(out, aside)
        os.replace(tmp, out)
    except BaseException:
        if aside.exists() and not out.exists():
            os.replace(aside, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_lines(lines: Sequence[str]) -> str:
    """The hash of a prompt set: each prompt's UTF-8 bytes followed by a newline."""
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


__all__ = ["atomic_write", "atomic_write_text", "write_json", "jsonable", "atomic_directory", "sha256_file",
           "sha256_lines", "sha256_text"]
