"""Collectives on an explicit process group; all of them are no-ops in a single process.

The group is resolved at call time (``None`` -> the default WORLD group if
``torch.distributed`` is initialised, else single-process), so a quantizer can be built
before ``init_process_group``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

ProcessGroup = Optional["dist.ProcessGroup"]


def resolve_group(process_group: ProcessGroup) -> ProcessGroup:
    """The group to synchronise over, or ``None`` when running single-process."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return process_group if process_group is not None else dist.group.WORLD


def world_size(group: ProcessGroup) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce_sum_(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """In-place sum over ``group`` (every rank ends with the same bits)."""
    if world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def broadcast_from_first_(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """In-place copy of the group's rank-0 tensor to every rank of ``group``."""
    if world_size(group) > 1:
        dist.broadcast(tensor, group=group, group_src=0)
    return tensor
