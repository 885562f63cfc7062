"""Train one epoch / evaluate a DLRM-style model (plain or DMP-wrapped, plain or VQ).

Batches are ``torchrec.datasets.utils.Batch`` (``dense_features (B, num_dense)``,
``sparse_features`` KJT, ``labels (B,)``). The model maps ``(dense, KJT)`` to logits ``(B, 1)``.
The training loss is binary cross-entropy plus ``vq_loss(model)`` (the codebook/commitment
loss of every VQ module, 0 for a plain model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import BinaryAUROC
from torchrec.datasets.utils import Batch
from tqdm import tqdm

from vq_torchrec.training.checkpoint import TrainState
from vq_torchrec.training.dist_env import DistEnv


def model_vq_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the auxiliary VQ losses of ``model`` (``None`` when it has no VQ module)."""
    try:
        from vq_torchrec.modules import vq_loss
    except ImportError:  # pragma: no cover - modules package missing
        return None
    try:
        loss = vq_loss(model)
    except ValueError:
        return None
    if not isinstance(loss, torch.Tensor):
        return None
    return loss


def _forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    logits = model(batch.dense_features, batch.sparse_features)
    return logits.reshape(-1)


def _check_finite(loss: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"training loss is {loss.item()} at epoch {epoch} step {step}; check the learning rate "
            "and the input features"
        )


@dataclass
class EpochResult:
    """Losses of the steps run by :func:`train_epoch` (``losses[i]``: BCE + VQ of step i)."""

    losses: list[float]
    task_losses: list[float]

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / max(len(self.losses), 1)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    env: DistEnv,
    state: TrainState,
    num_batches: int,
    vq_weight: float = 1.0,
    on_step: Callable[[TrainState], None] | None = None,
    progress: bool = True,
) -> EpochResult:
    """Train over ``batches`` (which must already skip the ``state.step_in_epoch`` batches done).

    After every step ``state`` is advanced (``step_in_epoch``, ``global_step``, ``losses``) and
    ``on_step(state)`` is called (checkpointing hooks in here).
    """
    model.train()
    losses: list[float] = []
    task_losses: list[float] = []
    bar = tqdm(
        total=num_batches,
        initial=state.step_in_epoch,
        desc=f"epoch {state.epoch}",
        disable=not (progress and env.is_main),
        dynamic_ncols=True,
        leave=False,
    )
    try:
        for batch in batches:
            batch = batch.to(env.device)
            logits = _forward(model, batch)
            task = F.binary_cross_entropy_with_logits(logits, batch.labels.float().reshape(-1))
            loss = task
            aux = model_vq_loss(model)
            if aux is not None:
                loss = loss + vq_weight * aux
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            _check_finite(loss.detach(), state.epoch, state.step_in_epoch)
            losses.append(value)
            task_losses.append(float(task.detach()))
            state.losses.append(value)
            state.step_in_epoch += 1
            state.global_step += 1
            bar.update(1)
            if len(losses) % 10 == 0 or state.step_in_epoch == num_batches:
                window = losses[-50:]
                bar.set_postfix(loss=f"{sum(window) / len(window):.4f}")
            if on_step is not None:
                on_step(state)
    finally:
        bar.close()
    return EpochResult(losses=losses, task_losses=task_losses)


def _padded(batches: Iterable[Batch], total: int) -> Iterator[tuple[Batch, bool]]:
    """Yield ``(batch, real)``; after the real batches, repeat the last one ``real=False`` up to
    ``total`` so every rank runs the same number of (collective) forward passes."""
    last: Batch | None = None
    n = 0
    for b in batches:
        last = b
        n += 1
        yield b, True
    if n < total:
        if last is None:
            raise ValueError(
                "this rank has no evaluation batch while others do: the evaluation set is "
                "smaller than the number of ranks"
            )
        for _ in range(total - n):
            yield last, False


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    env: DistEnv,
    num_batches: int,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """AUC and log-loss over the whole evaluation set (every rank's shard).

    Returns ``{"auc", "logloss", "num_examples", "positive_rate"}``; identical on every rank.
    """
    was_training = model.training
    model.eval()
    auroc = BinaryAUROC().to(env.device)
    total = int(env.all_reduce_max(torch.tensor([num_batches], dtype=torch.long)).item())
    sums = torch.zeros(3, dtype=torch.float64)  # (sum BCE, count, positives)
    bar = tqdm(total=total, desc=desc, disable=not (progress and env.is_main), leave=False)
    for batch, real in _padded(batches, total):
        batch = batch.to(env.device)
        logits = _forward(model, batch)
        bar.update(1)
        if not real:
            continue
        labels = batch.labels.reshape(-1)
        bce = F.binary_cross_entropy_with_logits(logits.double(), labels.double(), reduction="sum")
        sums += torch.stack([bce.cpu(), torch.tensor(float(labels.numel()), dtype=torch.float64), labels.double().sum().cpu()])
        auroc.update(torch.sigmoid(logits.float()), labels.long())
    bar.close()
    sums = env.all_reduce_sum(sums)
    if sums[1] <= 0:
        raise ValueError("evaluation set is empty")
    auc = float(auroc.compute())
    model.train(was_training)
    return {
        "auc": auc,
        "logloss": float(sums[0] / sums[1]),
        "num_examples": int(sums[1]),
        "positive_rate": float(sums[2] / sums[1]),
    }
