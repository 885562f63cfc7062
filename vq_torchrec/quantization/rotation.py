"""Gradient estimators that pass the decoder's gradient from ``quantized`` back to ``z``, and
the dtype casts around the fp32 core.

Both estimators return a tensor whose *value* is exactly ``q`` (the quantized vector, cast to
``z``'s dtype); they differ only in the gradient:

* straight-through (VQ-VAE): ``d quantized / d z = I`` (an autograd function: no arithmetic
  in either direction, the incoming gradient is handed to ``z`` as is);
* rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation
  Trick"): ``quantized = sg[||q|| / ||z||] * sg[R] z`` with ``R`` the rotation taking ``z/||z||``
  to ``q/||q||``, ``R = I - 2 w w^T + 2 q_hat z_hat^T``, ``w = (z_hat + q_hat) / ||z_hat + q_hat||``,
  applied as vector products (no ``(N, d, d)`` matrices). Rows with ``||z|| < 1e-12`` have no
  direction to rotate: they get the straight-through gradient (a bounded one, not ``1/||z||``).

The output cast to fp16/bf16 saturates at the dtype's largest finite value instead of
overflowing to Inf. Gradients are not saturated: the fp32 gradient is rounded to the input's
dtype once (by ``z.float()``'s backward), so an fp16 overflow shows up as Inf for a GradScaler.
"""

from __future__ import annotations

from typing import Any

import torch

_NORM_EPS = 1e-12
_NARROW = (torch.float16, torch.bfloat16)


def saturating_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, clamped to the finite range of fp16/bf16 (no autograd)."""
    if dtype in _NARROW and x.dtype != dtype:
        info = torch.finfo(dtype)
        return x.clamp(info.min, info.max).to(dtype)
    return x.to(dtype)


class _CastOut(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.dtype = x.dtype
        return saturating_cast(x, dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.to(ctx.dtype), None


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z32: torch.Tensor, q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.dtype = z32.dtype
        out = saturating_cast(q, dtype)
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad.to(ctx.dtype), None, None


def straight_through(z32: torch.Tensor, q: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Value ``q`` (cast saturating to ``dtype``, default ``z32``'s), gradient identity to
    ``z32``; ``(N, d)`` both. No arithmetic in either direction."""
    return _StraightThrough.apply(z32, q.detach(), z32.dtype if dtype is None else dtype)


def rotation_trick(z32: torch.Tensor, q: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Value ``q`` (cast to ``dtype``, default fp32), gradient through the rotation+rescale of
    ``z32``; ``(N, d)`` fp32 both."""
    z_d, q_d = z32.detach(), q.detach()
    z_norm = z_d.norm(dim=1, keepdim=True)
    no_direction = z_norm < _NORM_EPS  # (near-)zero rows: no rotation defined, use identity
    z_norm = torch.where(no_direction, torch.ones_like(z_norm), z_norm)
    q_norm = q_d.norm(dim=1, keepdim=True)
    z_hat = z_d / z_norm
    q_hat = q_d / q_norm.clamp_min(_NORM_EPS)
    w = z_hat + q_hat
    w = w / w.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
    rotated = (
        z32
        - 2.0 * w * (w * z32).sum(dim=1, keepdim=True)
        + 2.0 * q_hat * (z_hat * z32).sum(dim=1, keepdim=True)
    )
    out = torch.where(no_direction, z32, (q_norm / z_norm) * rotated)
    out = q_d + (out - out.detach())
    return out if dtype is None else _CastOut.apply(out, dtype)
