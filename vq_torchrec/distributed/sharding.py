"""Sharding VQ models with TorchRec: sharders, planner constraints, and a DMP builder.

The VQ collections hold a plain ``EmbeddingBagCollection`` / ``EmbeddingCollection`` child,
so TorchRec's default sharders shard it; the quantizers are dense and replicated (DMP wraps
them in DDP with ``broadcast_buffers=False``; they all-reduce their own EMA statistics).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from vq_torchrec.distributed.warm_start import load_unsharded_state_dict

#: Sharding types TorchRec offers per collection kind and device type (what the tests cover).
SHARDING_TYPES: dict[str, dict[str, list[str]]] = {
    "ebc": {
        "cpu": ["table_wise", "column_wise", "table_column_wise", "data_parallel"],
        "cuda": [
            "table_wise",
            "row_wise",
            "column_wise",
            "table_row_wise",
            "table_column_wise",
            "data_parallel",
        ],
    },
    "ec": {
        "cpu": ["table_wise", "row_wise", "column_wise"],
        "cuda": ["table_wise", "row_wise", "column_wise", "data_parallel"],
    },
}


def get_vq_sharders(fused_params: Mapping[str, Any] | None = None) -> list[ModuleSharder[nn.Module]]:
    """TorchRec's EBC and EC sharders (what DMP uses by default), with ``fused_params``
    (e.g. ``{"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.1}``) if given.

    The VQ collections need no sharder of their own: their ``ebc`` / ``ec`` child is sharded.
    """
    params = dict(fused_params) if fused_params is not None else None
    return [
        EmbeddingBagCollectionSharder(fused_params=params),  # type: ignore[list-item]
        EmbeddingCollectionSharder(fused_params=params),  # type: ignore[list-item]
    ]


def table_names(model: nn.Module) -> list[str]:
    """Names of every table of every (VQ) EBC / EC inside ``model``."""
    names: list[str] = []
    for m in model.modules():
        if type(m) is EmbeddingBagCollection:
            names += [t.name for t in m.embedding_bag_configs()]
        elif type(m) is EmbeddingCollection:
            names += [t.name for t in m.embedding_configs()]
    return names


def sharding_constraints(
    model: nn.Module,
    sharding_type: str | ShardingType | Mapping[str, str | ShardingType],
    compute_kernel: str | None = None,
    min_partition: int | None = None,
) -> dict[str, ParameterConstraints]:
    """Planner constraints forcing ``sharding_type`` on the tables of ``model``.

    Args:
        sharding_type: one type for every table, or ``{table_name: type}`` (tables left out
            are unconstrained). Values are ``ShardingType`` or their strings.
        compute_kernel: e.g. ``"fused"`` (default: the planner's choice).
        min_partition: smallest column-wise shard width (e.g. ``dim // world_size`` to get
            one column slice per rank).

    Raises:
        ValueError: unknown sharding type or table name.
    """
    names = table_names(model)
    if isinstance(sharding_type, Mapping):
        unknown = [t for t in sharding_type if t not in names]
        if unknown:
            raise ValueError(f"tables {unknown} are not in the model (tables: {names})")
        per_table = dict(sharding_type)
    else:
        per_table = {t: sharding_type for t in names}
    valid = {s.value for s in ShardingType}
    constraints: dict[str, ParameterConstraints] = {}
    for table, st in per_table.items():
        value = st.value if isinstance(st, ShardingType) else str(st)
        if value not in valid:
            raise ValueError(f"unknown sharding type {value!r} for table {table!r} ({sorted(valid)})")
        kwargs: dict[str, Any] = {"sharding_types": [value]}
        if compute_kernel is not None:
            kwargs["compute_kernels"] = [compute_kernel]
        if min_partition is not None:
            kwargs["min_partition"] = min_partition
        constraints[table] = ParameterConstraints(**kwargs)
    return constraints


def plan_sharding(
    model: nn.Module,
    sharding_type: str | ShardingType | Mapping[str, str | ShardingType] | None = None,
    device: torch.device | None = None,
    process_group: dist.ProcessGroup | None = None,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
    constraints: Mapping[str, ParameterConstraints] | None = None,
    batch_size: int = 512,
    min_partition: int | None = None,
) -> ShardingPlan:
    """A sharding plan for ``model`` made by TorchRec's planner on rank 0 and broadcast
    (collective). ``sharding_type`` (one type or per table) is turned into constraints;
    explicit ``constraints`` win."""
    pg = process_group or dist.GroupMember.WORLD
    device = device or torch.device("cpu")
    sharders = sharders or get_vq_sharders()
    merged: dict[str, ParameterConstraints] = {}
    if sharding_type is not None:
        merged.update(sharding_constraints(model, sharding_type, min_partition=min_partition))
    if constraints:
        merged.update(constraints)
    planner = EmbeddingShardingPlanner(
        topology=Topology(
            world_size=dist.get_world_size(pg),
            compute_device=device.type,
            local_world_size=dist.get_world_size(pg),
        ),
        batch_size=batch_size,
        constraints=merged or None,
    )
    return planner.collective_plan(model, sharders, pg)


def shard_model(
    model: nn.Module,
    sharding_type: str | ShardingType | Mapping[str, str | ShardingType] | None = None,
    device: torch.device | None = None,
    process_group: dist.ProcessGroup | None = None,
    fused_params: Mapping[str, Any] | None = None,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
    constraints: Mapping[str, ParameterConstraints] | None = None,
    plan: ShardingPlan | None = None,
    batch_size: int = 512,
    min_partition: int | None = None,
    keep_weights: bool = True,
) -> DistributedModelParallel:
    """Wrap ``model`` (with VQ collections) in ``DistributedModelParallel``.

    Embedding tables are sharded by TorchRec's default sharders (``fused_params`` select the
    fused optimizer, or call ``torchrec.optim.apply_optimizer_in_backward`` on the tables
    before); everything else (quantizers included) is replicated under DDP. Collective:
    every rank of ``process_group`` calls it.

    TorchRec's sharders initialise sharded tables afresh; with ``keep_weights`` (default) the
    model's current values (tables, dense layers, quantizer state) are copied into the
    sharded model, so a pretrained model or one after ``swap_in_vq`` keeps its weights.
    Skipped for tensors on the ``meta`` device.
    """
    pg = process_group or dist.GroupMember.WORLD
    device = device or torch.device("cpu")
    sharders = sharders or get_vq_sharders(fused_params)
    if plan is None:
        plan = plan_sharding(
            model,
            sharding_type,
            device=device,
            process_group=pg,
            sharders=sharders,
            constraints=constraints,
            batch_size=batch_size,
            min_partition=min_partition,
        )
    before = (
        {k: v.detach().clone() for k, v in model.state_dict().items() if v.device.type != "meta"}
        if keep_weights
        else {}
    )
    dmp = DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(pg),
        device=device,
        plan=plan,
        sharders=sharders,
    )
    if before:
        load_unsharded_state_dict(dmp, before, strict=False)
    return dmp
