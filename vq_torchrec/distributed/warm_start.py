"""Write given rows into an embedding table, sharded or not (item cold start)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    from torch.distributed._tensor import DTensor  # type: ignore[no-redef]


def table_weight_keys(model: nn.Module, table: str) -> list[str]:
    """``state_dict`` keys of ``table``'s weight (``...embedding_bags.<table>.weight`` or
    ``...embeddings.<table>.weight``) in ``model``."""
    suffixes = (f"embedding_bags.{table}.weight", f"embeddings.{table}.weight")
    return [k for k in model.state_dict(keep_vars=True) if k.endswith(suffixes)]


def _write_block(
    local: torch.Tensor,
    row_offset: int,
    col_offset: int,
    ids: torch.Tensor,
    embeddings: torch.Tensor,
) -> int:
    """Write the rows of ``ids`` that fall in ``local`` (a block of the full table starting at
    ``(row_offset, col_offset)``); returns how many rows were written."""
    rows, cols = local.shape
    ids = ids.to(local.device)
    mask = (ids >= row_offset) & (ids < row_offset + rows)
    if not bool(mask.any()):
        return 0
    block = embeddings.to(device=local.device, dtype=local.dtype)[mask][:, col_offset : col_offset + cols]
    with torch.no_grad():
        local[ids[mask] - row_offset] = block
    return int(mask.sum())


def _dtensor_offsets(t: DTensor) -> tuple[int, int]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return int(offset[0]), int(offset[1])


def warm_start_rows(
    model: nn.Module, table: str, ids: torch.Tensor, embeddings: torch.Tensor
) -> int:
    """Overwrite rows ``ids`` of ``table`` with ``embeddings`` -- in place, so a fused optimizer
    (whose kernel owns the storage) trains from the new values.

    Works on an unsharded model (plain parameters) and under ``DistributedModelParallel``:
    it writes into the local shards of the ``ShardedTensor`` / ``DTensor`` weights of
    ``model.state_dict()``, which share storage with the fused kernel, at the right row and
    column offsets (table-wise: the owning rank writes; row-wise: each rank its rows;
    column-wise: each rank its column slice; data-parallel: every rank its replica).
    Every rank must call it with the same ``ids`` and ``embeddings``. Not a collective.

    Args:
        model: a module holding ``table`` (a plain / VQ collection, a model, or a DMP model).
        table: the table name.
        ids: ``(n,)`` int row ids in ``[0, num_embeddings)``; for duplicates the last wins.
        embeddings: ``(n, embedding_dim)`` floating rows.

    Returns:
        number of (row, shard) blocks written on this rank.

    Raises:
        ValueError: unknown table, ids out of range, shape mismatch.
        TypeError: wrong dtypes.
    """
    keys = table_weight_keys(model, table)
    if not keys:
        raise ValueError(f"table {table!r} not found in the model's state_dict")
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be an int32/int64 tensor, got {getattr(ids, 'dtype', type(ids))}")
    if not isinstance(embeddings, torch.Tensor) or not torch.is_floating_point(embeddings):
        raise TypeError(
            f"embeddings must be a floating tensor, got {getattr(embeddings, 'dtype', type(embeddings))}"
        )
    ids = ids.reshape(-1).long()
    state = model.state_dict(keep_vars=True)
    written = 0
    for key in keys:
        weight = state[key]
        num_rows, dim = weight.shape
        if embeddings.shape != (ids.numel(), dim):
            raise ValueError(
                f"embeddings must be ({ids.numel()}, {dim}) for table {table!r}, got {tuple(embeddings.shape)}"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_rows):
            bad = ids[(ids < 0) | (ids >= num_rows)][:5].tolist()
            raise ValueError(f"ids {bad} outside [0, {num_rows}) of table {table!r}")
        if isinstance(weight, ShardedTensor):
            for shard in weight.local_shards():
                row_off, col_off = shard.metadata.shard_offsets
                written += _write_block(shard.tensor, row_off, col_off, ids, embeddings)
        elif isinstance(weight, DTensor):
            row_off, col_off = _dtensor_offsets(weight)
            written += _write_block(weight.to_local(), row_off, col_off, ids, embeddings)
        else:
            written += _write_block(weight.data if isinstance(weight, nn.Parameter) else weight, 0, 0, ids, embeddings)
    return written


def _copy_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy ``full`` (the whole tensor) into ``target`` (plain / ShardedTensor / DTensor)."""
    with torch.no_grad():
        if isinstance(target, ShardedTensor):
            for shard in target.local_shards():
                offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                block = full
                for dim, (off, size) in enumerate(zip(offsets, sizes)):
                    block = block.narrow(dim, off, size)
                shard.tensor.copy_(block)
        elif isinstance(target, DTensor):
            local = target.to_local()
            if local.dim() == 2:
                row_off, col_off = _dtensor_offsets(target)
                local.copy_(full[row_off : row_off + local.shape[0], col_off : col_off + local.shape[1]])
            else:
                local.copy_(full)
        else:
            target.copy_(full)


def load_unsharded_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy a full (unsharded) ``state_dict`` into a possibly sharded ``model`` in place:
    each rank copies the blocks of its local shards (fused kernels see the new values).
    Every rank passes the same full tensors.

    Raises:
        ValueError: with ``strict``, keys missing on either side or shape mismatches.
    """
    target = model.state_dict(keep_vars=True)
    if strict:
        missing = sorted(set(target) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(target))
        if missing or unexpected:
            raise ValueError(f"state_dict mismatch: missing {missing}, unexpected {unexpected}")
    for key, full in state_dict.items():
        if key not in target:
            continue
        tensor = target[key]
        if tuple(tensor.shape) != tuple(full.shape):
            raise ValueError(f"{key}: shape {tuple(full.shape)} does not match {tuple(tensor.shape)}")
        _copy_into(tensor.data if isinstance(tensor, nn.Parameter) else tensor, full.detach())
