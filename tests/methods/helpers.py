"""Small helpers for the merge_math tests."""

from __future__ import annotations

import torch


def local_randn(*shape: int, seed: int = 0) -> torch.Tensor:
    """Test data from a local generator (never torch's global RNG)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a float32 tensor (to compare -0.0, NaN payloads...)."""
    return tensor.contiguous().view(torch.int32)
