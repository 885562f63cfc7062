"""Per-item inputs of the warm-up generators: side-feature vectors read through the backbone, and
interaction-history summaries of the (few) ratings an item has so far."""

from __future__ import annotations

import torch

from vq_torchrec.coldstart.backbone import CTRBackbone
from vq_torchrec.coldstart.features import ITEM_SIDE_KEYS, ColdStartFeatures, RowBlock


def side_dim(feats: ColdStartFeatures, embedding_dim: int, content: bool = False) -> int:
    """Width of :func:`item_side_vectors` (one pooled embedding per side key, the dense content
    vector when ``content``, plus ``count`` for the ``cvar`` feature set)."""
    width = len(ITEM_SIDE_KEYS) * embedding_dim + (1 if "count" in feats.dense_keys else 0)
    return width + (feats.item_content.shape[1] if content else 0)


def item_side_vectors(backbone: CTRBackbone, feats: ColdStartFeatures, items: torch.Tensor,
                      content: bool = False) -> torch.Tensor:
    """``(n, side_dim)``: the backbone's pooled ``year``, ``title``, ``genres`` embeddings of
    ``items`` (``(n,)`` item rows), the item's dense content vector (genre multi-hot, year) when
    ``content``, plus the normalised rating count for ``cvar`` features (last column).
    Differentiable w.r.t. the side tables (the caller detaches if they are frozen)."""
    pooled = backbone.pooled(feats.item_kjt(items))
    parts = [pooled[k] for k in ITEM_SIDE_KEYS]
    if content:
        parts.append(feats.item_content[items])
    if "count" in feats.dense_keys:
        parts.append(feats.item_count[items].unsqueeze(1))
    return torch.cat(parts, dim=1)


HISTORY_EXTRA = 5  # smoothed positive rate, its logit, log-count, mean residual, mean base prob


def history_dim(embedding_dim: int) -> int:
    return 2 * embedding_dim + HISTORY_EXTRA


@torch.no_grad()
def item_agnostic_prob(backbone: CTRBackbone, feats: ColdStartFeatures, rows: RowBlock,
                       batch_size: int = 16384) -> torch.Tensor:
    """``(R,)`` backbone probability of every row with the item's ID embedding and first-order
    weight set to zero (what the backbone expects from the user and side features alone)."""
    was_training = backbone.training
    backbone.eval()
    out = []
    d = backbone.config.embedding_dim
    for b in feats.iter_batches(rows, batch_size, shuffle=False):
        kjt, dense, _ = feats.batch(b)
        zeros = torch.zeros(len(b), d)
        out.append(torch.sigmoid(backbone(kjt, dense, item_emb=zeros, item_bias=zeros[:, 0])))
    backbone.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def history_features(backbone: CTRBackbone, feats: ColdStartFeatures, rows: RowBlock,
                     max_count: int, base_prob: torch.Tensor | None = None) -> torch.Tensor:
    """``(num_items, 2D + 2)`` summary of the observed ``rows`` of every item: mean ``user_id``
    embedding of its positive raters, of its negative raters, the positive rate shrunk towards
    0.5 (``(pos + 1) / (n + 2)`` centred), its log-odds ``log((pos + 1) / (neg + 1))`` and
    ``log1p(n) / log1p(max_count)``, the mean residual ``label - base_prob`` and the mean
    ``base_prob`` (``base_prob``: ``(R,)`` from :func:`item_agnostic_prob`, computed when not
    given). Items without rows get zeros. Uses only ``rows`` (never test data)."""
    n_items = feats.table_sizes["item_id"]
    table = backbone.ebc.embedding_bags["user_id"].weight.detach()
    d = table.shape[1]
    out = torch.zeros(n_items, history_dim(d))
    if len(rows) == 0:
        return out
    u = table[rows.user]
    y = rows.label.unsqueeze(1)
    n = torch.zeros(n_items).index_add_(0, rows.item, torch.ones(len(rows)))
    n_pos = torch.zeros(n_items).index_add_(0, rows.item, rows.label)
    s_pos = torch.zeros(n_items, d).index_add_(0, rows.item, u * y)
    s_neg = torch.zeros(n_items, d).index_add_(0, rows.item, u * (1 - y))
    out[:, :d] = s_pos / n_pos.clamp_min(1).unsqueeze(1)
    out[:, d : 2 * d] = s_neg / (n - n_pos).clamp_min(1).unsqueeze(1)
    seen = n > 0
    out[:, 2 * d] = torch.where(seen, (n_pos + 1) / (n + 2) - 0.5, torch.zeros_like(n))
    out[:, 2 * d + 1] = torch.log((n_pos + 1) / (n - n_pos + 1))
    out[:, 2 * d + 2] = torch.log1p(n) / torch.log1p(torch.tensor(float(max_count)))
    if base_prob is None:
        base_prob = item_agnostic_prob(backbone, feats, rows)
    s_res = torch.zeros(n_items).index_add_(0, rows.item, rows.label - base_prob)
    s_p = torch.zeros(n_items).index_add_(0, rows.item, base_prob)
    out[:, 2 * d + 3] = s_res / n.clamp_min(1)
    out[:, 2 * d + 4] = s_p / n.clamp_min(1)
    return out
