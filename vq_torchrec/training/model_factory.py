"""Build a TorchRec DLRM / DLRM_DCN over MovieLens-style sparse features, optionally with VQ.

One ``EmbeddingBagConfig`` (table ``t_<feature>``) per sparse feature, all of the same
``embedding_dim`` (DLRM requires it). With ``vq`` the collection is a
``VQEmbeddingBagCollection``; with ``vq.output == "concat"`` every pooled key is
``2 * embedding_dim`` long and the dense/over arches are sized for that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from vq_torchrec.quantization.config import VQConfig

Arch = Literal["dlrm", "dcn"]


def table_name(feature: str) -> str:
    """Name of the embedding table that serves ``feature``."""
    return f"t_{feature}"


def build_tables(
    sparse_feature_sizes: Mapping[str, int], embedding_dim: int
) -> list[EmbeddingBagConfig]:
    """One sum-pooled table per feature, ``num_embeddings`` = the feature's vocabulary size."""
    if not sparse_feature_sizes:
        raise ValueError("sparse_feature_sizes is empty: DLRM needs at least one sparse feature")
    if embedding_dim <= 0:
        raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
    tables = []
    for feature, size in sparse_feature_sizes.items():
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"sparse feature {feature!r}: vocabulary size must be a positive int, got {size!r}")
        tables.append(
            EmbeddingBagConfig(
                name=table_name(feature),
                embedding_dim=embedding_dim,
                num_embeddings=size,
                feature_names=[feature],
                pooling=PoolingType.SUM,
            )
        )
    return tables


def _as_vq_config(vq: VQConfig | Mapping[str, object] | None) -> VQConfig | None:
    if vq is None or isinstance(vq, VQConfig):
        return vq
    if isinstance(vq, Mapping):
        try:
            return VQConfig(**vq)  # type: ignore[arg-type]
        except TypeError as e:
            raise ValueError(f"invalid VQ options {dict(vq)}: {e}") from e
    raise TypeError(f"vq must be a VQConfig, a dict or None, got {type(vq).__name__}")


def build_dlrm(
    sparse_feature_sizes: Mapping[str, int],
    num_dense: int,
    embedding_dim: int = 32,
    vq: VQConfig | Mapping[str, object] | None = None,
    dense_arch: Sequence[int] = (64,),
    over_arch: Sequence[int] = (128, 64),
    arch: Arch = "dlrm",
    dcn_num_layers: int = 2,
    dcn_low_rank_dim: int = 16,
    device: torch.device | str | None = None,
    vq_features: Sequence[str] | None = None,
) -> DLRM:
    """Build the model.

    Args:
        sparse_feature_sizes: ``{feature: vocabulary size}``, one table per feature.
        num_dense: number of dense input features (``dense_features`` is ``(B, num_dense)``).
        embedding_dim: ``D`` of every table.
        vq: ``None`` for plain embeddings, else a ``VQConfig`` (or dict of its fields) applied
            to every table through ``VQEmbeddingBagCollection``.
        dense_arch: hidden sizes of the bottom MLP (its last layer, ``D`` or ``2D``, is added).
        over_arch: hidden sizes of the top MLP (the final 1-logit layer is added).
        arch: ``"dlrm"`` (dot interaction) or ``"dcn"`` (low-rank cross net).
        device: where parameters live (``"meta"`` for lazy DMP materialisation).
        vq_features: quantize only these features' tables (default: every table). With
            ``output="concat"`` and a strict subset, the other tables are plain ``2 * D``-wide
            tables (DLRM needs one pooled width for every key).

    Returns:
        a ``DLRM`` (or ``DLRM_DCN``) whose ``forward(dense (B, num_dense), KJT)`` gives
        logits ``(B, 1)``.
    """
    if arch not in ("dlrm", "dcn"):
        raise ValueError(f"arch must be 'dlrm' or 'dcn', got {arch!r}")
    if num_dense <= 0:
        raise ValueError(f"num_dense must be positive (DLRM needs a dense input), got {num_dense}")
    if any(int(s) <= 0 for s in list(dense_arch) + list(over_arch)):
        raise ValueError(f"layer sizes must be positive: dense_arch={dense_arch}, over_arch={over_arch}")
    vq_cfg = _as_vq_config(vq)
    if vq_features is not None:
        unknown = sorted(set(vq_features) - set(sparse_feature_sizes))
        if unknown:
            raise ValueError(f"vq_features {unknown} are not sparse features ({sorted(sparse_feature_sizes)})")
        if not vq_features:
            raise ValueError("vq_features is empty: pass None to quantize every table, or vq=None")
    device = torch.device(device) if device is not None else torch.device("cpu")
    tables = build_tables(sparse_feature_sizes, embedding_dim)

    out_dim = embedding_dim * (2 if vq_cfg is not None and vq_cfg.output == "concat" else 1)
    if vq_cfg is not None and vq_features is not None and out_dim != embedding_dim:
        # DLRM needs one pooled width for every key: with output="concat" on a subset, the
        # unquantized tables store 2 * D-wide rows so that every key is 2 * D wide.
        quantized = {table_name(f) for f in vq_features}
        tables = [t if t.name in quantized else dataclasses.replace(t, embedding_dim=out_dim)
                  for t in tables]
    # DLRM sizes its arches from the collection's configs; build it over a placeholder of the
    # pooled output width, then put the real collection in.
    placeholder = EmbeddingBagCollection(
        tables=build_tables(sparse_feature_sizes, out_dim), device=torch.device("meta")
    )
    kwargs = dict(
        embedding_bag_collection=placeholder,
        dense_in_features=num_dense,
        dense_arch_layer_sizes=[int(s) for s in dense_arch] + [out_dim],
        over_arch_layer_sizes=[int(s) for s in over_arch] + [1],
        dense_device=device,
    )
    if arch == "dcn":
        model: DLRM = DLRM_DCN(
            dcn_num_layers=dcn_num_layers, dcn_low_rank_dim=dcn_low_rank_dim, **kwargs
        )
    else:
        model = DLRM(**kwargs)

    collection: nn.Module
    if vq_cfg is None:
        collection = EmbeddingBagCollection(tables=tables, device=device)
    else:
        try:
            from vq_torchrec.modules import VQEmbeddingBagCollection
        except ImportError as e:  # pragma: no cover - depends on the modules package
            raise ImportError(
                "vq_torchrec.modules.VQEmbeddingBagCollection is not available; use vq=None"
            ) from e
        per_table: VQConfig | dict[str, VQConfig] = vq_cfg
        if vq_features is not None:
            per_table = {table_name(f): vq_cfg for f in vq_features}
        collection = VQEmbeddingBagCollection(tables=tables, vq=per_table, device=device)
    model.sparse_arch.embedding_bag_collection = collection  # type: ignore[assignment]
    return model
