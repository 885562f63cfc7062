"""The VQ-VAE auxiliary loss (van den Oord et al. 2017), means over elements:

``loss = mean((sg[z] - e)^2) + beta * mean((z - sg[e])^2)``

The first (codebook) term trains the codebook when ``update="loss"``; with ``update="ema"``
the codebook is moved by EMA and only ``beta * commitment`` remains. ``beta`` multiplies the
commitment term (the seed had it on the codebook term).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vq_torchrec.quantization.outer import outer_loss_terms


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Mean that is 0 (not NaN) for an empty tensor."""
    return x.sum() / max(x.numel(), 1)


def vector_loss(
    x: torch.Tensor,
    e: torch.Tensor,
    commitment_weight: float,
    train_codebook: bool,
) -> torch.Tensor:
    """fp32 0-d loss for rows ``x`` (``(N, d)``, unit rows for cosine) against their codes
    ``e = codebook[codes]`` (``(N, d)``, differentiable w.r.t. the codebook for ``update="loss"``)."""
    if x.numel() == 0:
        return (x.sum() + e.sum()) * 0.0
    loss = commitment_weight * F.mse_loss(x, e.detach())
    if train_codebook:
        loss = loss + F.mse_loss(x.detach(), e)
    return loss


def outer_loss(
    a: torch.Tensor,
    u: torch.Tensor,
    codebook: torch.Tensor,
    codes: torch.Tensor,
    commitment_weight: float,
    train_codebook: bool,
    chunk_size: int,
) -> torch.Tensor:
    """fp32 0-d loss over the implicit rows ``a_{n,i} u_n`` (``(N, d)`` factors, ``(N, d)``
    codes): the same means as the naive loss over the ``(N, d, d)`` matrix, never built."""
    commit = _mean(outer_loss_terms(a, u, codebook.detach(), codes, chunk_size))
    loss = commitment_weight * commit
    if train_codebook:
        loss = loss + _mean(outer_loss_terms(a.detach(), u.detach(), codebook, codes, chunk_size))
    return loss
