"""Sharding glue for the VQ collections: DMP builder, sharders, warm start, checkpoints."""

from vq_torchrec.distributed.checkpoint import load_checkpoint, refresh_quantizers, save_checkpoint
from vq_torchrec.distributed.sharding import (
    SHARDING_TYPES,
    get_vq_sharders,
    plan_sharding,
    shard_model,
    sharding_constraints,
    table_names,
)
from vq_torchrec.distributed.warm_start import (
    load_unsharded_state_dict,
    table_weight_keys,
    warm_start_rows,
)

__all__ = [
    "SHARDING_TYPES",
    "get_vq_sharders",
    "load_checkpoint",
    "load_unsharded_state_dict",
    "plan_sharding",
    "refresh_quantizers",
    "save_checkpoint",
    "shard_model",
    "sharding_constraints",
    "table_names",
    "table_weight_keys",
    "warm_start_rows",
]
