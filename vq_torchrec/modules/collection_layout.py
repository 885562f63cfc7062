"""Key / feature / table bookkeeping shared by the VQ collections."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TypeVar

from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.modules.embedding_modules import get_embedding_names_by_table

from vq_torchrec.modules.vq_tables import output_dim
from vq_torchrec.quantization.config import VQConfig

ConfigT = TypeVar("ConfigT", bound=BaseEmbeddingConfig)


@dataclasses.dataclass
class CollectionLayout:
    """Output keys of a TorchRec collection and what each one maps to.

    Attributes:
        keys: output keys (embedding names) in the plain collection's order; a feature used
            by several tables appears as ``"feature@table"``.
        key_features: ``{key: feature_name}``.
        key_tables: ``{key: table_name}``.
        key_dims: ``{key: embedding_dim}``.
        feature_rows: ``{feature_name: num_embeddings}`` (smallest over its tables).
        table_keys: ``{table_name: [keys]}``.
    """

    keys: list[str]
    key_features: dict[str, str]
    key_tables: dict[str, str]
    key_dims: dict[str, int]
    feature_rows: dict[str, int]
    table_keys: dict[str, list[str]]

    @classmethod
    def from_configs(cls, tables: Sequence[BaseEmbeddingConfig]) -> CollectionLayout:
        keys: list[str] = []
        key_features: dict[str, str] = {}
        key_tables: dict[str, str] = {}
        key_dims: dict[str, int] = {}
        feature_rows: dict[str, int] = {}
        table_keys: dict[str, list[str]] = {}
        for table, names in zip(tables, get_embedding_names_by_table(list(tables))):
            table_keys[table.name] = list(names)
            for feature, key in zip(table.feature_names, names):
                keys.append(key)
                key_features[key] = feature
                key_tables[key] = table.name
                key_dims[key] = table.embedding_dim
                feature_rows[feature] = min(
                    feature_rows.get(feature, table.num_embeddings), table.num_embeddings
                )
        return cls(keys, key_features, key_tables, key_dims, feature_rows, table_keys)


def output_configs(tables: Sequence[ConfigT], configs: Mapping[str, VQConfig]) -> list[ConfigT]:
    """The table configs as the collection's *consumers* see them: ``embedding_dim`` doubled
    for ``output="concat"`` tables, the same objects otherwise."""
    result: list[ConfigT] = []
    for table in tables:
        dim = output_dim(table.embedding_dim, configs.get(table.name))
        result.append(
            table if dim == table.embedding_dim else dataclasses.replace(table, embedding_dim=dim)
        )
    return result
