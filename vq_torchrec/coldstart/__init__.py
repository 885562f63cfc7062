"""Item cold start: the CVAR protocol (Zhao et al., SIGIR 2022) on a TorchRec backbone, with the
``base``, ``cvar`` and ``vq`` warm-up methods.

Typical use::

    split = split_cold_start(data.ratings, n_threshold=200, k=20)
    feats = ColdStartFeatures(split, data.users, data.items, "clean", all_ratings=data.ratings)
    backbone = pretrain_backbone(feats, RunConfig(), seed=0)
    aucs = run_method(feats, "vq", seed=0, pretrained=backbone).aucs  # cold, warm-a/b/c
"""

from vq_torchrec.coldstart.backbone import BackboneConfig, CTRBackbone
from vq_torchrec.coldstart.cvar_method import CVARGenerator, CVARMethod
from vq_torchrec.coldstart.features import FEATURE_SETS, ColdStartFeatures, RowBlock
from vq_torchrec.coldstart.protocol import PROTOCOL_DEFAULTS, ColdStartSplit, split_cold_start
from vq_torchrec.coldstart.runner import (
    METHODS,
    BaseMethod,
    RunConfig,
    RunResult,
    pretrain_backbone,
    run_method,
    run_phases,
)
from vq_torchrec.coldstart.training import TrainConfig, auc_score, evaluate_auc, train_new_item_rows
from vq_torchrec.coldstart.vq_method import VQ_VARIANTS, VQItemGenerator, VQMethod, VQMethodConfig
from vq_torchrec.coldstart.warm_start import read_rows, warm_start_rows

__all__ = [
    "FEATURE_SETS",
    "METHODS",
    "PROTOCOL_DEFAULTS",
    "VQ_VARIANTS",
    "BackboneConfig",
    "BaseMethod",
    "CTRBackbone",
    "CVARGenerator",
    "CVARMethod",
    "ColdStartFeatures",
    "ColdStartSplit",
    "RowBlock",
    "RunConfig",
    "RunResult",
    "TrainConfig",
    "VQItemGenerator",
    "VQMethod",
    "VQMethodConfig",
    "auc_score",
    "evaluate_auc",
    "pretrain_backbone",
    "read_rows",
    "run_method",
    "run_phases",
    "split_cold_start",
    "train_new_item_rows",
    "warm_start_rows",
]
