"""Reading rows of a named embedding table inside an (unsharded) backbone; writing goes through
:func:`vq_torchrec.distributed.warm_start_rows`, which also handles tables sharded by
``DistributedModelParallel``."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from vq_torchrec.distributed import warm_start_rows

__all__ = ["read_rows", "warm_start_rows"]


def _find_table(model: nn.Module, table: str) -> nn.EmbeddingBag:
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection) and table in module.embedding_bags:
            return module.embedding_bags[table]
    raise KeyError(f"no unsharded EmbeddingBagCollection table named {table!r} in the model")


def read_rows(model: nn.Module, table: str, ids: torch.Tensor) -> torch.Tensor:
    """``(n, D)`` copy of rows ``ids`` of table ``table`` (unsharded model)."""
    return _find_table(model, table).weight.detach()[ids].clone()
