"""Codebook statistics from a code histogram (tensors only: reading them is the caller's sync)."""

from __future__ import annotations

import torch


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """fp32 0-d ``exp(entropy)`` of the histogram ``counts`` (``(K,)``); 1 for an empty batch."""
    p = counts / counts.sum().clamp_min(1.0)
    return torch.exp(-torch.special.xlogy(p, p).sum())


def usage(counts: torch.Tensor) -> torch.Tensor:
    """fp32 0-d fraction of codes with at least one assignment."""
    return (counts > 0).float().mean()
