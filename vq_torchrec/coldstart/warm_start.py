"""Reading and writing rows of a named embedding table inside a model.

Writing goes through ``vq_torchrec.distributed.warm_start_rows`` when that exists (it handles
tables sharded by ``DistributedModelParallel``); otherwise it falls back to writing into the
weight of an unsharded ``EmbeddingBagCollection`` table directly.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection


def _find_table(model: nn.Module, table: str) -> nn.EmbeddingBag:
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection) and table in module.embedding_bags:
            return module.embedding_bags[table]
    raise KeyError(f"no unsharded EmbeddingBagCollection table named {table!r} in the model")


def read_rows(model: nn.Module, table: str, ids: torch.Tensor) -> torch.Tensor:
    """``(n, D)`` copy of rows ``ids`` of table ``table`` (unsharded model)."""
    return _find_table(model, table).weight.detach()[ids].clone()


def _direct_write(model: nn.Module, table: str, ids: torch.Tensor, embeddings: torch.Tensor) -> None:
    weight = _find_table(model, table).weight
    if embeddings.shape != (ids.numel(), weight.shape[1]):
        raise ValueError(
            f"embeddings for table {table!r} must be ({ids.numel()}, {weight.shape[1]}), "
            f"got {tuple(embeddings.shape)}"
        )
    with torch.no_grad():
        weight[ids] = embeddings.to(weight.dtype)


def warm_start_rows(model: nn.Module, table: str, ids: torch.Tensor, embeddings: torch.Tensor) -> None:
    """Writes ``embeddings`` ``(n, D)`` into rows ``ids`` ``(n,)`` of table ``table``."""
    try:
        from vq_torchrec.distributed import warm_start_rows as distributed_warm_start_rows
    except ImportError:
        distributed_warm_start_rows = None
    if distributed_warm_start_rows is None:
        _direct_write(model, table, ids, embeddings)
    else:
        distributed_warm_start_rows(model, table, ids, embeddings.detach())
