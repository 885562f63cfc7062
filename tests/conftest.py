"""Shared pytest set-up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """Tests use small tensors: one intra-op thread is faster and steadier on the 2-core CI
    machine than two threads fighting over the cores (and keeps reductions deterministic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _native_search() -> None:
    """Build (first run on a machine, ~20 s) and load the C++ search once, in the parent, so that
    the forked ranks of the multi-process tests inherit it instead of each loading it."""
    from vq_torchrec.quantization import native

    native.available()
