"""Formats and sources: where a model comes from (``sources``), loading it (``models``), checkpoints'
safetensors headers (``checkpoint``), measurements files, prompt sets, ``inspect``'s report, and
atomic writes and hashes (``files``). Nothing here installs a hook or edits a weight."""
