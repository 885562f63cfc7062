"""Atomic, resumable training checkpoints.

Layout under ``<dir>``::

    LATEST                  # name of the newest complete checkpoint (replaced atomically)
    step-000000123/         # one complete checkpoint
        dcp/                # torch.distributed.checkpoint: model + optimizer (one shard file per rank)
        meta-rank0.pt ...   # per rank: training position, RNG states, user metadata
        COMPLETE            # written last, before the directory is published
    .tmp-step-000000456/    # a checkpoint being written (ignored by readers, removed on next save)

A save writes everything into ``.tmp-*`` first; only when every rank has finished does rank 0
``os.rename`` it to its final name and then ``os.replace`` the ``LATEST`` pointer. A crash at any
point therefore leaves ``LATEST`` naming the previous complete checkpoint, which is deleted only
after the new one is published.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from vq_torchrec.training.dist_env import DistEnv

LATEST = "LATEST"
COMPLETE = "COMPLETE"
_TMP_PREFIX = ".tmp-"
# Test hook, "<global_step>:<seconds>": when saving that step, sleep after the shards are
# written but before publishing, so a test can SIGKILL a run in the middle of a checkpoint write.
_SLOW_WRITE_ENV = "VQ_TORCHREC_CKPT_SLOW_WRITE"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not match the run."""


@dataclass
class TrainState:
    """Where training is: resume runs batch ``step_in_epoch`` of ``epoch`` next.

    Attributes:
        epoch: current epoch (0-based).
        step_in_epoch: number of batches of ``epoch`` already trained.
        global_step: total optimizer steps so far.
        data_seed: seed of the data order (``MovieLensBatches`` seed).
        history: per-epoch records (metrics) of finished epochs.
        losses: training loss of every step so far (for the loss curve).
    """

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    data_seed: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def capture_rng() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU, and CUDA when available)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _app_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": optimizer.state_dict()}


class CheckpointManager:
    """Save/load checkpoints of ``(model, optimizer, TrainState, RNG)`` atomically.

    Works for a plain model in a single process and for a ``DistributedModelParallel`` model
    (every rank calls :meth:`save`/:meth:`load`; shards are written per rank through DCP).

    Args:
        directory: where checkpoints live (created if missing; must be shared by all ranks).
        env: the process's :class:`DistEnv`.
        keep: number of complete checkpoints to keep (>= 1).
    """

    def __init__(self, directory: str | os.PathLike[str], env: DistEnv, keep: int = 1) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.env = env
        self.keep = keep
        self.loaded_extra: dict[str, Any] = {}  # ``extra`` of the last loaded checkpoint
        if env.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
        env.barrier()

    # ------------------------------------------------------------------ reading
    def latest(self) -> Path | None:
        """The newest complete checkpoint directory, or ``None`` when there is none."""
        pointer = self.directory / LATEST
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        path = self.directory / name
        if not name or not (path / COMPLETE).exists():
            raise CheckpointError(
                f"{pointer} names {name!r}, which is not a complete checkpoint in {self.directory}"
            )
        return path

    def peek_extra(self, path: Path | None = None) -> dict[str, Any] | None:
        """The ``extra`` dict saved with ``path`` (default: latest) without loading anything
        else; ``None`` when there is no checkpoint."""
        path = path if path is not None else self.latest()
        if path is None:
            return None
        meta_file = path / f"meta-rank{self.env.rank}.pt"
        if not meta_file.exists():
            return {}
        return dict(torch.load(meta_file, weights_only=False).get("extra", {}))

    def load(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, path: Path | None = None
    ) -> TrainState | None:
        """Restore model, optimizer and RNG in place from ``path`` (default: :meth:`latest`).

        Returns the saved :class:`TrainState`, or ``None`` when there is no checkpoint.
        """
        path = path if path is not None else self.latest()
        if path is None:
            return None
        meta_file = path / f"meta-rank{self.env.rank}.pt"
        if not meta_file.exists():
            raise CheckpointError(
                f"{path} has no {meta_file.name}: it was written by a run with a different "
                f"world size (this run has {self.env.world_size} ranks)"
            )
        meta = torch.load(meta_file, weights_only=False)
        if meta["world_size"] != self.env.world_size:
            raise CheckpointError(
                f"{path} was written with world_size={meta['world_size']}, this run has "
                f"{self.env.world_size}"
            )
        # Optimizer state is created lazily: make it exist so DCP can load into it in place.
        dcp_dir = path / "dcp"
        saved_keys = set(dcp.FileSystemReader(str(dcp_dir)).read_metadata().state_dict_metadata)
        _ensure_optimizer_state(optimizer, saved_keys)
        state = _app_state(model, optimizer)
        dcp.load(state, checkpoint_id=str(dcp_dir))
        model.load_state_dict(state["model"])
        _refresh_module_mirrors(model)
        optimizer.load_state_dict(state["optim"])
        optimizer.zero_grad(set_to_none=True)
        restore_rng(meta["rng"])
        self.loaded_extra = dict(meta.get("extra", {}))
        return TrainState(**meta["train_state"])

    # ------------------------------------------------------------------ writing
    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_state: TrainState,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write a checkpoint atomically; every rank must call this. Returns its path."""
        name = f"step-{train_state.global_step:09d}"
        final = self.directory / name
        tmp = self.directory / f"{_TMP_PREFIX}{name}"
        if self.env.is_main:
            for stale in self.directory.glob(f"{_TMP_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(
                    missing_ok=True
                )
            tmp.mkdir(parents=True)
        self.env.barrier()

        dcp.save(_app_state(model, optimizer), checkpoint_id=str(tmp / "dcp"))
        meta = {
            "world_size": self.env.world_size,
            "rank": self.env.rank,
            "train_state": asdict(train_state),
            "rng": capture_rng(),
            "extra": dict(extra or {}),
        }
        meta_path = tmp / f"meta-rank{self.env.rank}.pt"
        with open(meta_path, "wb") as f:
            torch.save(meta, f)
            f.flush()
            os.fsync(f.fileno())
        slow = _slow_write_seconds(train_state.global_step)
        if slow > 0:
            print(f"[checkpoint] writing {tmp}", flush=True)
            time.sleep(slow)
        self.env.barrier()

        if self.env.is_main:
            for f in (tmp / "dcp").iterdir():
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            (tmp / COMPLETE).write_text(name)
            _fsync_dir(tmp)
            if final.exists():  # same step saved twice (e.g. end of epoch after a step save)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.directory)
            _write_file_atomic(self.directory / LATEST, name.encode())
            self._prune(keep_name=name)
        self.env.barrier()
        return final

    def _prune(self, keep_name: str) -> None:
        done = sorted(
            p for p in self.directory.glob("step-*") if p.is_dir() and (p / COMPLETE).exists()
        )
        keep = {p.name for p in done[-self.keep :]} | {keep_name}
        for p in done:
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)


def _slow_write_seconds(step: int) -> float:
    spec = os.environ.get(_SLOW_WRITE_ENV, "")
    if not spec:
        return 0.0
    try:
        at, seconds = spec.split(":")
        return float(seconds) if int(at) == step else 0.0
    except ValueError as e:
        raise ValueError(f"{_SLOW_WRITE_ENV} must be '<step>:<seconds>', got {spec!r}") from e


def _refresh_module_mirrors(model: nn.Module) -> None:
    """DMP's ``load_state_dict`` does not run submodules' load post-hooks, so modules that keep
    Python mirrors of buffers (the VQ quantizers' ``initialized``/``step``) re-read them here."""
    for m in model.modules():
        refresh = getattr(m, "refresh_from_buffers", None)
        if callable(refresh):
            refresh()


def _ensure_optimizer_state(
    optimizer: torch.optim.Optimizer, saved_keys: set[str], prefix: str = ""
) -> None:
    """Create lazily-initialised optimizer state (e.g. Adam's moments before the first step)
    that the checkpoint holds, so it can be loaded in place. Grads are left as ``None``."""
    if isinstance(optimizer, CombinedOptimizer):
        for name, sub in optimizer.optimizers:
            _ensure_optimizer_state(sub, saved_keys, prefix + (f"{name}." if name else ""))
        return
    if not isinstance(optimizer, KeyedOptimizerWrapper):
        return  # fused TorchRec optimizers hold their state from construction
    params = {k: p for k, p in optimizer.params.items() if p.requires_grad}
    if len(optimizer.state) >= len(params) or not params:
        return
    first = next(iter(params))
    if any(k.startswith(f"optim.state.{prefix}{first}.") for k in saved_keys):
        optimizer.init_state()
        optimizer.zero_grad(set_to_none=True)
