"""Grouped fast path: quantize the pooled rows of many tables in one pass.

A DLRM batch gives every quantized table the same shape of work: ``B`` pooled rows of width
``d`` per feature ("slot"). Run table by table, each :class:`VectorQuantizer` call repeats a
dozen passes over its ``(B, d)`` rows (range check, search, loss, straight-through, EMA sums)
and the collection then concatenates the outputs and splits the gradients again. This module
does the same computation for all slots at once on the ``(B, S, d)`` view of the pooled
values:

* one ``||z||^2`` pass (the range check, the bf16 search's norm column and the loss);
* the nearest-code search per slot, unchanged (:func:`~.distances.nearest_codes` or
  :func:`~.fast_search.nearest_codes_bf16`), which also returns the winner's exact score, so
  the commitment loss ``||z - e||^2 = ||z||^2 - (2 z . e - ||e||^2)`` needs no extra pass;
* one ``index_select`` from the stacked codebooks that *is* the output ``(B, S, d)`` (no
  concatenation), one ``index_add_`` for all EMA counts and sums, one all-reduce;
* one autograd node for straight-through + commitment gradient:
  ``dz = dq + 2 * dsse_s * (z - q)``, one fused pass in the backward (on CPU the C++
  ``commit_grad`` kernel of :mod:`.native`, else a subtraction and an ``addcmul``).

Applies when every quantizer is a plain :class:`VectorQuantizer` with ``mode="vector"``,
``distance="l2"``, ``update="ema"``, straight-through gradients, the same ``dim``, the same
process group and train/eval mode, fp32 input, and is initialised (the first training
batch, which runs k-means, takes the per-table path). Codes, codebooks and statistics equal
the per-table path's (same search, same per-code summation order); the loss value is the
same quantity computed from the search's distance expansion (fp32 rounding differs:
relative error about ``1e-7 * ||z||^2 / ||z - e||^2`` per row).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from vq_torchrec.quantization import native
from vq_torchrec.quantization.distances import DenseRows, nearest_codes
from vq_torchrec.quantization.distributed import all_reduce_sum_, resolve_group, world_size
from vq_torchrec.quantization.fast_search import nearest_codes_bf16
from vq_torchrec.quantization.recycle import recycled
from vq_torchrec.quantization.scratch import scratch
from vq_torchrec.quantization.validation import MAX_ABS_INPUT
from vq_torchrec.quantization.vector_quantizer import VectorQuantizer


class GroupedResult(NamedTuple):
    """Output of :func:`quantize_slots` for ``B`` rows, ``S`` slots, ``T`` tables.

    Attributes:
        quantized: ``(B, S, d)`` fp32 code vectors (zero rows where ``mask`` is False);
            gradients reach ``z`` straight through, plus the commitment gradient via ``losses``.
        codes: ``(B, S)`` long codes (each slot indexes its own table's codebook).
        losses: ``T`` fp32 0-d losses, ``beta_t * mean((z - sg[e])^2)`` over table ``t``'s rows.
        counts: ``T`` fp32 ``(K_t,)`` code histograms (summed over the group in training).
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    losses: list[torch.Tensor]
    counts: list[torch.Tensor]


def grouped_eligible(quantizers: Sequence[Any], dim: int) -> bool:
    """Whether :func:`quantize_slots` may run these quantizers (see the module docstring)."""
    if not quantizers:
        return False
    first = quantizers[0]
    for q in quantizers:
        if type(q) is not VectorQuantizer:
            return False
        if q.mode != "vector" or q.distance != "l2" or q.update != "ema" or q.rotation_trick:
            return False
        if q.dim != dim or q.training != first.training or q.process_group is not first.process_group:
            return False
        if not q._initialized or q._fresh_init:
            return False
    return True


class _CommitStraightThrough(torch.autograd.Function):
    """Value ``q`` ``(B, S, d)`` and per-slot ``sse`` ``(S,)``; gradient to ``z`` ``(B, S, d)``:
    ``dq + 2 * dsse[s] * (z - q)`` (straight-through plus the commitment term's gradient)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, q: torch.Tensor, sse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(z, q)
        return q.view_as(q), sse.clone()

    @staticmethod
    def backward(ctx: Any, grad_q: torch.Tensor | None, grad_sse: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        z, q = ctx.saved_tensors
        if grad_sse is None:
            return (grad_q if grad_q is not None else torch.zeros_like(z)), None, None
        if grad_q is not None and z.device.type == "cpu" and z.dtype == torch.float32 and native.available():
            return native.commit_grad(grad_q, z, q, 2.0 * grad_sse), None, None
        diff = torch.sub(z, q, out=recycled("commit_grad", tuple(z.shape), z.dtype, z.device))
        coef = (2.0 * grad_sse).view(1, -1, 1)
        if grad_q is None:
            return diff.mul_(coef), None, None
        return torch.addcmul(grad_q, diff, coef, out=diff), None, None


def _in_range(z: torch.Tensor, x_sq: torch.Tensor, labels: Sequence[str]) -> bool:
    """CPU: ``True`` when every row is finite with ``||z||^2 <= MAX_ABS_INPUT^2`` (one read of
    ``(B, S)`` norms); on ``False`` nothing has changed yet and the caller raises the
    per-table path's error naming table and feature (or, for large but valid rows, runs the
    per-table path). Accelerators: one asynchronous assert per slot (no host sync)."""
    if z.device.type == "cpu":
        return bool(x_sq.amax() <= MAX_ABS_INPUT * MAX_ABS_INPUT)
    peak = torch.linalg.vector_norm(z, ord=float("inf"), dim=(0, 2))  # (S,), NaN propagates
    for slot, label in enumerate(labels):
        torch._assert_async(
            peak[slot] <= MAX_ABS_INPUT,
            f"NaN or Inf (or |z| > {MAX_ABS_INPUT:g}) embeddings reached the VQ quantizer of {label}",
        )
    return True


# Search only the distinct rows of a slot when at most this share of its rows is distinct.
DEDUP_MAX_SHARE = 0.9


@torch.no_grad()
def _search(
    quantizers: Sequence[VectorQuantizer],
    slot_table: Sequence[int],
    z: torch.Tensor,
    x_sq: torch.Tensor,
    slot_ids: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes (B, S) long, dist (B, S) fp32 = ||z - e||^2)`` by each slot's table's search.

    ``slot_ids[s]`` (``(B,)`` ids, or ``None``) says that row ``b`` of slot ``s`` is the table
    row ``ids[b]`` (one id per bag, unweighted): equal ids are equal rows, so only the distinct
    ones are searched (same codes and distances; Zipf-like ids repeat a lot)."""
    b, s, _ = z.shape
    codes = torch.empty(b, s, dtype=torch.long, device=z.device)
    best = torch.empty(s, b, dtype=torch.float32, device=z.device)
    for slot in range(s):
        q = quantizers[slot_table[slot]]
        x, rows, inverse = z[:, slot], None, None
        ids = slot_ids[slot] if slot_ids is not None else None
        if ids is not None:
            rows, inverse = _distinct_rows(ids)
        scores = best[slot] if rows is None else torch.empty(rows.numel(), device=z.device)
        search = nearest_codes_bf16 if q.search_precision == "bf16" else nearest_codes
        c = search(x, q.embed, "l2", q.chunk_size, best_scores=scores, rows=rows)
        if inverse is not None:
            c = c.index_select(0, inverse)
            torch.index_select(scores, 0, inverse, out=best[slot])
        codes[:, slot] = c
    dist = torch.sub(x_sq, best.t()).clamp_min_(0.0)
    return codes, dist


def _distinct_rows(ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(rows (U,), inverse (B,))``: the position of one row per distinct id of ``ids`` (row
    ``b`` of the slot is table row ``ids[b]``), with ``ids[b] == ids[rows[inverse[b]]]``; or
    ``(None, None)`` when more than ``DEDUP_MAX_SHARE`` of the ids are distinct."""
    b = ids.shape[0]
    distinct, inverse = torch.unique(ids, return_inverse=True)
    if distinct.numel() > DEDUP_MAX_SHARE * b:
        return None, None
    rows = torch.empty(distinct.numel(), dtype=torch.long, device=ids.device)
    rows.scatter_(0, inverse, torch.arange(b, device=ids.device))  # a row of each distinct id
    return rows, inverse


def quantize_slots(
    quantizers: Sequence[VectorQuantizer],
    slot_table: Sequence[int],
    z: torch.Tensor,
    mask: torch.Tensor | None = None,
    labels: Sequence[str] | None = None,
    slot_ids: Sequence[torch.Tensor | None] | None = None,
) -> GroupedResult | None:
    """Quantize slot ``s`` of ``z`` with ``quantizers[slot_table[s]]``, all slots in one pass.

    Args:
        quantizers: ``T`` quantizers that pass :func:`grouped_eligible` (train mode updates
            their state exactly like their own forward would).
        slot_table: ``S`` table indices, one per slot.
        z: ``(B, S, d)`` fp32, differentiable (typically a view of the pooled ``(B, S * d)``).
        mask: optional ``(B, S)`` bool; ``False`` rows (empty bags) give zero vectors.
        labels: ``S`` names for error messages (``"table 't', feature 'f'"``).
        slot_ids: optional ``S`` entries, ``(B,)`` ids where every bag of the slot is one
            unweighted id (then equal ids are equal rows and are searched once), else ``None``.

    Returns:
        :class:`GroupedResult`, or ``None`` on CPU when some row is non-finite or too large
        (nothing was changed; the per-table path then reports it).
    """
    b, s, d = z.shape
    if b == 0 or s == 0:
        return None
    zd = z.detach()
    x_sq = torch.linalg.vector_norm(zd, dim=-1).square_()  # (B, S)
    if not _in_range(zd, x_sq, labels or [f"slot {i}" for i in range(s)]):
        return None
    device = z.device
    sizes = [q.codebook_size for q in quantizers]
    starts = [0]
    for k in sizes:
        starts.append(starts[-1] + k)
    slot_offsets, table_index, weights = _layout_tensors(
        tuple(slot_table), tuple(starts), tuple(q.commitment_weight for q in quantizers), d, device
    )
    codes, dist = _search(quantizers, slot_table, zd, x_sq, slot_ids)
    flat = (codes + slot_offsets).view(-1)
    with torch.no_grad():
        stacked = torch.cat([q.embed for q in quantizers]) if len(quantizers) > 1 else quantizers[0].embed
        out = recycled("grouped_output", (b * s, d), stacked.dtype, device)  # see .recycle
        e = torch.index_select(stacked, 0, flat, out=out).view(b, s, d)
        if mask is not None:
            e.masked_fill_(~mask.unsqueeze(-1), 0.0)
        counts_all = _statistics(quantizers, slot_table, starts, zd, flat)
    quantized, sse = _CommitStraightThrough.apply(z, e, dist.sum(dim=0))
    losses = torch.zeros(len(quantizers), dtype=torch.float32, device=device).index_add(0, table_index, sse * (weights / b))
    counts = [counts_all[starts[t] : starts[t + 1]] for t in range(len(quantizers))]
    return GroupedResult(quantized, codes, list(losses.unbind(0)), counts)


@functools.lru_cache(maxsize=64)
def _layout_tensors(
    slot_table: tuple[int, ...], starts: tuple[int, ...], betas: tuple[float, ...], dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per slot: codebook offset in the stacked codebooks, table index, and loss weight
    ``beta_t / (n_slots(t) * dim)`` (divide by ``B`` for the mean). Cached per layout, so the
    forward makes no host-to-device copies (no sync on accelerators)."""
    slots_of = [sum(1 for t in slot_table if t == i) for i in range(len(betas))]
    offsets = host_to_device([starts[t] for t in slot_table], torch.long, device)
    table_index = host_to_device(list(slot_table), torch.long, device)
    weights = host_to_device([betas[t] / (slots_of[t] * dim) for t in slot_table], torch.float32, device)
    return offsets, table_index, weights


@functools.lru_cache(maxsize=64)
def device_index(index: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Long tensor of ``index`` on ``device``, cached (no host-to-device copy per forward)."""
    return host_to_device(index, torch.long, device)


def host_to_device(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor from Python values on ``device``; on CUDA through pinned memory with a
    non-blocking copy, so the host does not wait for the device."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@torch.no_grad()
def _statistics(
    quantizers: Sequence[VectorQuantizer],
    slot_table: Sequence[int],
    starts: Sequence[int],
    z: torch.Tensor,
    flat: torch.Tensor,
) -> torch.Tensor:
    """``(sum K,)`` code histogram; in training also the EMA update of every quantizer from
    one ``index_add_`` and one all-reduce of ``[counts | sums]``."""
    n_codes = starts[-1]
    b, s, d = z.shape
    ones = torch.ones(b * s, dtype=torch.float32, device=z.device)
    counts = torch.zeros(n_codes, dtype=torch.float32, device=z.device).index_add_(0, flat, ones)
    first = quantizers[0]
    if not first.training:
        return counts
    group = resolve_group(first.process_group)
    # scratch (reused on CPU): the sums are consumed by the EMA updates below and not kept
    sums = scratch("ema_sums", (n_codes, d), torch.float32, z.device).zero_()
    sums.index_add_(0, flat, z.reshape(b * s, d))
    if world_size(group) > 1:  # one collective for every table's statistics
        buf = all_reduce_sum_(torch.cat([counts.unsqueeze(1), sums], dim=1), group)
        counts, sums = buf[:, 0], buf[:, 1:]
    for t, q in enumerate(quantizers):
        part = slice(starts[t], starts[t + 1])
        q.apply_global_stats(counts[part], sums[part], _table_rows(z, slot_table, t), group, z.device)
    return counts


def _table_rows(z: torch.Tensor, slot_table: Sequence[int], table: int) -> Callable[[], DenseRows]:
    """Lazy ``DenseRows`` of one table's rows, slots concatenated in order (restarts only)."""

    def rows() -> DenseRows:
        parts = [z[:, slot] for slot, t in enumerate(slot_table) if t == table]
        return DenseRows(torch.cat(parts) if len(parts) > 1 else parts[0].contiguous())

    return rows
