"""Model-level helpers: the auxiliary VQ loss, codebook stats, and swapping VQ in."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from vq_torchrec.modules.table_quantizers import TableQuantizers
from vq_torchrec.modules.vq_embedding_bag_collection import VQEmbeddingBagCollection
from vq_torchrec.modules.vq_embedding_collection import VQEmbeddingCollection
from vq_torchrec.quantization.config import VQConfig


def _table_quantizers(model: nn.Module) -> list[tuple[str, TableQuantizers]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TableQuantizers)]


def vq_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the auxiliary VQ losses of the last forward of every VQ collection in
    ``model`` (works on a ``DistributedModelParallel`` model too). fp32 scalar; a zero
    tensor when the model has no VQ collection or none has run yet. Add it to the task loss
    before ``backward()``."""
    losses = [q.aux_loss() for _, q in _table_quantizers(model)]
    if not losses:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack([loss.to(losses[0].device) for loss in losses]).sum()


def vq_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per quantized table ``{"perplexity", "usage", "dead_codes", "loss"}`` of the last
    forward, keyed by table name (``"<module path>/<table>"`` when two VQ collections have
    a table of the same name). Host-syncs: meant for logging."""
    per_module = [(name, q.stats()) for name, q in _table_quantizers(model)]
    counts: dict[str, int] = {}
    for _, stats in per_module:
        for table in stats:
            counts[table] = counts.get(table, 0) + 1
    result: dict[str, dict[str, float]] = {}
    for name, stats in per_module:
        for table, values in stats.items():
            result[table if counts[table] == 1 else f"{name}/{table}"] = values
    return result


def vq_output_dims(model: nn.Module) -> dict[str, int]:
    """``{key: output width}`` over every VQ collection in ``model`` (``2 * D`` for keys of
    ``output="concat"`` tables) -- what a DLRM builder needs to size its layers."""
    dims: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, (VQEmbeddingBagCollection, VQEmbeddingCollection)):
            dims.update(m.output_dims())
    return dims


def swap_in_vq(
    model: nn.Module,
    vq: Mapping[str, VQConfig] | VQConfig,
    tables: Iterable[str] | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> nn.Module:
    """Replace every ``EmbeddingBagCollection`` / ``EmbeddingCollection`` inside ``model`` by
    its VQ version wrapping the *same* module (the table parameters are the same tensors).
    Call it before sharding (``vq_torchrec.distributed.shard_model`` keeps the weights).

    Args:
        model: the model (modified in place); if it *is* a collection, the VQ version is
            returned instead.
        vq: one ``VQConfig`` for every selected table, or ``{table_name: VQConfig}``.
        tables: restrict quantization to these table names (default: all tables with a
            config). Collections with no selected table are left as they are.
        process_group: group the quantizers synchronise over (default: world).

    Returns:
        the model (or the new VQ collection when ``model`` was a collection).

    Raises:
        ValueError: a table in ``tables`` or in a ``vq`` dict is in no collection of ``model``.
    """
    wanted = None if tables is None else set(tables)
    found: set[str] = set()

    def convert(module: nn.Module) -> nn.Module | None:
        if type(module) is EmbeddingBagCollection:
            names = [t.name for t in module.embedding_bag_configs()]
        elif type(module) is EmbeddingCollection:
            names = [t.name for t in module.embedding_configs()]
        else:
            return None
        selected = [n for n in names if (wanted is None or n in wanted)]
        if isinstance(vq, VQConfig):
            cfgs = {n: vq for n in selected}
        else:
            cfgs = {n: vq[n] for n in selected if n in vq}
        found.update(cfgs)
        if not cfgs:
            return None
        if isinstance(module, EmbeddingBagCollection):
            return VQEmbeddingBagCollection.from_ebc(module, cfgs, process_group=process_group)
        return VQEmbeddingCollection.from_ec(module, cfgs, process_group=process_group)

    def check() -> None:
        requested = set(wanted) if wanted is not None else set()
        if not isinstance(vq, VQConfig):
            requested |= set(vq) if wanted is None else set(vq) & wanted
        missing = sorted(requested - found)
        if missing:
            raise ValueError(f"tables {missing} are in no EmbeddingBagCollection/EmbeddingCollection")

    root = convert(model)
    if root is not None:
        check()
        return root
    for parent in list(model.modules()):
        if isinstance(parent, (VQEmbeddingBagCollection, VQEmbeddingCollection)):
            continue
        for child_name, child in list(parent.named_children()):
            if isinstance(parent, (VQEmbeddingBagCollection, VQEmbeddingCollection)):
                continue
            new = convert(child)
            if new is not None:
                setattr(parent, child_name, new)
    check()
    return model
