"""Nearest-code search by matmul, in row chunks so that at most ``chunk_size * K`` scores exist.

L2: ``argmin_k ||x - c_k||^2 = argmin_k (||c_k||^2 - 2 x . c_k)`` (``||x||^2`` is constant per row).
Cosine: rows and codes are unit vectors, so ``argmax_k x . c_k``.
No ``(N, K, dim)`` tensor and no one-hot matrix is ever built.
"""

from __future__ import annotations

import torch

from vq_torchrec.quantization import native
from vq_torchrec.quantization.scratch import scratch

# Scores per block (fp32): 4 MiB stays in a CPU's L2 cache, where the GEMM + max pass is ~2x
# faster than on a 32 MiB block (8192 rows x K 1024). Blocks are the smaller of this and
# ``chunk_size`` rows, so ``chunk_size`` stays the hard memory bound.
CACHE_SCORES = 1 << 20


def block_rows(chunk_size: int, codebook_size: int, device: torch.device | None = None) -> int:
    """Rows scored per block: on CPU ``min(chunk_size, max(64, CACHE_SCORES // K))``; on
    accelerators (no small cache to fit, and every block is a kernel launch) ``chunk_size``."""
    if device is not None and device.type != "cpu":
        return chunk_size
    return min(chunk_size, max(64, CACHE_SCORES // codebook_size))


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows of ``x`` (``(..., dim)``) scaled to unit L2 norm. Rows with norm ``< eps`` have no
    direction: they become zero with a zero gradient (dividing by ``eps`` would give them a
    gradient of order ``1 / eps``, e.g. 1e10 for an all-zero row in a cosine VQ loss)."""
    norm = x.norm(dim=-1, keepdim=True)
    keep = norm >= eps
    return torch.where(keep, x / torch.where(keep, norm, torch.ones_like(norm)), torch.zeros_like(x))


def use_certified_search(x: torch.Tensor, codebook: torch.Tensor) -> bool:
    """Whether the CPU search runs the C++ certified kernel (:func:`.native.certified_search`:
    exact, bf16 candidates with a proven error bound, fp32 re-score) instead of the torch GEMM."""
    return (
        x.device.type == "cpu"
        and codebook.device.type == "cpu"
        and x.dtype == torch.float32
        and codebook.dtype == torch.float32
        and native.available()
    )


@torch.no_grad()
def nearest_codes(
    x: torch.Tensor,
    codebook: torch.Tensor,
    distance: str,
    chunk_size: int,
    best_scores: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Index of the nearest code for every row (the first one on ties).

    On CPU, when the C++ kernel is built (:mod:`.native`), the certified search runs instead of
    the fp32 GEMM below: same codes, except that near-ties within fp32 rounding of the score
    may resolve differently (its fp32 scores are computed on mean-shifted vectors, so they are
    the more accurate ones); ``VQ_TORCHREC_NATIVE=0`` switches it off.

    Args:
        x: ``(M, dim)`` fp32 rows (unit rows for ``distance="cosine"``).
        codebook: ``(K, dim)`` fp32 codes (unit rows for cosine).
        distance: ``"l2"`` or ``"cosine"``.
        chunk_size: at most this many rows scored at once (memory ``chunk_size * K`` floats,
            one buffer reused across blocks); see :func:`block_rows`.
        best_scores: optional ``(M,)`` fp32 tensor that receives each row's winning score:
            ``2 x . c - ||c||^2`` for l2 (so ``||x - c||^2 = ||x||^2 - score``), ``x . c`` for
            cosine.
        rows: optional ``(M',)`` long indices: search only ``x[rows]`` (the C++ search reads
            them in place); codes and scores then have ``M'`` entries.
    Returns:
        ``(M,)`` long codes.
    """
    if use_certified_search(x, codebook) and (x.shape[0] if rows is None else rows.numel()):
        codes, best, _ = native.certified_search(x, codebook, distance, chunk_size, rows=rows)
        if best_scores is not None:
            best_scores.copy_(best)
        return codes
    if rows is not None:
        x = x.index_select(0, rows)
    m = x.shape[0]
    codes = torch.empty(m, dtype=torch.long, device=x.device)
    if m == 0:
        return codes
    k, d = codebook.shape
    chunk_size = block_rows(chunk_size, k, x.device)
    rows = min(chunk_size, m)
    scores = scratch("fp32_scores", (rows, k), torch.float32, x.device)
    best = scratch("fp32_best", (rows,), torch.float32, x.device) if best_scores is None else best_scores
    if distance == "l2":
        # argmin ||c||^2 - 2 x.c == argmax [x, 1] @ [[2 C^T], [-||c||^2]]: the bias rides in the
        # GEMM, so no (chunk, K) bias copy and no extra pass over the scores
        weight = torch.cat([codebook.t() * 2.0, codebook.pow(2).sum(dim=1).neg_().unsqueeze(0)])
        xbuf = scratch("fp32_xbuf", (rows, d + 1), torch.float32, x.device)
        xbuf[:, d] = 1.0
    else:
        weight = codebook.t()
    for start in range(0, m, chunk_size):
        chunk = x[start : start + chunk_size]
        c = chunk.shape[0]
        out = scores[:c]
        if distance == "l2":
            xbuf[:c, :d] = chunk
            torch.mm(xbuf[:c], weight, out=out)
        else:
            torch.mm(chunk, weight, out=out)
        # torch.max(dim) returns the first maximal index, like argmax, and is ~2x faster on CPU
        scores_out = best[:c] if best_scores is None else best[start : start + c]
        torch.max(out, dim=1, out=(scores_out, codes[start : start + c]))
    return codes


def code_counts(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """``(K,)`` fp32 histogram of ``codes`` (any shape) via ``index_add_`` (no device sync,
    unlike ``torch.bincount`` on CUDA)."""
    flat = codes.reshape(-1)
    counts = torch.zeros(codebook_size, dtype=torch.float32, device=codes.device)
    return counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))


class DenseRows:
    """Materialised rows to be quantized: ``x`` of shape ``(M, dim)`` fp32.

    The same interface as :class:`~vq_torchrec.quantization.outer.OuterRows`, so k-means,
    EMA and dead-code restarts do not care which mode produced the rows.
    """

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    @property
    def num_rows(self) -> int:
        return self.x.shape[0]

    def assign(self, codebook: torch.Tensor, distance: str, chunk_size: int) -> torch.Tensor:
        """``(M,)`` nearest codes."""
        return nearest_codes(self.x, codebook, distance, chunk_size)

    @torch.no_grad()
    def sums(self, codes: torch.Tensor, codebook_size: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-code ``(counts (K,), sum of assigned rows (K, dim))`` in fp32."""
        counts = code_counts(codes, codebook_size)
        sums = torch.zeros(codebook_size, self.x.shape[1], dtype=torch.float32, device=self.x.device)
        sums.index_add_(0, codes, self.x)
        return counts, sums

    @torch.no_grad()
    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (``(m,)`` long into ``[0, num_rows)``) as ``(m, dim)``."""
        return self.x.index_select(0, index)
