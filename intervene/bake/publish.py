"""Where a bake writes and how it appears: the output checks (never the input, never an existing
output without ``--overwrite``), the hidden temporary sibling ``.<name>.intervene-tmp-<pid>`` marked
incomplete while it is written, then fsync'ed and renamed — an existing output swapped in one
atomic exchange where the OS has it — and the tidy-up after killed bakes (their temporaries removed,
an output that a killed ``--overwrite`` had moved aside put back). Unlike
:func:`intervene.io.files.atomic_directory` this survives power cuts and SIGKILL at any instant."""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
from pathlib import Path

from ..errors import InputError

TMP_TAG = ".intervene-tmp-"
OLD_TAG = ".intervene-old-"
PARTIAL_MARKER = ".intervene-partial"


def check_output(source: Path, output: Path, overwrite: bool) -> None:
    """Refuse an output that is, contains or lies inside the input, or exists without ``overwrite``."""
    src, out = _real(source), _real(output)
    if out == src:
        raise InputError(f"output {output} is the input checkpoint: choose another directory (the input is never modified)")
    if src in out.parents:
        raise InputError(f"output {output} is inside the input checkpoint {source}: choose a directory outside it")
    if out in src.parents:
        raise InputError(f"output {output} contains the input checkpoint {source}: choose a directory that does not")
    if output.exists() or output.is_symlink():
        if not output.is_dir() or output.is_symlink():
            raise InputError(f"output {output} exists and is not a directory")
        if not overwrite:
            raise InputError(f"output {output} already exists; pass --overwrite to replace it")


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def make_temporary(source: Path, output: Path, overwrite: bool) -> Path:
    """Tidy up after killed bakes of ``output``, check it, and create this process's temporary
    sibling directory, marked incomplete (:data:`PARTIAL_MARKER`) until :func:`mark_complete`."""
    cleanup_stale(output)  # first: it may put back an output a killed --overwrite bake moved aside
    check_output(source, output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}{TMP_TAG}{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        (tmp / PARTIAL_MARKER).write_text("incomplete intervene bake; safe to delete\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def mark_complete(tmp: Path) -> None:
    (tmp / PARTIAL_MARKER).unlink()


def cleanup_stale(output: Path) -> None:
    """Tidy up after killed bakes of this output (their process is gone): an old output that a
    killed ``--overwrite`` bake had moved aside is put back if the path is empty (the killed bake
    never finished, so the previous state is restored); temporaries are removed."""
    parent = output.parent
    if not parent.is_dir():
        return
    for p in sorted(parent.glob(f".{output.name}{OLD_TAG}*")):
        if not _owner_gone(p) or not (p / PARTIAL_MARKER).exists():
            continue
        if not os.path.lexists(output):
            os.rename(p, output)
            (output / PARTIAL_MARKER).unlink(missing_ok=True)
            print(f"intervene bake: restored {output} from {p.name}, left by a bake that was killed "
                  "while replacing it", file=sys.stderr)
        else:
            shutil.rmtree(p, ignore_errors=True)
    for p in parent.glob(f".{output.name}{TMP_TAG}*"):
        if _owner_gone(p):
            shutil.rmtree(p, ignore_errors=True)


def _owner_gone(path: Path) -> bool:
    """True when ``path`` ends in ``-PID`` (our temporaries do) and that process no longer runs."""
    pid = path.name.rsplit("-", 1)[-1]
    return pid.isdigit() and not alive(int(pid))


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (this process always does)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(tmp: Path, output: Path) -> None:
    """Make ``tmp`` the ``output``, durably (files and directories fsync'ed first).

    An existing output (--overwrite) is swapped with ``tmp`` in one atomic ``renameat2(...,
    RENAME_EXCHANGE)`` where the OS has it (Linux >= 3.15), so a kill at any instant leaves either
    the old or the new output at the path. Elsewhere the old output is first renamed aside to
    ``.NAME.intervene-old-PID``; a kill between the two renames leaves the path empty for a moment,
    and the next bake of that output puts the old one back (:func:`cleanup_stale`)."""
    _fsync_tree(tmp)
    if not output.exists():
        os.rename(tmp, output)
        _fsync_dir(output.parent)
        return
    if _exchange(tmp, output):  # tmp now holds the old output (a dead bake's tmp is removed by cleanup_stale)
        _fsync_dir(output.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = output.parent / f".{output.name}{OLD_TAG}{os.getpid()}"
    os.rename(output, old)
    (old / PARTIAL_MARKER).write_text("replaced output of an intervene bake; safe to delete\n")
    try:
        os.rename(tmp, output)
    except BaseException:
        os.rename(old, output)
        (output / PARTIAL_MARKER).unlink(missing_ok=True)
        raise
    _fsync_dir(output.parent)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (38, 22, 95):  # ENOSYS, EINVAL (filesystem without exchange), EOPNOTSUPP: fall back
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and the directories themselves to disk, so a power cut
    after the rename cannot leave a complete-looking output with missing data."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)
