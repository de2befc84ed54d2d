"""Shared fixtures. Keep this file small: helpers live in intervene.testing."""

from __future__ import annotations

import pytest

from intervene.bake.workers import torch_threads  # n torch threads for a block, restored after


@pytest.fixture(scope="session", autouse=True)
def startup_threads() -> int:
    """torch's thread count before any test changed it (the count a user's `intervene` command runs with)."""
    import torch

    return torch.get_num_threads()


@pytest.fixture(scope="session")
def organism(startup_threads):
    """Directory of the model organism: built once (a few minutes) or reused from the cache. Built with the
    startup thread count, as `intervene organism build` would, also when the first test to ask for it
    runs in a one_torch_thread module (the build would take longer and give other bits)."""
    from intervene.products.organism import build_organism

    with torch_threads(startup_threads):
        return build_organism(progress=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one thread is fastest, and immune to OpenMP stalls on a busy machine.
    Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def organism_moe(startup_threads):
    """Directory of the MoE organism (organism-moe): built once or reused from the cache, with the startup
    thread count (see ``organism``)."""
    from intervene.products.organism_moe import build_moe_organism

    with torch_threads(startup_threads):
        return build_moe_organism(progress=False)
