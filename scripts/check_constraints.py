"""Checks that this Python environment holds exactly the packages of a constraints file, at its
versions: `python scripts/check_constraints.py constraints.txt` prints each difference and exits 1,
or prints one line and exits 0. torch is set by setup.sh (TORCH_SPEC: a CPU or CUDA build) and
intervene is the checkout itself, so neither is listed; a local version label (+cpu) is ignored."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

NOT_LISTED = {"intervene", "torch"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_constraints(path: Path) -> dict[str, str]:
    pinned = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if match is None:
            sys.exit(f"{path}:{number}: not a 'name==version' line: {line!r}")
        pinned[canonical(match[1])] = match[2]
    return pinned


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}


def differences(pinned: dict[str, str], have: dict[str, str]) -> list[str]:
    out = []
    for name in sorted(set(pinned) | set(have)):
        if name in NOT_LISTED:
            continue
        want, got = pinned.get(name), have.get(name)
        if want is None:
            out.append(f"{name} {got} is installed but not in the constraints")
        elif got is None:
            out.append(f"{name}=={want} is in the constraints but not installed")
        elif got.split("+")[0] != want.split("+")[0]:
            out.append(f"{name}: {got} installed, constraints say {want}")
    return out


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "constraints.txt")
    found = differences(read_constraints(path), installed())
    for line in found:
        print(f"check_constraints: {line}", file=sys.stderr)
    if found:
        print(f"check_constraints: the environment differs from {path} (scripts/refresh-constraints.sh "
              "updates the file on purpose)", file=sys.stderr)
        return 1
    print(f"check_constraints: every package at the version {path} pins")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
