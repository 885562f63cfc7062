"""REFERENCE ONLY (benchmark baseline, not used by the library): the seed project's outer-mode
vector quantizer formulation, reconstructed from its description in issue 2 (the seed's own
source is not in this repository). It is kept deliberately as it was, bugs included:

* ``torch.sqrt`` of the pairwise products ``z_i * z_j``: NaN wherever the signs differ
  (for Gaussian inputs about half the entries, so almost every row's distances are NaN);
* the full ``(B, d, d)`` outer product, a ``torch.cdist`` over ``B * d`` rows (``(B * d, K)``
  distances) and a one-hot ``(B * d, K)`` matrix multiplied with the codebook;
* ``beta`` on the codebook term instead of the commitment term.

Use :mod:`vq_torchrec.quantization` (``mode="outer"``) for the corrected version.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SeedOuterVQ(nn.Module):
    """Seed formulation: ``z (B, d)`` -> ``(quantized (B, d), loss, perplexity, codes (B*d,))``."""

    def __init__(self, dim: int, codebook_size: int, beta: float = 0.25) -> None:
        super().__init__()
        self.dim = dim
        self.codebook_size = codebook_size
        self.beta = beta
        self.embedding = nn.Embedding(codebook_size, dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        b, d = z.shape
        outer = torch.bmm(z.unsqueeze(2), z.unsqueeze(1))  # (B, d, d)
        roots = torch.sqrt(outer)  # NaN where z_i * z_j < 0
        flat = roots.reshape(b * d, d)  # (B*d, d)
        distances = torch.cdist(flat, self.embedding.weight)  # (B*d, K)
        codes = torch.argmin(distances, dim=1)
        one_hot = torch.zeros(b * d, self.codebook_size, device=z.device)
        one_hot.scatter_(1, codes.unsqueeze(1), 1.0)  # (B*d, K)
        quantized = one_hot @ self.embedding.weight  # (B*d, d)
        e_latent_loss = F.mse_loss(quantized.detach(), flat)
        q_latent_loss = F.mse_loss(quantized, flat.detach())
        loss = q_latent_loss * self.beta + e_latent_loss  # beta on the wrong term
        quantized = flat + (quantized - flat).detach()
        avg_probs = one_hot.mean(dim=0)
        perplexity = torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-10)))
        diag = quantized.reshape(b, d, d).diagonal(dim1=1, dim2=2)  # (B, d)
        return diag, loss, perplexity, codes


def seed_peak_bytes_estimate(n: int, dim: int, codebook_size: int) -> int:
    """Rough fp32 peak of one forward+backward: outer, sqrt and their grads (4 x N d^2),
    cdist distances, one-hot and their grad buffers (3 x N d K)."""
    return 4 * (4 * n * dim * dim + 3 * n * dim * codebook_size)
