"""Per-step learning-rate decay for the combined (tables + dense) optimizer.

``LRSchedule`` sets, before every training step, ``lr = base_lr * lr_factor(step)`` on every
param group of a ``CombinedOptimizer`` (plain or DMP-fused: TorchRec's fused table optimizers
read ``param_groups[0]["lr"]`` on every ``step()``). The base learning rates come from the
run's options, not from the optimizer's current state, so a resumed run (whose restored
optimizer state may hold an already-decayed lr) continues on exactly the same curve.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from vq_torchrec.training.sharding import is_embedding_param

LRScheduleKind = Literal["constant", "cosine", "linear"]
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine", "linear")


def lr_factor(kind: str, step: int, total_steps: int, min_factor: float = 0.0) -> float:
    """Multiplier of the base learning rate for the step with 0-based index ``step``.

    ``"constant"``: 1. ``"cosine"``: ``min + (1 - min) * (1 + cos(pi * t)) / 2`` and
    ``"linear"``: ``1 - (1 - min) * t``, with ``t = step / total_steps`` clamped to ``[0, 1]``;
    both start at 1 and reach ``min_factor`` at ``step == total_steps``.
    """
    if kind not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {list(LR_SCHEDULES)}, got {kind!r}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0.0 <= min_factor <= 1.0:
        raise ValueError(f"min_factor must be in [0, 1], got {min_factor}")
    if kind == "constant":
        return 1.0
    t = min(step / total_steps, 1.0)
    if kind == "cosine":
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0 - (1.0 - min_factor) * t


def _leaf_optimizers(opt: KeyedOptimizer) -> list[KeyedOptimizer]:
    if isinstance(opt, CombinedOptimizer):
        return [leaf for _, sub in opt.optimizers for leaf in _leaf_optimizers(sub)]
    return [opt]


class LRSchedule:
    """Decays the dense and (optionally) the table learning rates of ``optimizer``.

    Args:
        optimizer: the run's ``CombinedOptimizer`` (from ``build_plain_optimizer`` or
            ``shard_model``); a sub-optimizer whose parameters are all embedding tables is
            "sparse", any other is "dense".
        kind: ``"constant"``, ``"cosine"`` or ``"linear"`` (see :func:`lr_factor`).
        total_steps: steps of the whole run (epochs * steps per epoch).
        dense_lr, sparse_lr: base learning rates of the two parts.
        min_factor: the factor reached at the last step.
        decay_tables: decay the table learning rate too (else it stays at ``sparse_lr``).
    """

    def __init__(
        self,
        optimizer: KeyedOptimizer,
        kind: str,
        total_steps: int,
        dense_lr: float,
        sparse_lr: float,
        min_factor: float = 0.0,
        decay_tables: bool = True,
    ) -> None:
        lr_factor(kind, 0, total_steps, min_factor)  # validates the options
        self.kind = kind
        self.total_steps = total_steps
        self.min_factor = min_factor
        self.decay_tables = decay_tables
        self._groups: list[tuple[dict[str, Any], float, bool]] = []  # (param group, base lr, is sparse)
        for leaf in _leaf_optimizers(optimizer):
            names = list(leaf.params)
            sparse = bool(names) and all(is_embedding_param(n) for n in names)
            for group in leaf.param_groups:
                self._groups.append((group, sparse_lr if sparse else dense_lr, sparse))
        if not self._groups:
            raise ValueError("the optimizer has no param groups to schedule")

    def set_step(self, step: int) -> None:
        """Set every group's lr for the step with 0-based global index ``step``."""
        f = lr_factor(self.kind, step, self.total_steps, self.min_factor)
        for group, base, sparse in self._groups:
            group["lr"] = base * (f if (self.decay_tables or not sparse) else 1.0)

    def current_lrs(self) -> dict[str, float]:
        """``{"dense": lr, "sparse": lr}`` as currently set (for logging and tests)."""
        out: dict[str, float] = {}
        for group, _, sparse in self._groups:
            out.setdefault("sparse" if sparse else "dense", float(group["lr"]))
        return out
