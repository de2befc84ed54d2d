"""Shared fixtures. Keep this file small: helpers live in intervene.testing."""

from __future__ import annotations

import pytest

from intervene.bake.workers import torch_threads  # n torch threads for a block, restored after


@pytest.fixture(scope="session")
def organism():
    """Directory of the model organism: built once (a few minutes) or reused from the cache. The build runs
    on the recipe's own torch thread count (``Recipe.threads``), whichever module asks for it first."""
    from intervene.products.organism import build_organism

    return build_organism(progress=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one thread is fastest, and immune to OpenMP stalls on a busy machine.
    Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def organism_moe():
    """Directory of the MoE organism (organism-moe): built once or reused from the cache (see ``organism``)."""
    from intervene.products.organism_moe import build_moe_organism

    return build_moe_organism(progress=False)


@pytest.fixture(scope="session")
def organism_moe_experts():
    """Directory of the experts-regime MoE organism (organism-moe-experts): built once or reused (see ``organism``)."""
    from intervene.products.organism_moe_experts import build_moe_experts_organism

    return build_moe_experts_organism(progress=False)
