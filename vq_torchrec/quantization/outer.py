"""Outer (pairwise-product) mode, done without the ``(N, dim, dim)`` matrix.

For ``z`` of shape ``(N, d)`` let ``s = sign(z) * sqrt(|z|)`` (signed root: never NaN). Item
``n`` has ``d`` rows ``r_{n,i} = s_{n,i} * s_n`` (the rows of ``outer(s_n, s_n)``), each matched
to the codebook, so ``codes`` is ``(N, d)``. Written generally as ``r_{n,i} = a_{n,i} u_n``:

* ``distance="l2"``: ``a = s``, ``u = s``;
* ``distance="cosine"``: the unit row is ``sign(s_i) * s / ||s||``, so ``a = sign(s)``,
  ``u = s / ||s||`` and codes are unit vectors.

Then ``||a u - c||^2 = a^2 ||u||^2 - 2 a (u . c) + ||c||^2``, so with ``P = u @ C^T`` (one
``(N, d) x (d, K)`` product) the code of row ``(n, i)`` is ``argmin_k ||c_k||^2 - 2 a_{n,i} P[n, k]``,
scored in chunks of items (``(chunk, d, K)`` at a time). For cosine only two codes per item are
possible: ``argmax_k P[n, k]`` (``a > 0``) or ``argmin_k P[n, k]`` (``a < 0``).

Decoding: the diagonal entry ``r_{n,i}[i] = s_i^2 = |z_i|`` is approximated by
``C[code_i, i]`` (cosine: ``|s_i| ||s|| * C[code_i, i]``), and re-applying ``sign(z_i)`` gives an
approximation of ``z_i`` itself; the straight-through estimator is then taken against ``z``.

The loss on rows needs ``u_n . c_{code_{n,i}}`` with gradients; :class:`OuterDot` computes it
chunk by chunk (gather from ``u @ C^T`` forward, scatter into ``(chunk, K)`` + two matmuls
backward) so neither ``N * d * d`` nor a full ``N * K`` tensor is kept for autograd.
"""

from __future__ import annotations

from typing import Any

import torch

from vq_torchrec.quantization.distances import code_counts, l2_normalize

# Gradient of sqrt(|z|) is 1 / (2 sqrt(|z|)): infinite at 0. The signed root uses this floor
# on |z| in its backward only, so gradients stay finite for exact zeros.
SIGNED_SQRT_GRAD_FLOOR = 1e-6
# l2 outer scores are built for this many (item, i, k) entries at a time (2 MiB: cache-sized).
_SCORE_ELEMENTS = 1 << 19


class _SignedSqrt(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
        s = torch.sign(z) * torch.sqrt(torch.abs(z))
        ctx.save_for_backward(z)
        return s

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (z,) = ctx.saved_tensors
        return grad / (2.0 * torch.sqrt(torch.abs(z).clamp_min(SIGNED_SQRT_GRAD_FLOOR)))


def signed_sqrt(z: torch.Tensor) -> torch.Tensor:
    """``sign(z) * sqrt(|z|)``, elementwise; finite value and gradient everywhere."""
    return _SignedSqrt.apply(z)


class OuterDot(torch.autograd.Function):
    """``D[n, i] = u_n . C[codes[n, i]]`` for ``u (N, d)``, ``C (K, d)``, ``codes (N, d)``."""

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor, chunk: int) -> torch.Tensor:
        out = torch.empty(codes.shape, dtype=u.dtype, device=u.device)
        codebook_t = codebook.t()
        for start in range(0, u.shape[0], chunk):
            p = torch.mm(u[start : start + chunk], codebook_t)  # (c, K)
            torch.gather(p, 1, codes[start : start + chunk], out=out[start : start + chunk])
        ctx.save_for_backward(u, codebook, codes)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u, codebook, codes = ctx.saved_tensors
        need_u, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_u = torch.empty_like(u) if need_u else None
        grad_c = torch.zeros_like(codebook) if need_c else None
        k = codebook.shape[0]
        for start in range(0, u.shape[0], ctx.chunk):
            g = grad[start : start + ctx.chunk]
            m = torch.zeros(g.shape[0], k, dtype=g.dtype, device=g.device)
            m.scatter_add_(1, codes[start : start + ctx.chunk], g)  # (c, K)
            if grad_u is not None:
                torch.mm(m, codebook, out=grad_u[start : start + ctx.chunk])
            if grad_c is not None:
                grad_c.addmm_(m.t(), u[start : start + ctx.chunk])
        return grad_u, grad_c, None, None


def outer_factors(z32: torch.Tensor, distance: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, u)`` with rows ``r_{n,i} = a_{n,i} u_n`` (see module doc); both ``(N, d)`` fp32."""
    s = signed_sqrt(z32)
    if distance == "cosine":
        return torch.sign(s), l2_normalize(s)
    return s, s


def outer_chunk(chunk_size: int, dim: int) -> int:
    """Items per chunk so that ``items * dim * K <= chunk_size * K``."""
    return max(1, chunk_size // dim)


class OuterRows:
    """The ``N * d`` implicit rows ``a_{n,i} u_n``; flat row index ``j = n * d + i``."""

    def __init__(self, a: torch.Tensor, u: torch.Tensor) -> None:
        self.a = a
        self.u = u

    @property
    def num_rows(self) -> int:
        return self.a.numel()

    @torch.no_grad()
    def assign(self, codebook: torch.Tensor, distance: str, chunk_size: int) -> torch.Tensor:
        """``(N, d)`` codes. ``P = u @ C^T`` is formed for blocks of ``chunk_size // d`` items;
        l2 scores ``(items, d, K)`` for a few items at a time in one reused, cache-sized buffer."""
        n, d = self.a.shape
        codes = torch.empty(n, d, dtype=torch.long, device=self.a.device)
        if n == 0:
            return codes
        k = codebook.shape[0]
        block = outer_chunk(chunk_size, d)
        codebook_t = codebook.t()
        if distance == "cosine":
            for start in range(0, n, block):
                p = torch.mm(self.u[start : start + block], codebook_t)  # (b, K)
                best = p.argmax(dim=1, keepdim=True)
                worst = p.argmin(dim=1, keepdim=True)
                codes[start : start + block] = torch.where(self.a[start : start + block] < 0, worst, best)
            return codes
        neg_c2 = codebook.pow(2).sum(dim=1).neg_()  # (K,)
        sub = max(1, min(block, _SCORE_ELEMENTS // (d * k)))
        scores = torch.empty(min(sub, n), d, k, dtype=torch.float32, device=self.a.device)
        best = torch.empty(min(sub, n), d, dtype=torch.float32, device=self.a.device)
        for start in range(0, n, block):
            p2 = torch.mm(self.u[start : start + block], codebook_t).mul_(2.0)  # (b, K): 2 u.c
            for s0 in range(0, p2.shape[0], sub):
                a = self.a[start + s0 : start + s0 + sub]
                c = a.shape[0]
                out = scores[:c]
                # argmin ||c||^2 - 2 a (u.c)  ==  argmax a * (2 u.c) - ||c||^2
                torch.addcmul(neg_c2, a.unsqueeze(2), p2[s0 : s0 + c].unsqueeze(1), out=out)
                torch.max(out, dim=2, out=(best[:c], codes[start + s0 : start + s0 + c]))
        return codes

    @torch.no_grad()
    def sums(self, codes: torch.Tensor, codebook_size: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``counts (K,)`` and ``sums (K, d)`` with ``sums[k] = sum_{code_{n,i}=k} a_{n,i} u_n``,
        computed as ``M^T u`` with ``M[n, k] = sum_i a_{n,i} [code_{n,i} = k]``, chunked."""
        counts = code_counts(codes, codebook_size)
        n, d = self.a.shape
        sums = torch.zeros(codebook_size, d, dtype=torch.float32, device=self.a.device)
        chunk = max(1, chunk_size)
        for start in range(0, n, chunk):
            a = self.a[start : start + chunk]
            m = torch.zeros(a.shape[0], codebook_size, dtype=torch.float32, device=a.device)
            m.scatter_add_(1, codes[start : start + chunk], a)
            sums.addmm_(m.t(), self.u[start : start + chunk])
        return counts, sums

    @torch.no_grad()
    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Materialise rows ``index`` (flat ``n * d + i``) as ``(m, d)``."""
        d = self.a.shape[1]
        return self.a.reshape(-1).index_select(0, index).unsqueeze(1) * self.u.index_select(0, index // d)


def outer_decode(
    z32: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor, distance: str
) -> torch.Tensor:
    """``q[n, i] = sign(z_i) * C[code_i, i]`` (cosine: ``* |s_i| ||s||``); ``(N, d)``, no grad."""
    n, d = codes.shape
    flat = codes * d + torch.arange(d, device=codes.device)
    diag = codebook.reshape(-1)[flat]  # (N, d): C[code_{n,i}, i]
    if distance == "cosine":
        s = torch.sqrt(torch.abs(z32))
        diag = diag * s * s.norm(dim=1, keepdim=True)
    return torch.sign(z32) * diag


def outer_loss_terms(
    a: torch.Tensor,
    u: torch.Tensor,
    codebook: torch.Tensor,
    codes: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """``(N, d)`` squared distances ``||a_{n,i} u_n - C[code_{n,i}]||^2 / d`` with autograd to
    ``a``, ``u`` and ``codebook`` (whichever require grad); clamped at 0 against cancellation."""
    d = a.shape[1]
    dots = OuterDot.apply(u, codebook, codes, outer_chunk(chunk_size, d))
    c2 = codebook.pow(2).sum(dim=1)[codes]
    dist = a.pow(2) * u.pow(2).sum(dim=1, keepdim=True) - 2.0 * a * dots + c2
    return dist.clamp_min(0.0) / d
