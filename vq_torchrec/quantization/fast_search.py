"""Nearest-code search with a bf16 candidate pass and an exact fp32 re-score
(``search_precision="bf16"``), in torch ops: what runs on accelerators, and on a CPU where the
C++ certified search (:mod:`.native`) is not built. Where it is, that search replaces this one
(it is exact, with a proven candidate bound, and faster).

1. One bf16 GEMM per row block scores every code with the squared L2 distance
   ``||x'||^2 + ||c'||^2 - 2 x' . c'`` between rows and codes shifted by the codebook mean
   (the same ranking; without the shift a common offset much larger than the spread leaves
   bf16 no digits for the differences: 11 % of rows got the best code on such data, 100 % with
   it). The two norms ride in the GEMM as extra columns, so there is no extra pass over the
   ``(rows, K)`` scores. Distances are ``>= 0``, so the bf16 bit
   patterns read as ``int16`` sort like the values: candidate selection then runs on fast
   integer reductions (values that rounding pushed just below zero rank as better than every
   positive one, so they stay candidates). For cosine, rows and codes are unit vectors and
   the same distance (``2 - 2 cos``) ranks codes like the fp32 score ``x . c``.
2. Codes form ``G`` strided groups of ``g`` (code ``j * G + q`` is in group ``q``; about 128
   groups). The ``num_candidates`` (default 3) groups with the smallest bf16 minimum each give
   their bf16 best code: that many candidates per row. The ``(rows, K)`` scores are read by
   one integer ``amin`` over the groups and a small gather (group ids packed into the low
   bits of int32 keys, so ``amin`` gives value and index at once); everything else touches
   ``(rows, G)`` or fewer values.
3. The candidates are re-scored exactly in fp32 (gathered ``(rows, m, dim)`` codes, batched
   dot products, the same score as :func:`~.distances.nearest_codes`) and the best wins
   (lowest index on exact ties among the candidates; all-zero rows get code 0 for cosine, as
   in the fp32 search).

The fp32 winner is missed only when bf16 rounding (about ``2^-8`` relative on the distance)
makes codes of ``num_candidates`` other groups, or one of its own group, look at least as
good; the code chosen instead is then a near tie whose exact distance is within that
rounding of the optimum. This is measured, not proven: agreement with the fp32 search is
99.95-99.98 % of rows on Gaussian data and 100 % with k-means codebooks
(``benchmarks/bench_search_precision.py``, ``tests/test_fast_search.py``). No
``(N, K, dim)`` tensor is built; memory is at most ``chunk_size * K`` bf16 scores per block.
"""

from __future__ import annotations

import math

import torch

from vq_torchrec.quantization.distances import block_rows, nearest_codes, use_certified_search
from vq_torchrec.quantization.scratch import scratch

# A padding "code" gets this distance (near bf16's largest finite value, so above any real
# one; finite, so the GEMM never forms inf * 0).
_PAD_DISTANCE = 3e38
_INT32_MAX = 2**31 - 1
# Target number of groups; ``g = ceil(K / TARGET_GROUPS)`` codes per group.
TARGET_GROUPS = 128
DEFAULT_CANDIDATES = 3


def group_layout(codebook_size: int, target_groups: int = TARGET_GROUPS) -> tuple[int, int]:
    """``(G, g)``: ``G`` groups of ``g`` codes, ``G * g >= K``. The ``G * g - K < g <= G``
    padding codes sit at the end, one at most per group, so every group holds a real code."""
    target = max(target_groups, math.isqrt(codebook_size) + 1)
    g = max(1, math.ceil(codebook_size / target))
    groups = math.ceil(codebook_size / g)
    assert groups * g - codebook_size < groups, (codebook_size, groups, g)
    return groups, g


@torch.no_grad()
def nearest_codes_bf16(
    x: torch.Tensor,
    codebook: torch.Tensor,
    distance: str,
    chunk_size: int,
    num_candidates: int = DEFAULT_CANDIDATES,
    best_scores: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Index of the nearest code per row: bf16 candidates, exact fp32 choice among them.

    Args:
        x: ``(M, dim)`` fp32 rows (unit rows for ``distance="cosine"``).
        codebook: ``(K, dim)`` fp32 codes (unit rows for cosine).
        distance: ``"l2"`` or ``"cosine"``.
        chunk_size: at most this many rows scored at once (``chunk_size * K`` bf16 scores).
        num_candidates: candidates re-scored exactly per row (``>= 1``).
        best_scores: optional ``(M,)`` fp32 tensor that receives the winner's exact fp32 score
            (as :func:`~.distances.nearest_codes`: ``2 x . c - ||c||^2`` for l2, ``x . c`` for cosine).
        rows: optional ``(M',)`` long indices: search only ``x[rows]``, as in
            :func:`~.distances.nearest_codes`; results then have ``M'`` entries.
    Returns:
        ``(M,)`` long codes.
    """
    if use_certified_search(x, codebook):
        # on CPU the C++ search is exact and faster than this one: nothing left to trade
        return nearest_codes(x, codebook, distance, chunk_size, best_scores=best_scores, rows=rows)
    if rows is not None:
        x = x.index_select(0, rows)
    m = x.shape[0]
    if m == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    k, d = codebook.shape
    groups, per_group = group_layout(k)
    kp = groups * per_group
    cands = min(num_candidates, groups)
    # bf16 weight (dim + 2, K') on mean-shifted codes c' = c - mu:
    # distance = [x', 1, ||x'||^2] @ [[-2 C'^T], [||c'||^2], [1]]
    mu = codebook.mean(dim=0)
    centred = codebook - mu
    weight = torch.zeros(d + 2, kp, dtype=torch.float32, device=x.device)
    weight[:d, :k] = centred.t() * -2.0
    cs_sq = centred.pow(2).sum(dim=1)
    weight[d, :k] = cs_sq
    weight[d, k:] = _PAD_DISTANCE
    weight[d + 1] = 1.0
    weight = weight.to(torch.bfloat16)
    # exact fp32 scores to maximise, on shifted vectors (rows of a block get the same offset
    # r = a x'.mu + ||mu||^2 against every code, so they rank like nearest_codes' scores
    # l2 2 x.c - ||c||^2 / cosine x.c, and r turns the winner's into that score), with the
    # bias riding as an extra column against a constant-1 column of the rows
    exact = torch.empty(k, d + 1, dtype=torch.float32, device=x.device)
    if distance == "l2":
        torch.mul(centred, 2.0, out=exact[:, :d])
        torch.neg(cs_sq, out=exact[:, d])
    else:
        exact[:, :d] = centred
        torch.mv(centred, mu, out=exact[:, d])
    scale = 2.0 if distance == "l2" else 1.0
    mu_sq = mu.pow(2).sum()
    offsets = torch.arange(0, kp, groups, dtype=torch.int32, device=x.device)  # (g,) member j of group q: q + j * G
    group_ids = torch.arange(groups, dtype=torch.int32, device=x.device)
    # bf16 scores take half the bytes of fp32 ones: twice distances.block_rows rows per block
    rows = min(chunk_size, 2 * block_rows(chunk_size, k, x.device), m)
    # per-block buffers (reused across calls on CPU: see .scratch).
    # xf: contiguous fp32 [x - mu, 1] of the block (x may be a strided view; the bf16
    # conversion and the exact re-score both read this cache-resident copy);
    # xa: bf16 [x - mu, 1, ||x - mu||^2]
    xf = scratch("bf16_xf", (rows, d + 1), torch.float32, x.device)
    xf[:, d] = 1.0
    xa = scratch("bf16_xa", (rows, d + 2), torch.bfloat16, x.device)
    scores = scratch("bf16_scores", (rows, kp), torch.bfloat16, x.device)
    codes = torch.empty(m, dtype=torch.long, device=x.device)
    picked = scratch("bf16_picked", (rows * cands, d + 1), torch.float32, x.device)
    exact_scores = scratch("bf16_exact_scores", (rows, cands, 1), torch.float32, x.device)
    mins = scratch("bf16_mins", (rows, cands), torch.int32, x.device)  # packed minima of the picked groups
    for start in range(0, m, rows):
        c = min(rows, m - start)
        # mean-shifted rows: same ranking, small numbers (a large common offset would
        # otherwise leave bf16, and the fp32 re-score, no digits for the differences)
        shifted = torch.sub(x[start : start + c], mu, out=xf[:c, :d])
        xa[:c, : d + 1] = xf[:c]
        xa[:c, d + 1] = torch.linalg.vector_norm(shifted, dim=1).square_()
        keys = torch.mm(xa[:c], weight, out=scores[:c]).view(torch.int16)  # (c, K') ranks like distances
        # group minima with the group id packed in the low bits: one int32 amin gives both
        packed = keys.view(c, per_group, groups).amin(dim=1).to(torch.int32).mul_(groups).add_(group_ids)
        for i in range(cands):  # the cands smallest packed minima (unique per row), in order
            least = torch.amin(packed, dim=1, keepdim=True, out=mins[:c, i : i + 1])
            if i + 1 < cands:
                packed.scatter_(1, least.remainder(groups).long(), _INT32_MAX)
        members = mins[:c].remainder(groups).unsqueeze(2) + offsets  # (c, m, g) int32 code ids
        # bf16 best member of each picked group, its code id packed in the low bits (lowest
        # code on equal keys; int16 keys * K' + code fits int32)
        member_keys = keys.gather(1, members.view(c, -1).long()).view(c, cands, per_group)
        cand = member_keys.to(torch.int32).mul_(kp).add_(members).amin(dim=2).remainder_(kp).long()  # (c, m) < K
        flat = cand.view(-1)
        rows_picked = torch.index_select(exact, 0, flat, out=picked[: c * cands]).view(c, cands, d + 1)
        s = torch.bmm(rows_picked, xf[:c].unsqueeze(2), out=exact_scores[:c]).squeeze(2)  # (c, m) exact fp32
        best = s.amax(dim=1, keepdim=True)
        if best_scores is not None:  # the unshifted score: add the row offset r
            offset = torch.mv(shifted, mu).mul_(scale).add_(mu_sq)
            torch.add(best.squeeze(1), offset, out=best_scores[start : start + c])
        codes[start : start + c] = torch.where(s == best, cand, k).amin(dim=1)
    if distance == "cosine":
        # all-zero rows score 0 against every code; the fp32 search returns the first code
        codes.masked_fill_(torch.linalg.vector_norm(x, dim=1) == 0, 0)
    return codes
