"""Shared fixtures for the merge_math tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def restore_threads():
    """Restores torch's intra-op thread count after a test changes it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
