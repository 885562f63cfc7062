"""The project's ``vq`` warm-up: item side features -> encoder -> vector quantizer -> decoder ->
ID embedding (and first-order weight) of a new item, trained through the frozen backbone.

* The decoder is trained on exactly what it serves: the quantized vector (straight-through
  gradients reach the encoder); the quantizer's own loss (codebook + beta * commitment) is added.
* Besides the code, the decoder reads an interaction-history summary of the item
  (:func:`~vq_torchrec.coldstart.item_inputs.history_features`): zeros at the cold point, the
  ratings of the warm phases seen so far afterwards. It is learned on old items by simulating
  histories of ``0, K, 2K, 3K`` of their earliest ratings and predicting their later ratings
  (rows of rank >= 3K), so a new item's embedding is regenerated after every warm phase; then the
  protocol's one-epoch ID update runs from the regenerated rows.
* Before regenerating, the decoder is adapted on the new items' own seen warm rows (pseudo
  histories of their first ``h`` rows predict their later seen rows; encoder, quantizer and so the
  codes stay fixed). Only warm-phase rows are ever read, never test rows.
* ``variant`` picks the quantizer: ``"vector"`` (VQ-VAE), ``"outer"`` or ``"residual"`` (residual
  VQ); the runner selects it on the validation split.
* :meth:`VQMethod.item_codes` exports each item's code (its semantic ID).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vq_torchrec.coldstart.backbone import ITEM_KEY, CTRBackbone
from vq_torchrec.coldstart.features import ColdStartFeatures, RowBlock
from vq_torchrec.coldstart.item_inputs import (
    history_features,
    item_agnostic_prob,
    item_side_vectors,
)
from vq_torchrec.coldstart.training import TrainConfig, frozen_backbone, train_new_item_rows
from vq_torchrec.coldstart.warm_start import read_rows, warm_start_rows
from vq_torchrec.quantization.config import VQConfig

VQ_VARIANTS = ("vector", "outer", "residual")


@dataclass
class VQMethodConfig:
    """Generator hyper-parameters."""

    variant: str = "vector"
    code_dim: int = 16
    hidden: int = 64
    codebook_size: int = 64
    num_levels: int = 3  # residual variant only
    commitment_weight: float = 0.25
    epochs: int = 8
    lr: float = 3e-3
    recon_weight: float = 1.0
    use_history: bool = True
    # "content": genre multi-hot + year (+ count for cvar features); "all": also the backbone's
    # pooled year/title/genres embeddings (lets the encoder memorise old items by title).
    side_inputs: str = "content"
    finetune_after_regenerate: bool = True
    # Epochs of decoder adaptation on the new items' own warm data after each phase (pseudo
    # histories of the first h seen ratings predict the later seen ratings; encoder, quantizer
    # and so the codes stay fixed). 0 disables.
    phase_decoder_epochs: int = 3
    phase_lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.variant not in VQ_VARIANTS:
            raise ValueError(f"unknown vq variant {self.variant!r}; expected one of {VQ_VARIANTS}")

    def vq_config(self) -> VQConfig:
        return VQConfig(
            codebook_size=self.codebook_size,
            mode="outer" if self.variant == "outer" else "vector",
            commitment_weight=self.commitment_weight,
            num_levels=self.num_levels if self.variant == "residual" else 1,
        )


class _Standardize(nn.Module):
    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", x.mean(0))
        self.register_buffer("std", x.std(0).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones(x.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class VQItemGenerator(nn.Module):
    """``side (B, S)`` and ``history (B, H)`` -> ``(emb (B, D), bias (B,), VQOutput)``.

    The decoder's input is ``[quantized (B, code_dim), history]``: the same in training and
    serving (the quantized vector, never the unquantized ``z``)."""

    def __init__(self, side_ref: torch.Tensor, hist_ref: torch.Tensor, embedding_dim: int,
                 cfg: VQMethodConfig) -> None:
        super().__init__()
        from vq_torchrec.quantization import build_quantizer

        self.cfg = cfg
        self.side_norm = _Standardize(side_ref)
        self.hist_norm = _Standardize(hist_ref)
        self.encoder = nn.Sequential(nn.Linear(side_ref.shape[1], cfg.hidden), nn.ReLU(),
                                     nn.Linear(cfg.hidden, cfg.code_dim))
        self.quantizer = build_quantizer(cfg.code_dim, cfg.vq_config())
        hist_width = hist_ref.shape[1] if cfg.use_history else 0
        self.decoder = nn.Sequential(nn.Linear(cfg.code_dim + hist_width, cfg.hidden), nn.ReLU(),
                                     nn.Linear(cfg.hidden, embedding_dim + 1))
        # Linear path of the decoder (same input): eases the near-linear history -> bias map.
        self.decoder_linear = nn.Linear(cfg.code_dim + hist_width, embedding_dim + 1)

    def encode(self, side: torch.Tensor) -> torch.Tensor:
        """``(B, code_dim)`` unquantized latent."""
        return self.encoder(self.side_norm(side))

    def forward(self, side: torch.Tensor, history: torch.Tensor):
        out = self.quantizer(self.encode(side))
        dec_in = out.quantized
        if self.cfg.use_history:
            dec_in = torch.cat([dec_in, self.hist_norm(history)], dim=1)
        y = self.decoder(dec_in) + self.decoder_linear(dec_in)
        return y[:, :-1], y[:, -1], out


def _code_keys(codes: torch.Tensor) -> list[tuple[int, ...]]:
    c = codes.reshape(codes.shape[0], -1).tolist()
    return [tuple(row) for row in c]


class VQMethod:
    """The ``vq`` warm-up method (see module docstring)."""

    name = "vq"

    def __init__(self, cfg: TrainConfig, vq_cfg: VQMethodConfig | None = None) -> None:
        self.cfg = cfg
        self.vq_cfg = vq_cfg or VQMethodConfig()
        self.generator: VQItemGenerator | None = None
        self._side: torch.Tensor | None = None
        self._max_hist = 1

    def _side_vectors(self, backbone: CTRBackbone, feats: ColdStartFeatures, items: torch.Tensor) -> torch.Tensor:
        if self.vq_cfg.side_inputs == "all":
            return item_side_vectors(backbone, feats, items, content=True).detach()
        parts = [feats.item_content[items]]
        if "count" in feats.dense_keys:
            parts.append(feats.item_count[items].unsqueeze(1))
        return torch.cat(parts, dim=1)

    def _train_rows(self, feats: ColdStartFeatures, num_levels: int, k: int) -> RowBlock:
        rows = feats.train_base
        keep = rows.rank >= num_levels * k
        return rows.subset(keep.nonzero().squeeze(1)) if bool(keep.any()) else rows

    def fit(self, backbone: CTRBackbone, feats: ColdStartFeatures, rng: torch.Generator) -> None:
        """Trains the generator on old items and writes the cold rows of the new items."""
        d = backbone.config.embedding_dim
        k = feats.k
        n_phases = feats.num_protocol_phases
        levels = n_phases + 1
        self._max_hist = n_phases * k
        backbone.eval()
        with torch.no_grad():
            all_items = torch.arange(feats.table_sizes[ITEM_KEY])
            self._side = self._side_vectors(backbone, feats, all_items)
        early = feats.train_base.subset((feats.train_base.rank < n_phases * k).nonzero().squeeze(1))
        early_p = item_agnostic_prob(backbone, feats, early)
        hist = torch.stack([
            history_features(backbone, feats, early.subset(sel), self._max_hist, early_p[sel])
            for sel in ((early.rank < lvl * k).nonzero().squeeze(1) for lvl in range(levels))
        ])  # (levels, n_items, H)
        old = feats.old_items
        hist_ref = hist[1:, old].reshape(-1, hist.shape[-1]) if levels > 1 else hist[0, old]
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
        self.generator = VQItemGenerator(self._side[old], hist_ref, d, self.vq_cfg)
        id_emb = read_rows(backbone, ITEM_KEY, all_items)
        lin = backbone.item_linear_table
        id_bias = read_rows(backbone, f"{ITEM_KEY}_linear", all_items).squeeze(-1) if lin is not None \
            else torch.zeros(all_items.numel())
        rows = self._train_rows(feats, n_phases, k)
        opt = torch.optim.Adam(self.generator.parameters(), lr=self.vq_cfg.lr,
                               weight_decay=self.cfg.weight_decay)
        self.generator.train()
        with frozen_backbone(backbone):
            for _ in range(self.vq_cfg.epochs):
                for b in feats.iter_batches(rows, self.cfg.batch_size, True, rng):
                    kjt, dense, label = feats.batch(b)
                    lvl = torch.randint(0, levels, (len(b),), generator=rng)
                    emb, bias, out = self.generator(self._side[b.item], hist[lvl, b.item])
                    logits = backbone(kjt, dense, item_emb=emb,
                                      item_bias=bias if lin is not None else None)
                    recon = (emb - id_emb[b.item]).pow(2).sum(-1).mean() + (bias - id_bias[b.item]).pow(2).mean()
                    loss = (F.binary_cross_entropy_with_logits(logits, label)
                            + self.vq_cfg.recon_weight * recon + out.loss)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        self._regenerate(backbone, feats, None)

    @torch.no_grad()
    def _regenerate(self, backbone: CTRBackbone, feats: ColdStartFeatures, seen: RowBlock | None) -> None:
        assert self.generator is not None and self._side is not None
        self.generator.eval()
        items = feats.new_items
        if seen is None or not self.vq_cfg.use_history:
            hist = torch.zeros(items.numel(), self.generator.hist_norm.mean.numel())
        else:
            hist = history_features(backbone, feats, seen, self._max_hist)[items]
        emb, bias, _ = self.generator(self._side[items], hist)
        warm_start_rows(backbone, ITEM_KEY, items, emb)
        if backbone.item_linear_table is not None:
            warm_start_rows(backbone, f"{ITEM_KEY}_linear", items, bias.unsqueeze(-1))

    def _adapt_decoder(self, backbone: CTRBackbone, feats: ColdStartFeatures, seen: RowBlock,
                       rng: torch.Generator) -> None:
        """Trains the decoder on the new items' seen rows: for a target row of rank ``r`` the
        history is the item's first ``h`` rows, ``h`` a multiple of ``K/2`` with ``h <= r``."""
        assert self.generator is not None and self._side is not None
        step = max(feats.k // 2, 1)
        n_levels = int(seen.rank.max()) // step if len(seen) else 0
        if n_levels < 1 or self.vq_cfg.phase_decoder_epochs <= 0:
            return
        seen_p = item_agnostic_prob(backbone, feats, seen)
        hist = torch.stack([
            history_features(backbone, feats, seen.subset(sel), self._max_hist, seen_p[sel])
            for sel in ((seen.rank < (i + 1) * step).nonzero().squeeze(1) for i in range(n_levels))
        ])  # (n_levels, n_items, H)
        valid = torch.clamp(seen.rank // step, max=n_levels)
        rows = seen.subset((valid > 0).nonzero().squeeze(1))
        valid = torch.clamp(rows.rank // step, max=n_levels)
        params = list(self.generator.decoder.parameters()) + list(self.generator.decoder_linear.parameters())
        opt = torch.optim.Adam(params, lr=self.vq_cfg.phase_lr, weight_decay=self.cfg.weight_decay)
        lin = backbone.item_linear_table
        self.generator.eval()  # encoder and quantizer frozen: codes and codebook do not move
        with frozen_backbone(backbone):
            for _ in range(self.vq_cfg.phase_decoder_epochs):
                order = torch.randperm(len(rows), generator=rng)
                for start in range(0, len(rows), self.cfg.batch_size):
                    idx = order[start : start + self.cfg.batch_size]
                    b = rows.subset(idx)
                    lvl = (torch.rand(len(b), generator=rng) * valid[idx]).long()
                    kjt, dense, label = feats.batch(b)
                    emb, bias, _ = self.generator(self._side[b.item], hist[lvl, b.item])
                    logits = backbone(kjt, dense, item_emb=emb, item_bias=bias if lin is not None else None)
                    loss = F.binary_cross_entropy_with_logits(logits, label)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

    def warm_phase(self, backbone: CTRBackbone, feats: ColdStartFeatures, rows: RowBlock,
                   seen: RowBlock, rng: torch.Generator) -> None:
        if self.vq_cfg.use_history:
            self._adapt_decoder(backbone, feats, seen, rng)
        self._regenerate(backbone, feats, seen)
        if self.vq_cfg.finetune_after_regenerate:
            train_new_item_rows(backbone, feats, rows, self.cfg, rng)

    @torch.no_grad()
    def item_codes(self, items: torch.Tensor) -> torch.Tensor:
        """Codes (semantic IDs) of ``items``: ``(n,)`` (vector), ``(n, code_dim)`` (outer) or
        ``(n, num_levels)`` (residual)."""
        if self.generator is None or self._side is None:
            raise RuntimeError("item_codes() needs a fitted VQMethod (call fit first)")
        self.generator.eval()
        return self.generator.quantizer(self.generator.encode(self._side[items])).codes

    def shared_code_count(self, feats: ColdStartFeatures) -> int:
        """Number of new items whose code equals the code of at least one old item."""
        old = set(_code_keys(self.item_codes(feats.old_items)))
        return sum(key in old for key in _code_keys(self.item_codes(feats.new_items)))
