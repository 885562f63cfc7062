"""CTR backbones on a TorchRec ``EmbeddingBagCollection``: DeepFM (the reference's) and DLRM.

Both take ``(kjt, dense)`` and return logits ``(B,)``. ``item_emb`` / ``item_bias`` optionally
replace the pooled ``item_id`` embedding ``(B, D)`` / first-order weight ``(B,)``: this is how a
warm-up generator is trained through a frozen backbone (the reference's
``forward_with_item_id_emb``) and how only new items' rows are trained in the warm phases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

ITEM_KEY = "item_id"
BACKBONES = ("deepfm", "dlrm")


@dataclass
class BackboneConfig:
    """Backbone hyper-parameters (defaults = the reference's DeepFM)."""

    kind: str = "deepfm"
    embedding_dim: int = 16
    mlp_dims: tuple[int, ...] = (16, 16)
    dropout: float = 0.2
    # The reference initialises every parameter U(-init_scale, init_scale); None keeps
    # TorchRec's / PyTorch's default initialisers.
    init_scale: float | None = None
    # First-order weights for the sparse keys (the reference's DeepFM has them only for dense).
    sparse_first_order: bool = True

    def __post_init__(self) -> None:
        if self.kind not in BACKBONES:
            raise ValueError(f"unknown backbone kind {self.kind!r}; expected one of {BACKBONES}")
        if self.embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be > 0, got {self.embedding_dim}")


def _mlp(in_dim: int, dims: tuple[int, ...], dropout: float) -> nn.Sequential:
    """Linear -> BatchNorm -> ReLU -> Dropout per layer, then Linear to 1 (reference layout)."""
    layers: list[nn.Module] = []
    for d in dims:
        layers += [nn.Linear(in_dim, d), nn.BatchNorm1d(d), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = d
    layers.append(nn.Linear(in_dim, 1))
    return nn.Sequential(*layers)


class CTRBackbone(nn.Module):
    """DeepFM (first order + FM + MLP) or DLRM (dot interactions + top MLP) over one
    ``EmbeddingBagCollection`` (table per sparse key, ``embedding_dim`` each, sum pooling).

    Args:
        table_sizes: ``{sparse key: num_embeddings}``; must contain ``"item_id"``.
        num_dense: number of dense features (each gets an embedding vector and a linear weight).
        config: :class:`BackboneConfig`.

    Attributes:
        ebc: the ``EmbeddingBagCollection`` (tables named like their keys).
        ebc_linear: first-order weights, an ``EmbeddingBagCollection`` of dim-1 tables
            named ``"<key>_linear"`` (DeepFM only; ``None`` for DLRM).
    """

    def __init__(self, table_sizes: dict[str, int], num_dense: int, config: BackboneConfig) -> None:
        super().__init__()
        if ITEM_KEY not in table_sizes:
            raise ValueError(f"table_sizes must contain {ITEM_KEY!r}, got {sorted(table_sizes)}")
        self.config = config
        self.keys = list(table_sizes)
        self.num_dense = num_dense
        d = config.embedding_dim
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name=k, embedding_dim=d, num_embeddings=n, feature_names=[k],
                                   pooling=PoolingType.SUM)
                for k, n in table_sizes.items()
            ]
        )
        self.dense_emb = nn.Parameter(torch.randn(num_dense, d) * 0.01)
        num_fields = len(self.keys) + num_dense
        self.ebc_linear: EmbeddingBagCollection | None = None
        if config.kind == "deepfm" and config.sparse_first_order:
            self.ebc_linear = EmbeddingBagCollection(
                tables=[
                    EmbeddingBagConfig(name=f"{k}_linear", embedding_dim=1, num_embeddings=n,
                                       feature_names=[k], pooling=PoolingType.SUM)
                    for k, n in table_sizes.items()
                ]
            )
        if config.kind == "deepfm":
            self.dense_linear = nn.Parameter(torch.zeros(num_dense))
            self.bias = nn.Parameter(torch.zeros(1))
            self.mlp = _mlp(num_fields * d, config.mlp_dims, config.dropout)
        else:
            n_pairs = num_fields * (num_fields - 1) // 2
            self.mlp = _mlp(n_pairs + num_fields * d, config.mlp_dims, config.dropout)
        if config.init_scale is not None:
            for p in self.parameters():
                nn.init.uniform_(p, -config.init_scale, config.init_scale)
        if self.ebc_linear is not None:
            for table in self.ebc_linear.embedding_bags.values():
                nn.init.zeros_(table.weight)

    @property
    def item_table(self) -> nn.EmbeddingBag:
        return self.ebc.embedding_bags[ITEM_KEY]

    @property
    def item_linear_table(self) -> nn.EmbeddingBag | None:
        return None if self.ebc_linear is None else self.ebc_linear.embedding_bags[f"{ITEM_KEY}_linear"]

    def pooled(self, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """``{key: (B, D)}`` pooled embeddings of every sparse key."""
        return self.ebc(kjt).to_dict()

    def forward(
        self,
        kjt: KeyedJaggedTensor,
        dense: torch.Tensor,
        item_emb: torch.Tensor | None = None,
        item_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B,)``. ``dense``: ``(B, num_dense)``; ``item_emb``: ``(B, D)`` replaces the
        pooled item embedding; ``item_bias``: ``(B,)`` replaces the item's first-order weight."""
        if dense.dim() != 2 or dense.shape[1] != self.num_dense:
            raise ValueError(f"dense must be (B, {self.num_dense}), got {tuple(dense.shape)}")
        emb = self.pooled(kjt)
        if item_emb is not None:
            emb[ITEM_KEY] = item_emb
        fields = [emb[k] for k in self.keys]
        if self.num_dense:
            fields += list((dense.unsqueeze(-1) * self.dense_emb.unsqueeze(0)).unbind(1))
        x = torch.stack(fields, dim=1)  # (B, F, D)
        if self.config.kind == "deepfm":
            first = self.bias.expand(x.shape[0])
            if self.ebc_linear is not None:
                lin = self.ebc_linear(kjt).to_dict()
                if item_bias is not None:
                    lin[ITEM_KEY] = item_bias.unsqueeze(-1)
                first = first + torch.cat([lin[k] for k in self.keys], dim=1).sum(1)
            if self.num_dense:
                first = first + dense @ self.dense_linear
            square_of_sum = x.sum(1).pow(2)
            sum_of_square = x.pow(2).sum(1)
            fm = 0.5 * (square_of_sum - sum_of_square).sum(1)
            return first + fm + self.mlp(x.flatten(1)).squeeze(-1)
        inter = torch.bmm(x, x.transpose(1, 2))
        iu = torch.triu_indices(x.shape[1], x.shape[1], offset=1)
        pairs = inter[:, iu[0], iu[1]]
        return self.mlp(torch.cat([x.flatten(1), pairs], dim=1)).squeeze(-1)
