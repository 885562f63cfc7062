"""Runs one (method, feature set, seed) through the cold-start protocol and returns the four test
AUCs (cold, after warm-a, after warm-b, after warm-c)."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from vq_torchrec.coldstart.backbone import BackboneConfig, CTRBackbone
from vq_torchrec.coldstart.cvar_method import CVARMethod
from vq_torchrec.coldstart.features import ColdStartFeatures, RowBlock
from vq_torchrec.coldstart.training import TrainConfig, evaluate_auc, pretrain, train_new_item_rows
from vq_torchrec.coldstart.vq_method import VQ_VARIANTS, VQMethod, VQMethodConfig

METHODS = ("base", "cvar", "vq")


class WarmUpMethod(Protocol):
    def fit(self, backbone: CTRBackbone, feats: ColdStartFeatures, rng: torch.Generator) -> None: ...

    def warm_phase(self, backbone: CTRBackbone, feats: ColdStartFeatures, rows: RowBlock,
                   seen: RowBlock, rng: torch.Generator) -> None: ...


class BaseMethod:
    """``base``: new items keep the table's initial rows; warm phases only run the ID update."""

    name = "base"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def fit(self, backbone: CTRBackbone, feats: ColdStartFeatures, rng: torch.Generator) -> None:
        return None

    def warm_phase(self, backbone: CTRBackbone, feats: ColdStartFeatures, rows: RowBlock,
                   seen: RowBlock, rng: torch.Generator) -> None:
        train_new_item_rows(backbone, feats, rows, self.cfg, rng)


@dataclass
class RunConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    vq: VQMethodConfig = field(default_factory=VQMethodConfig)
    # vq variants tried; the one with the best mean validation AUC is reported.
    vq_variants: tuple[str, ...] = VQ_VARIANTS


@dataclass
class RunResult:
    aucs: list[float]
    info: dict[str, Any] = field(default_factory=dict)


def _cat(blocks: list[RowBlock]) -> RowBlock:
    return RowBlock(*(torch.cat([getattr(b, f) for b in blocks]) for f in
                      ("user", "item", "timestamp", "label", "rank")))


def pretrain_backbone(feats: ColdStartFeatures, cfg: RunConfig, seed: int) -> CTRBackbone:
    """A backbone initialised with ``seed`` and trained on ``train_base``."""
    torch.manual_seed(seed)
    backbone = CTRBackbone(feats.table_sizes, len(feats.dense_keys), cfg.backbone)
    pretrain(backbone, feats, cfg.train, torch.Generator().manual_seed(seed))
    return backbone


def run_phases(backbone: CTRBackbone, feats: ColdStartFeatures, method: WarmUpMethod,
               rng: torch.Generator) -> list[float]:
    """AUC on ``feats.test`` now (after ``method.fit``) and after each warm phase."""
    aucs = [evaluate_auc(backbone, feats, feats.test)]
    seen: list[RowBlock] = []
    for _, rows in feats.phases:
        seen.append(rows)
        method.warm_phase(backbone, feats, rows, _cat(seen), rng)
        aucs.append(evaluate_auc(backbone, feats, feats.test))
    return aucs


def make_method(name: str, cfg: RunConfig, variant: str | None = None) -> WarmUpMethod:
    if name == "base":
        return BaseMethod(cfg.train)
    if name == "cvar":
        return CVARMethod(cfg.train)
    if name == "vq":
        vq_cfg = dataclasses.replace(cfg.vq, variant=variant) if variant else cfg.vq
        return VQMethod(cfg.train, vq_cfg)
    raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")


def run_method(feats: ColdStartFeatures, method: str, seed: int, cfg: RunConfig | None = None,
               pretrained: CTRBackbone | None = None) -> RunResult:
    """Runs ``method`` for one seed; returns the four test AUCs.

    ``pretrained`` (a backbone from :func:`pretrain_backbone` with the same ``seed``) is copied,
    never modified, so several methods can share one pre-training. For ``vq`` every variant in
    ``cfg.vq_variants`` is fitted and run on the validation split (held-out ``warm_c``, see
    :meth:`ColdStartFeatures.validation_view`); the reported AUCs are those of the variant with
    the best mean validation AUC. ``info`` holds the validation AUCs, the chosen variant, the test
    AUCs of every variant (for information only) and the shared-code count.
    """
    cfg = cfg or RunConfig()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    base = pretrained if pretrained is not None else pretrain_backbone(feats, cfg, seed)
    if method != "vq":
        torch.manual_seed(seed + 1)
        rng = torch.Generator().manual_seed(seed + 1)
        backbone = copy.deepcopy(base)
        m = make_method(method, cfg)
        m.fit(backbone, feats, rng)
        return RunResult(run_phases(backbone, feats, m, rng))
    info: dict[str, Any] = {"validation": {}, "test_by_variant": {}, "shared_codes": {}}
    val_feats = feats.validation_view()
    best: tuple[float, str] | None = None
    for variant in cfg.vq_variants:
        torch.manual_seed(seed + 1)
        rng = torch.Generator().manual_seed(seed + 1)
        fitted = copy.deepcopy(base)
        vq = make_method("vq", cfg, variant)
        vq.fit(fitted, feats, rng)
        val = run_phases(copy.deepcopy(fitted), val_feats, copy.deepcopy(vq),
                         torch.Generator().manual_seed(seed + 2))
        test = run_phases(fitted, feats, vq, torch.Generator().manual_seed(seed + 2))
        info["validation"][variant] = val
        info["test_by_variant"][variant] = test
        assert isinstance(vq, VQMethod)
        info["shared_codes"][variant] = vq.shared_code_count(feats)
        score = sum(val) / len(val)
        if best is None or score > best[0]:
            best = (score, variant)
    assert best is not None
    info["variant"] = best[1]
    info["num_new_items"] = int(feats.new_items.numel())
    return RunResult(info["test_by_variant"][best[1]], info)
