"""Reusable training machinery: process groups, DLRM builder, DMP sharding + fused optimizers,
train/eval loops, atomic resumable checkpoints, results JSON and plots, and ``run_training``
(what ``examples/dlrm_movielens.py`` runs)."""

from vq_torchrec.training.checkpoint import CheckpointError, CheckpointManager, TrainState
from vq_torchrec.training.dist_env import DistEnv, destroy_dist_env, init_dist_env
from vq_torchrec.training.loop import evaluate, train_epoch
from vq_torchrec.training.model_factory import build_dlrm, build_tables
from vq_torchrec.training.sharding import build_plain_optimizer, shard_model
from vq_torchrec.training.trainer import TrainConfig, load_data, run_training

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "DistEnv",
    "TrainConfig",
    "TrainState",
    "build_dlrm",
    "build_plain_optimizer",
    "build_tables",
    "destroy_dist_env",
    "evaluate",
    "init_dist_env",
    "load_data",
    "run_training",
    "shard_model",
    "train_epoch",
]
