"""Process-group set-up from ``torchrun`` environment variables.

Single process (no ``RANK``/``WORLD_SIZE`` in the environment): no process group, the model
trains unsharded. Under ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): a process group is created with ``gloo`` on
CPU and ``nccl`` on CUDA, and the model is wrapped in ``DistributedModelParallel``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

_REQUIRED_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistEnv:
    """Where this process sits in the job.

    Attributes:
        rank, world_size, local_rank: from the launcher (0, 1, 0 in a single process).
        device: the compute device of this rank.
        backend: ``"gloo"``, ``"nccl"`` or ``None`` (single process, no process group).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        """True when a process group is initialised (the model is sharded with DMP)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks (returns ``t`` unchanged in a single process)."""
        if self.distributed:
            t = t.to(self.device if self.backend == "nccl" else "cpu").clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            t = t.to(self.device if self.backend == "nccl" else "cpu").clone()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t


def _launched_by_torchrun() -> bool:
    return all(v in os.environ for v in _REQUIRED_VARS)


def init_dist_env(device: str | None = None, timeout_s: float = 300.0) -> DistEnv:
    """Initialise the process group when launched by ``torchrun``; else a single-process env.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available, else CPU).
        timeout_s: collective timeout.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but CUDA is not available")

    if not _launched_by_torchrun():
        missing = [v for v in _REQUIRED_VARS if v in os.environ]
        if missing and "WORLD_SIZE" in os.environ:
            raise ValueError(
                f"incomplete torchrun environment: have {missing}, need all of {_REQUIRED_VARS}"
            )
        return DistEnv(device=torch.device(device))

    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store = _restart_safe_store(world_size, timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(
                backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout
            )
    return DistEnv(
        rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend
    )


def _restart_safe_store(world_size: int, timeout: timedelta) -> dist.Store | None:
    """Under ``torchrun``'s agent store, a store namespaced by the restart attempt.

    With the default (static) rendezvous, ``torchrun --max-restarts`` keeps one agent TCPStore
    across restarts, so the gloo address keys of the dead attempt are still there and the
    restarted ranks try to connect to dead peers. Prefixing the keys with
    ``TORCHELASTIC_RESTART_COUNT`` gives every attempt a clean namespace. ``None`` outside the
    agent store (plain ``env://`` init is used then).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    tcp = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=world_size,
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"/vq_torchrec/attempt_{attempt}", tcp)


def destroy_dist_env(env: DistEnv) -> None:
    """Tear down the process group created by :func:`init_dist_env` (no-op otherwise)."""
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
