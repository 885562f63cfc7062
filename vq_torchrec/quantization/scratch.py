"""Reusable scratch buffers for the nearest-code searches on CPU.

A search allocates several MiB of block buffers (scores, candidate rows). Fresh CPU tensors of
that size come from newly mapped pages, and touching them costs page faults: measured about
2-3 ms per call of :func:`~.fast_search.nearest_codes_bf16` at 2048-row blocks, K 1024, on
the project's CPU (a third of the call). So on CPU each named buffer is kept per thread and
reused; on accelerators the caching allocator already reuses memory and this returns a fresh
tensor. Contents are undefined: callers write before they read. A thread keeps each buffer at
the largest size it asked for: a few MiB of search blocks (bounded by the cache-sized block
rows of :func:`~.distances.block_rows`), the distinct rows of one key, and the grouped EMA sums
(``sum(K) x dim`` floats).
"""

from __future__ import annotations

import threading

import torch

_local = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of ``shape`` / ``dtype`` on ``device`` with undefined contents.

    On CPU it is a view of a per-thread buffer called ``name`` (grown when needed), so two
    live scratch tensors must have different names, and a scratch tensor must not outlive
    the call that asked for it (the next request with that name overwrites it).
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = 1
    for n in shape:
        numel *= n
    buffers: dict[tuple[str, torch.dtype], torch.Tensor] = getattr(_local, "buffers", None) or {}
    _local.buffers = buffers
    key = (name, dtype)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1), dtype=dtype)
        buffers[key] = buf
    return buf[:numel].view(shape)
