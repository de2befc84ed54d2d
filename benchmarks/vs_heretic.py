#!/usr/bin/env python
"""Head-to-head on the model organism: ``intervene search`` vs heretic (vs senbonzakura) -- now a thin
wrapper over ``vs_peers.py``, which runs every opponent through one interface (``benchmarks/peers/``) and
judges them with one judge. Its old flags map onto ``vs_peers.py``'s:

    python benchmarks/vs_heretic.py --trials 16               # = vs_peers.py --opponents intervene heretic senbonzakura
    python benchmarks/vs_heretic.py --skip-heretic --trials 40

``--skip-intervene`` / ``--skip-heretic`` / ``--skip-senbonzakura`` drop an opponent; every other flag is
passed on unchanged (see ``vs_peers.py --help``). senbonzakura without its venv is reported as skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vs_peers  # noqa: E402

SKIPS = {"--skip-intervene": "intervene", "--skip-heretic": "heretic", "--skip-senbonzakura": "senbonzakura"}


def translate(argv: list[str]) -> list[str]:
    """vs_heretic's flags -> vs_peers' flags."""
    skipped = {SKIPS[a] for a in argv if a in SKIPS}
    rest = [a for a in argv if a not in SKIPS and a != "--no-progress"]
    opponents = [o for o in ("intervene", "heretic", "senbonzakura") if o not in skipped]
    return rest + ["--opponents", *opponents] + ["--work", "bench-vs-heretic"] * ("--work" not in rest)


def main(argv: list[str] | None = None) -> int:
    return vs_peers.main(translate(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
