"""io.files: a directory or file written through it is complete or absent, also when Ctrl-C lands at
the worst instant. The interrupts are simulated where they would land (KeyboardInterrupt raised by
the system call right after it succeeded), so each test fails on code with the window open."""

from __future__ import annotations

import os

import pytest

from intervene.io import files
from intervene.io.files import atomic_directory, atomic_write_text


def interrupt_after(monkeypatch, name: str, nth: int = 1) -> None:
    """``os.<name>`` does its work, then raises KeyboardInterrupt on its ``nth`` call (as a Ctrl-C
    delivered right after the call returned would); the other calls are untouched."""
    real = getattr(os, name)
    calls = [0]

    def call(*args, **kwargs):
        result = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == nth:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(os, name, call)


def siblings(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def previous_output(tmp_path):
    """``tmp_path/out`` holding the previous run's ``old.txt``."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    return out


def test_atomic_directory_publishes_and_replaces(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"
    with atomic_directory(out) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # replaced, not merged
    assert siblings(out) == ["out"]


def test_atomic_directory_ctrl_c_right_after_mkdir_leaves_nothing(tmp_path, monkeypatch):
    """The temporary directory exists, the block has not started: mkdtemp before the ``try`` left it."""
    out = tmp_path / "out"
    interrupt_after(monkeypatch, "mkdir")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out):
            raise AssertionError("the block must not run")
    assert siblings(out) == []


def test_atomic_directory_ctrl_c_in_block_keeps_previous(tmp_path):
    out = previous_output(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out) as tmp:
            (tmp / "new.txt").write_text("half")
            raise KeyboardInterrupt
    assert siblings(out) == ["out"] and (out / "old.txt").read_text() == "old"


def test_atomic_directory_ctrl_c_between_the_renames_keeps_previous(tmp_path, monkeypatch):
    """The previous directory has been moved aside, the new one not yet moved in: the previous one
    must come back (the old code removed it before the rename: an interrupt there lost it)."""
    out = previous_output(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out) as tmp:
            (tmp / "new.txt").write_text("new")
            interrupt_after(monkeypatch, "replace")  # the first rename: out -> aside
    monkeypatch.undo()
    assert siblings(out) == ["out"] and sorted(p.name for p in out.iterdir()) == ["old.txt"]


def test_atomic_write_ctrl_c_right_after_create_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    path.write_text("old")
    interrupt_after(monkeypatch, "open")
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert siblings(path) == ["f.txt"] and path.read_text() == "old"


def test_atomic_write_failure_keeps_previous(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(path, broken)
    assert siblings(path) == ["f.txt"] and path.read_text() == "old"
