"""``torch.distributed.checkpoint`` save / load of (sharded) VQ models.

The checkpoint holds ``model.state_dict()`` -- table weights (``ShardedTensor`` shards under
DMP, plain tensors otherwise) and the quantizers' buffers / parameters -- and can be loaded
into another world size or sharding plan (DCP reshards), or into an unsharded model.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn


def _distributed(process_group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and (
        dist.get_world_size(process_group) > 1 or process_group is not None
    )


def refresh_quantizers(model: nn.Module) -> None:
    """Re-read buffer-backed Python state of every quantizer (after an in-place load)."""
    for m in model.modules():
        refresh = getattr(m, "refresh_from_buffers", None)
        if callable(refresh):
            refresh()


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    extra: dict[str, Any] | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> None:
    """Save ``{"model": model.state_dict(), **extra}`` to directory ``path`` with DCP.

    Collective when distributed (every rank calls it; ``path`` on a shared file system).
    ``extra`` may hold e.g. ``{"optim": optimizer.state_dict()}``.
    """
    state: dict[str, Any] = {"model": model.state_dict()}
    state.update(extra or {})
    dcp.save(
        state,
        checkpoint_id=os.fspath(path),
        process_group=process_group,
        no_dist=not _distributed(process_group),
    )


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    process_group: dist.ProcessGroup | None = None,
    strict: bool = True,
) -> None:
    """Load a :func:`save_checkpoint` directory into ``model`` (sharded or not, any plan
    and world size), then ``model.load_state_dict`` so quantizers refresh their Python
    mirrors of ``initialized`` / ``step``. Collective when distributed."""
    state = {"model": model.state_dict()}
    dcp.load(
        state,
        checkpoint_id=os.fspath(path),
        process_group=process_group,
        no_dist=not _distributed(process_group),
    )
    model.load_state_dict(state["model"], strict=strict)
    refresh_quantizers(model)
