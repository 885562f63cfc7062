"""Argument and input checks for the quantizers: every bad value gets an error that names it.

Shape/dtype checks are plain Python (free). The NaN/Inf check on ``z`` raises a ``ValueError``
on CPU (a CPU tensor read is not a device sync) and uses ``torch._assert_async`` on
accelerators, so the forward path never blocks the host there.
"""

from __future__ import annotations

from typing import Any

import torch

MODES = ("vector", "outer")
# Largest accepted |z|: squared distances and the loss's sums of squares (about
# ``|z|^2 * dim * N``) then stay inside float32 for any realistic batch; beyond it they
# overflow to Inf/NaN silently. An embedding this large means the model has diverged.
MAX_ABS_INPUT = 1e15
DISTANCES = ("l2", "cosine")
UPDATES = ("loss", "ema")
SEARCH_PRECISIONS = ("fp32", "bf16")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"VectorQuantizer: {name} must be one of {list(choices)}, got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"VectorQuantizer: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"VectorQuantizer: {name} must be >= {minimum}, got {value}")


def _check_float(name: str, value: Any, low: float, high: float, *, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"VectorQuantizer: {name} must be a float, got {type(value).__name__}")
    ok_low = value > low if open_low else value >= low
    if not (ok_low and value <= high):
        bracket = "(" if open_low else "["
        raise ValueError(f"VectorQuantizer: {name} must be in {bracket}{low}, {high}], got {value}")


def validate_quantizer_args(
    *,
    dim: int,
    codebook_size: int,
    mode: str,
    distance: str,
    update: str,
    commitment_weight: float,
    decay: float,
    eps: float,
    kmeans_iters: int,
    dead_code_threshold: float,
    restart_every: int,
    chunk_size: int,
    search_precision: str = "fp32",
) -> None:
    """Raise ``ValueError``/``TypeError`` naming the first bad constructor argument."""
    _check_int("dim", dim, 1)
    _check_int("codebook_size", codebook_size, 1)
    _check_choice("mode", mode, MODES)
    _check_choice("distance", distance, DISTANCES)
    _check_choice("update", update, UPDATES)
    _check_float("commitment_weight", commitment_weight, 0.0, float("inf"))
    _check_float("decay", decay, 0.0, 1.0)
    _check_float("eps", eps, 0.0, float("inf"), open_low=True)
    _check_int("kmeans_iters", kmeans_iters, 0)
    _check_float("dead_code_threshold", dead_code_threshold, 0.0, float(codebook_size))
    _check_int("restart_every", restart_every, 0)
    _check_int("chunk_size", chunk_size, 1)
    _check_choice("search_precision", search_precision, SEARCH_PRECISIONS)
    if search_precision != "fp32" and mode != "vector":
        raise ValueError(
            f"VectorQuantizer: search_precision={search_precision!r} is only implemented for mode='vector' "
            f"(got mode={mode!r}); use search_precision='fp32' with mode='outer'"
        )


def validate_input(z: Any, dim: int, *, who: str = "VectorQuantizer") -> None:
    """Check ``z`` is a floating tensor of shape ``(..., dim)`` holding only finite values
    with ``|z| <= MAX_ABS_INPUT``.

    Raises:
        TypeError: ``z`` is not a tensor, or not floating point.
        ValueError: last dimension is not ``dim``, ``z`` is 0-d, or (on CPU) ``z`` holds NaN/Inf
            or values beyond ``MAX_ABS_INPUT``. On accelerators that check is an asynchronous
            device assert.
    """
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{who}: expected z to be a torch.Tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(
            f"{who}: expected a floating-point z (float32/bfloat16/float16/float64), got dtype {z.dtype}"
        )
    if z.dim() == 0 or z.shape[-1] != dim:
        raise ValueError(
            f"{who}: expected z of shape (N, {dim}) (last dimension = dim = {dim}), "
            f"got shape {tuple(z.shape)}"
        )
    if z.numel() == 0:
        return
    # one fused min/max pass, no |z| temporary (5x cheaper than abs/le/all on CPU); NaN
    # propagates into both, and the fp32 compare also catches Inf for float16 inputs
    low, high = torch.aminmax(z.detach())
    in_range = (high.float() <= MAX_ABS_INPUT) & (low.float() >= -MAX_ABS_INPUT)
    if z.device.type == "cpu":
        if not bool(in_range):
            bad = int((~torch.isfinite(z)).sum())
            if bad:
                raise ValueError(
                    f"{who}: input z contains NaN or Inf ({bad} of {z.numel()} values, shape {tuple(z.shape)})"
                )
            huge = int((z.abs() > MAX_ABS_INPUT).sum())
            raise ValueError(
                f"{who}: input z has {huge} of {z.numel()} values with |z| > {MAX_ABS_INPUT:.0e} "
                f"(max |z| = {float(z.detach().abs().max()):.3g}, shape {tuple(z.shape)}): their squares would "
                "overflow the float32 distances and loss"
            )
    else:
        torch._assert_async(in_range, f"{who}: input z contains NaN or Inf or values with |z| > {MAX_ABS_INPUT:.0e}")
