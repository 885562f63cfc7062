"""CVAR warm-up (Zhao et al., SIGIR 2022): a conditional VAE from item side features to the ID
embedding, no quantization, warmed up as in the reference code.

Posterior ``q(z | id_emb)`` and prior ``p(z | side)`` are diagonal Gaussians (latent 8); the
decoder maps ``[z, count]`` (``z`` alone for ``clean`` features) to an ID embedding. Training loss
= BCE through the frozen backbone with the decoded embedding + reconstruction of the ID embedding
+ 2-Wasserstein distance between posterior and prior (summed over the batch, as the reference).
New items are served the prior path's decoding (the prior mean; the reference adds noise).
Schedule: one epoch on ``train_base``, then per warm phase: the protocol's ID update, two epochs
on the phase data, regenerate. As in the paper the item side tables (``year``, ``title``,
``genres``) are trained along with the generator (``train_side_tables``); the rest of the
backbone is frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vq_torchrec.coldstart.backbone import ITEM_KEY, CTRBackbone
from vq_torchrec.coldstart.features import ITEM_SIDE_KEYS, ColdStartFeatures, RowBlock
from vq_torchrec.coldstart.item_inputs import item_side_vectors, side_dim
from vq_torchrec.coldstart.training import TrainConfig, frozen_backbone, train_new_item_rows
from vq_torchrec.coldstart.warm_start import warm_start_rows


def _two_layer(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, o))


class CVARGenerator(nn.Module):
    """Shapes: ``id_emb`` ``(B, D)``, ``side`` ``(B, S)``, ``count`` ``(B, 1)`` or ``None``."""

    def __init__(self, side_width: int, embedding_dim: int = 16, latent_dim: int = 8,
                 use_count: bool = True) -> None:
        super().__init__()
        self.use_count = use_count
        self.mean_encoder = _two_layer(embedding_dim, 16, latent_dim)
        self.log_v_encoder = _two_layer(embedding_dim, 16, latent_dim)
        self.mean_encoder_p = _two_layer(side_width, 16, latent_dim)
        self.log_v_encoder_p = _two_layer(side_width, 16, latent_dim)
        self.decoder = _two_layer(latent_dim + int(use_count), 12, embedding_dim)
        for p in self.parameters():
            nn.init.uniform_(p, -0.01, 0.01)

    def _decode(self, z: torch.Tensor, count: torch.Tensor | None) -> torch.Tensor:
        return self.decoder(torch.cat([z, count], 1) if self.use_count else z)

    def posterior(self, id_emb: torch.Tensor, side: torch.Tensor, count: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(decoded (B, D), wasserstein reg scalar)``, ``z`` sampled from the posterior."""
        mean, log_v = self.mean_encoder(id_emb), self.log_v_encoder(id_emb)
        mean_p, log_v_p = self.mean_encoder_p(side), self.log_v_encoder_p(side)
        z = mean + torch.exp(0.5 * log_v) * torch.randn_like(mean)
        reg = ((mean - mean_p).pow(2).sum(1)
               + (torch.exp(0.5 * log_v) - torch.exp(0.5 * log_v_p)).pow(2).sum(1)).sum()
        return self._decode(z, count), reg

    def prior_mean(self, side: torch.Tensor, count: torch.Tensor | None) -> torch.Tensor:
        """``(B, D)`` embedding decoded from the prior mean."""
        return self._decode(self.mean_encoder_p(side), count)


class CVARMethod:
    """The ``cvar`` warm-up method (see module docstring)."""

    name = "cvar"

    def __init__(self, cfg: TrainConfig, train_side_tables: bool = True, phase_epochs: int = 2) -> None:
        self.cfg = cfg
        self.train_side_tables = train_side_tables
        self.phase_epochs = phase_epochs
        self.generator: CVARGenerator | None = None

    def _count(self, feats: ColdStartFeatures, items: torch.Tensor) -> torch.Tensor | None:
        return feats.item_count[items].unsqueeze(1) if "count" in feats.dense_keys else None

    def _train(self, backbone: CTRBackbone, feats: ColdStartFeatures, rows: RowBlock, epochs: int,
               rng: torch.Generator) -> None:
        assert self.generator is not None
        side_params = [backbone.ebc.embedding_bags[k].weight for k in ITEM_SIDE_KEYS]
        params = list(self.generator.parameters()) + (side_params if self.train_side_tables else [])
        opt = torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.generator.train()
        table = backbone.item_table.weight
        with frozen_backbone(backbone, trainable=params):
            for _ in range(epochs):
                for b in feats.iter_batches(rows, self.cfg.batch_size, True, rng):
                    kjt, dense, label = feats.batch(b)
                    side = item_side_vectors(backbone, feats, b.item)
                    if not self.train_side_tables:
                        side = side.detach()
                    id_emb = table.detach()[b.item]
                    pred, reg = self.generator.posterior(id_emb, side, self._count(feats, b.item))
                    recon = (pred - id_emb).pow(2).sum(-1).mean()
                    bce = F.binary_cross_entropy_with_logits(backbone(kjt, dense, item_emb=pred), label)
                    loss = bce + recon + reg
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

    @torch.no_grad()
    def _regenerate(self, backbone: CTRBackbone, feats: ColdStartFeatures) -> None:
        assert self.generator is not None
        self.generator.eval()
        items = feats.new_items
        side = item_side_vectors(backbone, feats, items)
        emb = self.generator.prior_mean(side, self._count(feats, items))
        warm_start_rows(backbone, ITEM_KEY, items, emb)

    def fit(self, backbone: CTRBackbone, feats: ColdStartFeatures, rng: torch.Generator) -> None:
        """Trains the CVAE on ``train_base`` and writes the cold embeddings of the new items."""
        d = backbone.config.embedding_dim
        self.generator = CVARGenerator(side_dim(feats, d), d, use_count="count" in feats.dense_keys)
        self._train(backbone, feats, feats.train_base, 1, rng)
        self._regenerate(backbone, feats)

    def warm_phase(self, backbone: CTRBackbone, feats: ColdStartFeatures, rows: RowBlock,
                   seen: RowBlock, rng: torch.Generator) -> None:
        train_new_item_rows(backbone, feats, rows, self.cfg, rng)
        self._train(backbone, feats, rows, self.phase_epochs, rng)
        self._regenerate(backbone, feats)
