"""Random rows drawn identically on every rank: rank 0's draw is broadcast to the group."""

from __future__ import annotations

from typing import Protocol, Union

import torch

from vq_torchrec.quantization.distances import DenseRows
from vq_torchrec.quantization.distributed import ProcessGroup, broadcast_from_first_


class Rows(Protocol):
    """Rows to quantize (``DenseRows`` or ``OuterRows``)."""

    @property
    def num_rows(self) -> int: ...

    def assign(self, codebook: torch.Tensor, distance: str, chunk_size: int) -> torch.Tensor: ...

    def sums(self, codes: torch.Tensor, codebook_size: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def gather(self, index: torch.Tensor) -> torch.Tensor: ...


AnyRows = Union[DenseRows, "Rows"]


def random_index(num_rows: int, count: int, device: torch.device) -> torch.Tensor:
    """``(count,)`` row indices: without replacement when ``num_rows >= count``, else with."""
    if num_rows >= count:
        return torch.randperm(num_rows, device=device)[:count]
    return torch.randint(0, num_rows, (count,), device=device)


@torch.no_grad()
def local_sample(rows: Rows, count: int, dim: int, device: torch.device) -> tuple[torch.Tensor, bool]:
    """``(count, dim)`` random rows of this rank (zeros and ``False`` if it has none)."""
    if rows.num_rows == 0:
        return torch.zeros(count, dim, dtype=torch.float32, device=device), False
    return rows.gather(random_index(rows.num_rows, count, device)), True


@torch.no_grad()
def shared_sample(
    rows: Rows, count: int, dim: int, device: torch.device, group: ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0's ``(count, dim)`` random rows on every rank, and a 0-d bool tensor that is
    ``False`` when rank 0 had no rows (then the sample is zeros and must not be used)."""
    sample, ok = local_sample(rows, count, dim, device)
    buf = torch.cat([sample.reshape(-1), torch.tensor([1.0 if ok else 0.0], device=device)])
    broadcast_from_first_(buf, group)
    return buf[:-1].view(count, dim), buf[-1] > 0.5


@torch.no_grad()
def dense_subsample(rows: Rows, max_rows: int, dim: int, device: torch.device) -> DenseRows:
    """At most ``max_rows`` random rows of ``rows``, materialised (``rows`` itself if dense and small)."""
    if isinstance(rows, DenseRows) and rows.num_rows <= max_rows:
        return rows
    count = min(rows.num_rows, max_rows)
    if count == 0:
        return DenseRows(torch.zeros(0, dim, dtype=torch.float32, device=device))
    return DenseRows(rows.gather(random_index(rows.num_rows, count, device)))
