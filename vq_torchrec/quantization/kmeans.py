"""k-means initialisation of a codebook, identical on every rank of the group.

Initial centres are rank 0's random rows (broadcast); each Lloyd iteration all-reduces the
per-code sums and counts, so every rank computes the same centres. A fixed number of
iterations (no convergence test) keeps the host free of device syncs.
"""

from __future__ import annotations

import torch

from vq_torchrec.quantization.distances import l2_normalize
from vq_torchrec.quantization.distributed import ProcessGroup, all_reduce_sum_
from vq_torchrec.quantization.sampling import Rows, dense_subsample, shared_sample

# Rows per rank that k-means looks at (outer mode has N * dim rows; a sample is plenty).
KMEANS_MAX_ROWS = 65536


@torch.no_grad()
def kmeans(
    rows: Rows,
    codebook_size: int,
    dim: int,
    iters: int,
    distance: str,
    chunk_size: int,
    group: ProcessGroup,
    device: torch.device,
    max_rows: int = KMEANS_MAX_ROWS,
) -> torch.Tensor:
    """``(K, dim)`` fp32 centres (unit rows for cosine). Empty clusters keep their centre."""
    sample = dense_subsample(rows, max_rows, dim, device)
    centres, _ = shared_sample(sample, codebook_size, dim, device, group)
    if distance == "cosine":
        centres = l2_normalize(centres)
    for _ in range(iters):
        codes = sample.assign(centres, distance, chunk_size)
        counts, sums = sample.sums(codes, codebook_size, chunk_size)
        buf = all_reduce_sum_(torch.cat([counts.unsqueeze(1), sums], dim=1), group)
        counts, sums = buf[:, 0], buf[:, 1:]
        means = sums / counts.clamp_min(1.0).unsqueeze(1)
        if distance == "cosine":
            means = l2_normalize(means)
        centres = torch.where((counts > 0).unsqueeze(1), means, centres)
    return centres
