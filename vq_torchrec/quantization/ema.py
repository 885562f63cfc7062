"""VQ-VAE-2 exponential-moving-average codebook statistics with Laplace smoothing."""

from __future__ import annotations

import torch


def laplace_smoothed(cluster_size: torch.Tensor, eps: float) -> torch.Tensor:
    """``(K,)`` counts ``(n_k + eps) / (n + K eps) * n`` (never zero, same total ``n``)."""
    n = cluster_size.sum()
    k = cluster_size.shape[0]
    return (cluster_size + eps) / (n + k * eps) * n


@torch.no_grad()
def ema_update_(
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    decay: float,
) -> None:
    """In place: ``cluster_size <- decay * cluster_size + (1 - decay) * counts`` and the same
    for ``embed_sum`` (``(K,)`` and ``(K, dim)``; ``counts``/``sums`` are global batch stats)."""
    cluster_size.lerp_(counts, 1.0 - decay)
    embed_sum.lerp_(sums, 1.0 - decay)


@torch.no_grad()
def ema_reset_(
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    codebook: torch.Tensor,
) -> None:
    """Statistics straight from one batch (used right after k-means init). Codes that got no
    rows keep their centre with a count of 1 (so the dead-code tracker can retire them)."""
    used = counts > 0
    cluster_size.copy_(torch.where(used, counts, torch.ones_like(counts)))
    embed_sum.copy_(torch.where(used.unsqueeze(1), sums, codebook))


def ema_codebook(
    cluster_size: torch.Tensor, embed_sum: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``(K, dim)`` codebook ``embed_sum / smoothed cluster_size`` (written into ``out`` if given)."""
    return torch.div(embed_sum, laplace_smoothed(cluster_size, eps).unsqueeze(1), out=out)
