"""Optimizers and ``DistributedModelParallel`` wrapping.

Sparse part (embedding tables): Adagrad / row-wise Adagrad / SGD. Under DMP it is *fused*
into the TorchRec embedding kernels with ``apply_optimizer_in_backward`` (fused Adam exists
only on GPU, so CPU defaults to Adagrad). Dense part (MLPs, VQ codebooks): a torch optimizer
behind ``KeyedOptimizerWrapper``. Both are combined in a ``CombinedOptimizer`` whose
``state_dict`` is keyed by parameter name (what the checkpoint saves).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import nn
from torchrec import optim as trec_optim
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper

from vq_torchrec.training.dist_env import DistEnv

SparseOptimizer = Literal["adagrad", "rowwise_adagrad", "sgd", "adam"]
DenseOptimizer = Literal["adam", "adagrad", "sgd"]

# Real (runnable) optimizer classes: the same classes select the fused fbgemm kernel
# (EXACT_ADAGRAD, EXACT_ROWWISE_ADAGRAD, EXACT_SGD, ADAM) under DMP.
_SPARSE_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}
_DENSE_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}


def is_embedding_param(name: str) -> bool:
    """True for a TorchRec embedding-table weight (``...embedding_bags.<table>.weight``)."""
    return ".embedding_bags." in f".{name}" or ".embeddings." in f".{name}"


def _sparse_kwargs(kind: str, lr: float, weight_decay: float = 0.0) -> dict[str, float]:
    kwargs: dict[str, float] = {"lr": lr}
    if kind in ("adagrad", "rowwise_adagrad"):
        kwargs["eps"] = 1e-8
    if weight_decay:
        kwargs["weight_decay"] = weight_decay
    return kwargs


def _check_weight_decay(name: str, value: float) -> None:
    if not value >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_choices(sparse_optimizer: str, dense_optimizer: str, fused_on_cpu: bool) -> None:
    if sparse_optimizer not in _SPARSE_CLASSES:
        raise ValueError(
            f"sparse_optimizer must be one of {sorted(_SPARSE_CLASSES)}, got {sparse_optimizer!r}"
        )
    if dense_optimizer not in _DENSE_CLASSES:
        raise ValueError(
            f"dense_optimizer must be one of {sorted(_DENSE_CLASSES)}, got {dense_optimizer!r}"
        )
    if sparse_optimizer == "adam" and fused_on_cpu:
        raise ValueError(
            "sparse_optimizer='adam' (fused Adam) is GPU-only in fbgemm; on CPU use "
            "'adagrad', 'rowwise_adagrad' or 'sgd'"
        )


def _dense_wrapper(
    params: dict[str, nn.Parameter], dense_optimizer: str, lr: float, weight_decay: float = 0.0
) -> KeyedOptimizerWrapper:
    cls = _DENSE_CLASSES[dense_optimizer]
    factory: Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer] = (  # noqa: E731
        lambda p: cls(p, lr=lr, weight_decay=weight_decay)
    )
    return KeyedOptimizerWrapper(params, factory)


def build_plain_optimizer(
    model: nn.Module,
    sparse_optimizer: SparseOptimizer = "adagrad",
    sparse_lr: float = 0.05,
    dense_optimizer: DenseOptimizer = "adam",
    dense_lr: float = 1e-3,
    sparse_weight_decay: float = 0.0,
    dense_weight_decay: float = 0.0,
) -> CombinedOptimizer:
    """Optimizer for an unsharded model (single process): both parts are ordinary steps.

    ``sparse_weight_decay`` / ``dense_weight_decay`` are the optimizers' (L2, coupled)
    ``weight_decay`` on the tables / on every other parameter (0 = off).
    """
    _check_choices(sparse_optimizer, dense_optimizer, fused_on_cpu=False)
    _check_weight_decay("sparse_weight_decay", sparse_weight_decay)
    _check_weight_decay("dense_weight_decay", dense_weight_decay)
    named = dict(model.named_parameters())
    sparse = {k: v for k, v in named.items() if is_embedding_param(k)}
    dense = {k: v for k, v in named.items() if not is_embedding_param(k)}
    if not sparse:
        raise ValueError("model has no embedding-table parameters (expected '...embedding_bags.<table>.weight')")
    cls = _SPARSE_CLASSES[sparse_optimizer]
    kwargs = _sparse_kwargs(sparse_optimizer, sparse_lr, sparse_weight_decay)
    sparse_opt = KeyedOptimizerWrapper(sparse, lambda p: cls(p, **kwargs))
    opts: list[tuple[str, KeyedOptimizer]] = [("sparse", sparse_opt)]
    if dense:
        opts.append(("dense", _dense_wrapper(dense, dense_optimizer, dense_lr, dense_weight_decay)))
    return CombinedOptimizer(opts)


def shard_model(
    model: nn.Module,
    env: DistEnv,
    sparse_optimizer: SparseOptimizer = "adagrad",
    sparse_lr: float = 0.05,
    dense_optimizer: DenseOptimizer = "adam",
    dense_lr: float = 1e-3,
    batch_size_per_rank: int | None = None,
    sharding_type: str | None = None,
    dense_weight_decay: float = 0.0,
) -> tuple[nn.Module, CombinedOptimizer]:
    """Fuse the sparse optimizer into the tables (``apply_optimizer_in_backward``), wrap
    ``model`` with :func:`vq_torchrec.distributed.shard_model` (planner-chosen plan, or every
    table forced to ``sharding_type``) and add a keyed dense optimizer.

    ``dense_weight_decay`` is the dense optimizer's ``weight_decay``. (The fused table
    optimizers take no weight decay here; see :func:`build_plain_optimizer` for that.)

    Returns:
        ``(dmp_model, optimizer)``; ``optimizer.step()`` steps the dense part (the sparse part
        is applied inside backward).
    """
    _check_weight_decay("dense_weight_decay", dense_weight_decay)
    if not env.distributed:
        raise ValueError("shard_model needs an initialised process group (run under torchrun)")
    _check_choices(sparse_optimizer, dense_optimizer, fused_on_cpu=env.device.type == "cpu")
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from vq_torchrec.distributed import shard_model as shard_vq_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

        sparse_params = [p for n, p in model.named_parameters() if is_embedding_param(n)]
        if not sparse_params:
            raise ValueError("model has no embedding-table parameters to shard")
        apply_optimizer_in_backward(
            _SPARSE_CLASSES[sparse_optimizer],
            sparse_params,
            _sparse_kwargs(sparse_optimizer, sparse_lr),
        )
    dmp = shard_vq_model(
        model, sharding_type=sharding_type, device=env.device, batch_size=batch_size_per_rank or 512
    )
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    dense_opt = _dense_wrapper(dense, dense_optimizer, dense_lr, dense_weight_decay)
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense_opt])
    return dmp, optimizer
