"""End-to-end DLRM training on MovieLens: what ``examples/dlrm_movielens.py`` runs.

``run_training(TrainConfig(...))`` loads and encodes the data, builds the (VQ) DLRM, shards it
with DMP under ``torchrun``, trains with checkpoints (every epoch, optionally every N steps),
evaluates AUC/log-loss on validation and test each epoch, and writes ``results.json`` and
``training.png`` into ``output``. With ``resume=True`` it continues from the newest complete
checkpoint in ``output/checkpoints`` at the exact next batch (bit-identical on CPU).
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vq_torchrec.quantization.config import VQConfig
from vq_torchrec.training.checkpoint import CheckpointManager, TrainState
from vq_torchrec.training.data_pipeline import PreparedData, make_batches, prepare_movielens
from vq_torchrec.training.dist_env import DistEnv, destroy_dist_env, init_dist_env
from vq_torchrec.training.loop import evaluate, train_epoch
from vq_torchrec.training.lr_schedule import LR_SCHEDULES, LRSchedule, LRScheduleKind
from vq_torchrec.training.model_factory import build_dlrm
from vq_torchrec.training.plotting import plot_run
from vq_torchrec.training.results import codebook_stats, write_results
from vq_torchrec.training.sharding import build_plain_optimizer, shard_model


@dataclass
class TrainConfig:
    """Every option of a training run (the example's flags map 1:1 onto these)."""

    dataset: str = "ml-100k"
    data_root: str | None = None
    epochs: int = 3
    vq: bool = True
    seed: int = 0
    output: str = "runs/dlrm_movielens"
    resume: bool = False
    batch_size: int = 512  # global (split evenly across ranks)
    eval_batch_size: int = 4096
    embedding_dim: int = 32
    codebook_size: int = 256
    vq_output: Literal["quantized", "concat"] = "concat"
    vq_update: Literal["ema", "loss"] = "ema"
    commitment_weight: float = 0.25
    vq_features: tuple[str, ...] | None = None  # quantize only these features (None: all)
    lr: float = 1e-3  # dense (Adam)
    sparse_lr: float = 0.05  # embedding tables (Adagrad)
    sparse_optimizer: Literal["adagrad", "rowwise_adagrad", "sgd", "adam"] = "adagrad"
    # per-step decay of both learning rates over the whole run (see training/lr_schedule.py)
    lr_schedule: LRScheduleKind = "constant"
    lr_min_factor: float = 0.0  # lr at the last step = base lr * lr_min_factor
    lr_decay_tables: bool = True  # False: only the dense lr decays, tables keep sparse_lr
    dense_weight_decay: float = 0.0  # L2 weight decay of the dense optimizer (MLPs, codebooks)
    sparse_weight_decay: float = 0.0  # L2 weight decay of the tables (single process only)
    split: Literal["random", "temporal"] = "random"
    threshold: float = 4.0
    drop_neutral: bool = False
    arch: Literal["dlrm", "dcn"] = "dlrm"
    dense_arch: tuple[int, ...] = (64,)
    over_arch: tuple[int, ...] = (128, 64)
    sharding_type: str | None = None  # None: the planner chooses per table
    checkpoint_every_steps: int = 0
    log_every_steps: int = 0
    device: str | None = None
    progress: bool = True
    download: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "embedding_dim", "codebook_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "sparse_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.checkpoint_every_steps < 0:
            raise ValueError(f"checkpoint_every_steps must be >= 0, got {self.checkpoint_every_steps}")
        for name in ("dense_weight_decay", "sparse_weight_decay"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0.0 <= self.lr_min_factor <= 1.0:
            raise ValueError(f"lr_min_factor must be in [0, 1], got {self.lr_min_factor}")
        if self.vq_output not in ("quantized", "concat"):
            raise ValueError(f"vq_output must be 'quantized' or 'concat', got {self.vq_output!r}")

    def vq_config(self) -> VQConfig | None:
        if not self.vq:
            return None
        return VQConfig(
            codebook_size=self.codebook_size,
            output=self.vq_output,
            update=self.vq_update,
            commitment_weight=self.commitment_weight,
        )


_RESUME_MUST_MATCH = (
    "dataset", "seed", "split", "threshold", "drop_neutral", "batch_size", "embedding_dim",
    "codebook_size", "vq", "vq_output", "vq_features", "vq_update", "arch", "dense_arch", "over_arch",
    "sparse_optimizer", "sharding_type", "lr_schedule", "lr_min_factor", "lr_decay_tables",
)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (same seed on every rank: replicated init is identical)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _epoch_batches(batches: Any, epoch: int, skip: int) -> Iterator[Any]:
    """This epoch's batches, starting after the first ``skip`` (resume mid-epoch)."""
    batches.set_epoch(epoch)
    batches.skip_batches(skip)
    return iter(batches)


def _log(env: DistEnv, msg: str) -> None:
    if env.is_main:
        print(msg, flush=True)


def load_data(cfg: TrainConfig) -> PreparedData:
    """The encoded splits ``cfg`` asks for (deterministic in ``cfg.seed``)."""
    return prepare_movielens(
        cfg.dataset, cfg.data_root, cfg.split, cfg.seed, cfg.threshold, cfg.drop_neutral,
        download=cfg.download,
    )


def run_training(
    cfg: TrainConfig, env: DistEnv | None = None, data: PreparedData | None = None
) -> dict[str, Any]:
    """Train and evaluate as configured; returns the results dict (also written on rank 0).

    ``data`` (from :func:`load_data` with the same dataset/split/seed options) skips loading.
    """
    cfg.validate()
    own_env = env is None
    env = env if env is not None else init_dist_env(cfg.device)
    try:
        return _run(cfg, env, data)
    finally:
        if own_env:
            destroy_dist_env(env)


def _run(cfg: TrainConfig, env: DistEnv, data: PreparedData | None) -> dict[str, Any]:
    t_start = time.time()
    if cfg.batch_size % env.world_size:
        raise ValueError(
            f"--batch-size {cfg.batch_size} is the global batch and must be divisible by the "
            f"world size {env.world_size}"
        )
    per_rank_bs = cfg.batch_size // env.world_size
    out = Path(cfg.output)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if env.distributed:
        print(f"[dist] rank {env.rank}/{env.world_size} pid {os.getpid()} backend {env.backend}",
              file=sys.stderr, flush=True)

    seed_everything(cfg.seed)
    if data is None:
        data = load_data(cfg)
    _log(env, f"[data] {cfg.dataset}: train {data.sizes['train']} val {data.sizes['val']} "
              f"test {data.sizes['test']} | sparse {data.sparse_feature_sizes} | dense {data.num_dense}")

    seed_everything(cfg.seed)
    model = build_dlrm(
        data.sparse_feature_sizes, data.num_dense, embedding_dim=cfg.embedding_dim,
        vq=cfg.vq_config(), dense_arch=cfg.dense_arch, over_arch=cfg.over_arch, arch=cfg.arch,
        device=env.device, vq_features=cfg.vq_features if cfg.vq else None,
    )
    if env.distributed:
        if cfg.sparse_weight_decay:
            raise ValueError(
                "sparse_weight_decay is supported in a single process only (the fused sharded "
                "table optimizers take none); set it to 0 under torchrun"
            )
        model, optimizer = shard_model(
            model, env, sparse_optimizer=cfg.sparse_optimizer, sparse_lr=cfg.sparse_lr,
            dense_lr=cfg.lr, batch_size_per_rank=per_rank_bs,
            sharding_type=cfg.sharding_type or None, dense_weight_decay=cfg.dense_weight_decay,
        )
    else:
        optimizer = build_plain_optimizer(
            model, sparse_optimizer=cfg.sparse_optimizer, sparse_lr=cfg.sparse_lr, dense_lr=cfg.lr,
            sparse_weight_decay=cfg.sparse_weight_decay, dense_weight_decay=cfg.dense_weight_decay,
        )

    ckpt = CheckpointManager(out / "checkpoints", env)
    # options a resumed run must share with the run that wrote the checkpoint
    fingerprint = {k: getattr(cfg, k) for k in _RESUME_MUST_MATCH}
    fingerprint["world_size"] = env.world_size
    state: TrainState | None = None
    if cfg.resume:
        saved = (ckpt.peek_extra() or {}).get("config")
        if saved is not None and saved != fingerprint:
            diff = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
            raise ValueError(
                f"--resume: the checkpoint in {ckpt.directory} was written with different "
                f"options (checkpoint, now): {diff}; use the same options or a new --output"
            )
        state = ckpt.load(model, optimizer)
        if state is None:
            _log(env, f"[resume] no checkpoint in {ckpt.directory}; starting from scratch")
        else:
            _log(env, f"[resume] from {ckpt.latest()} (epoch {state.epoch}, "
                      f"step {state.step_in_epoch}, global step {state.global_step})")
    if state is None:
        state = TrainState(data_seed=cfg.seed)
        seed_everything(cfg.seed + 1)  # training-time randomness, restored on resume

    train_batches = make_batches(data.train, per_rank_bs, env, shuffle=True,
                                 seed=state.data_seed, drop_last=True)
    val_batches = make_batches(data.val, max(1, cfg.eval_batch_size // env.world_size), env,
                               shuffle=False, seed=0, drop_last=False)
    test_batches = make_batches(data.test, max(1, cfg.eval_batch_size // env.world_size), env,
                                shuffle=False, seed=0, drop_last=False)
    steps_per_epoch = len(train_batches)
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training split ({data.sizes['train']} rows) is smaller than one batch of "
            f"{per_rank_bs} per rank"
        )

    schedule = LRSchedule(
        optimizer, cfg.lr_schedule, cfg.epochs * steps_per_epoch, dense_lr=cfg.lr,
        sparse_lr=cfg.sparse_lr, min_factor=cfg.lr_min_factor, decay_tables=cfg.lr_decay_tables,
    )
    schedule.set_step(state.global_step)

    def on_step(s: TrainState) -> None:
        schedule.set_step(s.global_step)
        if cfg.log_every_steps and s.global_step % cfg.log_every_steps == 0:
            _log(env, f"[train] epoch {s.epoch} step {s.step_in_epoch}/{steps_per_epoch} "
                      f"global_step {s.global_step} loss {s.losses[-1]:.6f}")
        if cfg.checkpoint_every_steps and s.global_step % cfg.checkpoint_every_steps == 0:
            path = ckpt.save(model, optimizer, s, extra={"config": fingerprint})
            _log(env, f"[checkpoint] saved {path.name}")

    codebook: dict[str, dict[str, float]] = {}
    while state.epoch < cfg.epochs:
        epoch = state.epoch
        if state.step_in_epoch < steps_per_epoch:
            train_epoch(
                model, optimizer, _epoch_batches(train_batches, epoch, state.step_in_epoch), env,
                state, steps_per_epoch, on_step=on_step, progress=cfg.progress,
            )
        codebook = codebook_stats(model)
        val = evaluate(model, val_batches, env, len(val_batches))
        test = evaluate(model, test_batches, env, len(test_batches))
        # mean training loss of the epoch over every rank's batches
        epoch_losses = state.losses[-steps_per_epoch:]
        loss_sum = env.all_reduce_sum(
            torch.tensor([sum(epoch_losses), len(epoch_losses)], dtype=torch.float64)
        )
        record = {
            "epoch": epoch,
            "train_loss": float(loss_sum[0] / loss_sum[1]) if loss_sum[1] > 0 else float("nan"),
            "val_auc": val["auc"], "val_logloss": val["logloss"],
            "test_auc": test["auc"], "test_logloss": test["logloss"],
            "val_examples": val["num_examples"], "test_examples": test["num_examples"],
            "codebook": codebook,
            "lr": schedule.current_lrs(),  # learning rates set for the step after this epoch
        }
        state.history.append(record)
        _log(env, f"[eval] epoch {epoch}: train loss {record['train_loss']:.4f} | val AUC "
                  f"{val['auc']:.4f} log-loss {val['logloss']:.4f} | test AUC {test['auc']:.4f} "
                  f"log-loss {test['logloss']:.4f}")
        state.epoch += 1
        state.step_in_epoch = 0
        path = ckpt.save(model, optimizer, state, extra={"config": fingerprint})
        _log(env, f"[checkpoint] saved {path.name} (end of epoch {epoch})")

    best = max(state.history, key=lambda h: h["val_auc"])
    results: dict[str, Any] = {
        "auc": best["test_auc"],
        "logloss": best["test_logloss"],
        "best_epoch": best["epoch"],
        "val_auc": best["val_auc"],
        "val_logloss": best["val_logloss"],
        "final_test_auc": state.history[-1]["test_auc"],
        "final_test_logloss": state.history[-1]["test_logloss"],
        "history": state.history,
        "train_loss_per_step": state.losses,
        "codebook": state.history[-1]["codebook"],
        "dataset": cfg.dataset,
        "sizes": data.sizes,
        "sparse_feature_sizes": data.sparse_feature_sizes,
        "world_size": env.world_size,
        "steps_per_epoch": steps_per_epoch,
        "global_step": state.global_step,
        "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
        "vq_config": asdict(cfg.vq_config()) if cfg.vq else None,
        "wall_seconds_this_process": time.time() - t_start,
    }
    if env.is_main:
        write_results(out / "results.json", results)
        plot_run(out / "training.png", state.losses, state.history, results["codebook"],
                 title=f"DLRM{' + VQ' if cfg.vq else ''} on {cfg.dataset} "
                       f"(test AUC {results['auc']:.4f}, log-loss {results['logloss']:.4f})")
        _log(env, f"[done] test AUC {results['auc']:.4f} log-loss {results['logloss']:.4f} "
                  f"(best val epoch {best['epoch']}); wrote {out / 'results.json'} and "
                  f"{out / 'training.png'}")
    env.barrier()
    return results
