"""Training and evaluation loops of the cold-start protocol: backbone pre-training, the warm-phase
update that trains only the new items' ID rows, and test AUC."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from vq_torchrec.coldstart.backbone import ITEM_KEY, CTRBackbone
from vq_torchrec.coldstart.features import ColdStartFeatures, RowBlock
from vq_torchrec.coldstart.warm_start import read_rows, warm_start_rows


@dataclass
class TrainConfig:
    """The reference's optimisation settings (Adam, one epoch, batch 2048)."""

    lr: float = 1e-3
    weight_decay: float = 1e-6
    batch_size: int = 2048
    pretrain_epochs: int = 1
    warm_epochs: int = 1


@contextmanager
def frozen_backbone(backbone: torch.nn.Module, trainable: Sequence[torch.Tensor] = ()) -> Iterator[None]:
    """Puts ``backbone`` in eval mode and freezes every parameter not in ``trainable`` for the
    ``with`` block; their ``requires_grad`` is restored afterwards (the mode is not: callers
    that need train mode set it)."""
    frozen = [p for p in backbone.parameters() if p.requires_grad and all(p is not q for q in trainable)]
    for p in frozen:
        p.requires_grad_(False)
    backbone.eval()
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def auc_score(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """ROC AUC with ties averaged (Mann-Whitney). ``labels``/``scores``: ``(N,)``."""
    y = labels.detach().cpu().numpy().astype(bool)
    s = scores.detach().cpu().double().numpy()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes, got {n_pos} positives and {n_neg} negatives")
    if not np.isfinite(s).all():
        raise ValueError("AUC got non-finite scores")
    ranks = pd.Series(s).rank(method="average").to_numpy()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def predict(backbone: CTRBackbone, feats: ColdStartFeatures, rows: RowBlock,
            batch_size: int = 16384) -> torch.Tensor:
    """Logits ``(R,)`` of ``rows`` with the backbone in eval mode."""
    was_training = backbone.training
    backbone.eval()
    out = [backbone(*feats.batch(b)[:2]) for b in feats.iter_batches(rows, batch_size, shuffle=False)]
    backbone.train(was_training)
    return torch.cat(out)


def evaluate_auc(backbone: CTRBackbone, feats: ColdStartFeatures, rows: RowBlock) -> float:
    return auc_score(rows.label, predict(backbone, feats, rows))


def pretrain(backbone: CTRBackbone, feats: ColdStartFeatures, cfg: TrainConfig,
             generator: torch.Generator) -> None:
    """Trains every backbone parameter on ``feats.train_base`` (old items' ratings)."""
    backbone.train()
    opt = torch.optim.Adam(backbone.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.pretrain_epochs):
        for b in feats.iter_batches(feats.train_base, cfg.batch_size, True, generator):
            kjt, dense, label = feats.batch(b)
            loss = F.binary_cross_entropy_with_logits(backbone(kjt, dense), label)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def new_item_positions(feats: ColdStartFeatures) -> torch.Tensor:
    """``(num_items,)`` long: position of each item in ``feats.new_items`` or -1."""
    pos = torch.full((feats.table_sizes[ITEM_KEY],), -1, dtype=torch.long)
    pos[feats.new_items] = torch.arange(feats.new_items.numel())
    return pos


def train_new_item_rows(backbone: CTRBackbone, feats: ColdStartFeatures, rows: RowBlock,
                        cfg: TrainConfig, generator: torch.Generator) -> None:
    """One warm phase: trains only the new items' ID rows (embedding and first-order weight)
    on ``rows`` with everything else frozen (backbone in eval mode: no dropout, BatchNorm
    statistics fixed), then writes them back with :func:`warm_start_rows`.

    The rows are held in a separate ``(n_new, D)`` parameter, so no other row of any table can
    move (not even through weight decay)."""
    pos = new_item_positions(feats)
    if len(rows) and bool((pos[rows.item] < 0).any()):
        raise ValueError("warm-phase rows contain items that are not new items")
    new_ids = feats.new_items
    emb = torch.nn.Parameter(read_rows(backbone, ITEM_KEY, new_ids).clone())
    params = [emb]
    bias = None
    if backbone.item_linear_table is not None:
        bias = torch.nn.Parameter(read_rows(backbone, f"{ITEM_KEY}_linear", new_ids).squeeze(-1).clone())
        params.append(bias)
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    was_training = backbone.training
    with frozen_backbone(backbone):
        for _ in range(cfg.warm_epochs):
            for b in feats.iter_batches(rows, cfg.batch_size, True, generator):
                kjt, dense, label = feats.batch(b)
                p = pos[b.item]
                logits = backbone(kjt, dense, item_emb=emb[p], item_bias=None if bias is None else bias[p])
                loss = F.binary_cross_entropy_with_logits(logits, label)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    backbone.train(was_training)
    warm_start_rows(backbone, ITEM_KEY, new_ids, emb.detach())
    if bias is not None:
        warm_start_rows(backbone, f"{ITEM_KEY}_linear", new_ids, bias.detach().unsqueeze(-1))
