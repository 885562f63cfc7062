"""Recycled CPU buffers for the grouped path's large per-step tensors.

The grouped VQ leaf makes two ``(B, S, d)`` fp32 tensors per training step: the quantized
output and, in the backward, the gradient of the pooled embeddings (109 MB each at 26 tables,
dim 128, batch 8192). A fresh CPU tensor of that size is freshly mapped memory, and the kernel
zero-fills every page on first touch: measured ~40 ms per tensor on the project's CPU, more
than the gather that fills it (``index_select`` into a new tensor 58 ms, into a reused one
19 ms). CUDA has a caching allocator; on CPU this module keeps the last two buffers of each name and
hands one out again only when nothing else can see it: no tensor or view other than the cache
references its storage, and no Python object holds the storage itself. Otherwise (the caller
kept last step's output, two forwards before one backward, a gradient kept as ``.grad``) it
allocates a new buffer, so a recycled buffer is never visible to anyone holding the old data.
"""

from __future__ import annotations

import sys
import threading

import torch

_local = threading.local()


def _references(t: torch.Tensor) -> tuple[int, int]:
    """(references to ``t``'s StorageImpl, Python references to its storage object)."""
    storage = t.untyped_storage()
    return torch._C._storage_Use_Count(storage._cdata), sys.getrefcount(storage)


# the counts of a tensor that nothing else references, measured through the same code path
_ALONE = _references(torch.empty(1))


def _unreferenced(t: torch.Tensor) -> bool:
    """No tensor or view but ``t``, and no Python storage object, holds ``t``'s storage."""
    return _references(t) == _ALONE


# buffers kept per name: the VQ leaf keeps its last outputs (views of the last buffer) until
# the next forward replaces them, so the buffer of two steps ago is the one that is free
POOL = 2


def recycled(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous tensor of ``shape`` with undefined contents; on CPU one of the last
    :data:`POOL` buffers of this ``name`` (per thread) that is unreferenced and large enough,
    else a new one (which then replaces the oldest in the pool)."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = 1
    for n in shape:
        numel *= n
    pools: dict[tuple[str, torch.dtype], list[torch.Tensor]] = getattr(_local, "pools", None) or {}
    _local.pools = pools
    pool = pools.setdefault((name, dtype), [])
    for i, buf in enumerate(pool):
        if buf.numel() >= numel and _unreferenced(buf):
            pool.append(pool.pop(i))  # most recently used last
            return buf[:numel].view(shape)
    buf = torch.empty(max(numel, 1), dtype=dtype)
    pool.append(buf)
    if len(pool) > POOL:
        pool.pop(0)
    return buf[:numel].view(shape)
