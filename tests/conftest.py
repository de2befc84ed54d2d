"""Shared fixtures. Keep this file small: helpers live in intervene.testing."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def organism():
    """Directory of the model organism: built once (a few minutes) or reused from the cache."""
    from intervene.organism import build_organism

    return build_organism(progress=False)
