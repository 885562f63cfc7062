"""DLRM features for MovieLens: frozen vocabularies, sparse (jagged) and dense features.

A :class:`FeatureEncoder` is fitted once (training ratings + the users/items catalogue) and then
frozen: every vocabulary maps a raw value to ``1 .. size-1`` and anything unseen to ``0`` (the
reserved OOV row), so transforming a new split, new users or new items never changes an
existing index or a table size.

Sparse features (key order = :attr:`FeatureEncoder.sparse_feature_names`):

* ``user_id``, ``item_id`` -- from the training ratings (``id_source="train"``, default: ids only
  in val/test or new items map to 0) or also from the catalogue tables (``"catalogue"``).
* user side (when the release has users): ``gender``, ``age``, ``occupation``, ``zip`` (whole
  code) and ``zip_prefix`` (first 3 characters).
* item side (when the release has items): ``genres`` (multi-valued), ``year`` and
  ``title_tokens`` (multi-valued, lowercased word tokens of the title without its year; the
  ``max_title_tokens`` most frequent across the catalogue).

Dense features: ``year`` and ``age`` standardised with the catalogue's mean/std (0 when
unknown), ``bias`` (constant 1) when neither exists, so there is always >= 1 dense feature.
No statistic is computed from ratings or labels.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

OOV_INDEX = 0
USER_SIDE_FEATURES = ("gender", "age", "occupation", "zip", "zip_prefix")
ITEM_SINGLE_FEATURES = ("year",)
ITEM_MULTI_FEATURES = ("genres", "title_tokens")
_TOKEN = re.compile(r"\w+", re.UNICODE)
_YEAR_SUFFIX = re.compile(r"\s*\(\d{4}[^()]*\)\s*$")


class Vocabulary:
    """Frozen value -> index map; index 0 is reserved for unknown values.

    ``len(vocab)`` is the number of embedding rows (known values + 1).
    """

    def __init__(self, values: Iterable[object]) -> None:
        self._values: tuple[object, ...] = tuple(values)
        self._index = pd.Index(self._values)
        if not self._index.is_unique:
            raise ValueError("vocabulary values must be unique")

    def __len__(self) -> int:
        return len(self._values) + 1

    @property
    def values(self) -> tuple[object, ...]:
        """Known values; ``values[i]`` has index ``i + 1``."""
        return self._values

    def lookup(self, values: Sequence[object] | np.ndarray | pd.Series) -> np.ndarray:
        """Indices (int64) of ``values``; unknown or missing values give 0."""
        if len(values) == 0:
            return np.zeros(0, dtype=np.int64)
        return (self._index.get_indexer(pd.Index(values)) + 1).astype(np.int64)


def _sorted_unique(values: Iterable[object]) -> list[object]:
    series = pd.Series(list(values) if not isinstance(values, pd.Series) else values).dropna()
    unique = pd.unique(series)
    try:
        return sorted(unique.tolist())
    except TypeError:
        return sorted(unique.tolist(), key=str)


def title_tokens(title: str) -> list[str]:
    """Distinct lowercased word tokens of a title without its trailing ``(year)``, in order."""
    text = _YEAR_SUFFIX.sub("", str(title)).lower()
    return list(dict.fromkeys(_TOKEN.findall(text)))


@dataclass
class JaggedColumn:
    """A multi-valued feature stored once per entity (user or item).

    Attributes:
        row_keys: ``(N,)`` int64, the entity row of every rating (0 = unknown entity).
        offsets: ``(E + 1,)`` int64 CSR offsets over entity rows.
        values: ``(V,)`` int64 feature indices.
    """

    row_keys: torch.Tensor
    offsets: torch.Tensor
    values: torch.Tensor

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(lengths (B,), values (sum(lengths),))`` of ratings ``rows``, vectorised (numpy)."""
        offsets = self.offsets.numpy()
        entities = self.row_keys.numpy()[rows]
        starts = offsets[entities]
        lengths = offsets[entities + 1] - starts
        total = int(lengths.sum())
        if total == 0:
            return lengths, np.zeros(0, dtype=np.int64)
        batch_starts = np.cumsum(lengths) - lengths
        positions = np.arange(total, dtype=np.int64) + np.repeat(starts - batch_starts, lengths)
        return lengths, self.values.numpy()[positions]


@dataclass
class EncodedRatings:
    """Ratings turned into model inputs.

    Attributes:
        keys: sparse feature names in KJT key order.
        single: ``{key: (N,) int64}`` for single-valued features.
        multi: ``{key: JaggedColumn}`` for multi-valued features.
        dense: ``(N, n_dense)`` float32.
        labels: ``(N,)`` float32.
        dense_names: names of the dense columns.
    """

    keys: list[str]
    single: dict[str, torch.Tensor]
    multi: dict[str, JaggedColumn]
    dense: torch.Tensor
    labels: torch.Tensor
    dense_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def sparse(self, rows: torch.Tensor | np.ndarray) -> KeyedJaggedTensor:
        """KJT of ratings ``rows`` (``(B,)`` int64): keys ``self.keys``, stride ``B``.

        Gathers run in numpy (single-threaded: no intra-op thread contention for these small
        ops) and become tensors once.
        """
        rows = rows.numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        lengths, values = [], []
        ones = np.ones(rows.shape[0], dtype=np.int32)
        for key in self.keys:
            if key in self.single:
                lengths.append(ones)
                values.append(self.single[key].numpy()[rows])
            else:
                lens, vals = self.multi[key].gather(rows)
                lengths.append(lens.astype(np.int32))
                values.append(vals)
        return KeyedJaggedTensor(
            keys=list(self.keys),
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
        )

    def rows(
        self, rows: torch.Tensor | np.ndarray
    ) -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
        """``(dense (B, n_dense), sparse KJT, labels (B,))`` of ratings ``rows``."""
        index = rows.numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        dense = torch.from_numpy(self.dense.numpy()[index])
        labels = torch.from_numpy(self.labels.numpy()[index])
        return dense, self.sparse(index), labels


@dataclass
class _EntityTables:
    """Per-entity (user or item) encoded side features; row 0 is the unknown entity."""

    index: pd.Index
    single: dict[str, np.ndarray] = field(default_factory=dict)  # (E + 1,)
    multi: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # offsets, values
    dense: dict[str, np.ndarray] = field(default_factory=dict)  # (E + 1,) float32

    def rows(self, raw_ids: np.ndarray) -> np.ndarray:
        return (self.index.get_indexer(raw_ids) + 1).astype(np.int64)


class FeatureEncoder:
    """Fit once on (training ratings, users, items); then :meth:`transform` any ratings.

    Args:
        id_source: ``"train"``: ``user_id``/``item_id`` vocabularies hold the ids of the
            training ratings only; ``"catalogue"``: also every id of the users/items tables.
        max_title_tokens: cap of the title-token vocabulary (most frequent first, ties by token).
        zip_prefix_len: characters of the zip code kept in ``zip_prefix``.
    """

    def __init__(
        self,
        id_source: Literal["train", "catalogue"] = "train",
        max_title_tokens: int = 5000,
        zip_prefix_len: int = 3,
    ) -> None:
        if id_source not in ("train", "catalogue"):
            raise ValueError(f"id_source must be 'train' or 'catalogue', got {id_source!r}")
        self.id_source = id_source
        self.max_title_tokens = max_title_tokens
        self.zip_prefix_len = zip_prefix_len
        self.vocabularies: dict[str, Vocabulary] = {}
        self.dense_stats: dict[str, tuple[float, float]] = {}
        self._users: _EntityTables | None = None
        self._items: _EntityTables | None = None
        self._fitted = False

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        ratings: pd.DataFrame,
        users: pd.DataFrame | None = None,
        items: pd.DataFrame | None = None,
    ) -> FeatureEncoder:
        """Build and freeze every vocabulary. ``ratings`` must be the *training* ratings."""
        if self._fitted:
            raise RuntimeError("FeatureEncoder is already fitted; its vocabularies are frozen")
        for column in ("user_id", "item_id"):
            if column not in ratings.columns:
                raise ValueError(f"ratings need a {column!r} column; got {list(ratings.columns)}")
        user_ids = ratings["user_id"].to_numpy()
        item_ids = ratings["item_id"].to_numpy()
        if self.id_source == "catalogue":
            if users is not None:
                user_ids = np.concatenate([user_ids, users["user_id"].to_numpy()])
            if items is not None:
                item_ids = np.concatenate([item_ids, items["item_id"].to_numpy()])
        self.vocabularies["user_id"] = Vocabulary(_sorted_unique(np.unique(user_ids)))
        self.vocabularies["item_id"] = Vocabulary(_sorted_unique(np.unique(item_ids)))
        if users is not None:
            users = self._user_columns(users)
            for name in USER_SIDE_FEATURES:
                self.vocabularies[name] = Vocabulary(_sorted_unique(users[name]))
            self.dense_stats["age"] = _mean_std(users["age"])
            self._users = self._user_tables(users)
        if items is not None:
            items = self._item_columns(items)
            self.vocabularies["genres"] = Vocabulary(
                _sorted_unique(g for genres in items["genres"] for g in genres)
            )
            self.vocabularies["year"] = Vocabulary(_sorted_unique(items["year"]))
            counts = Counter(t for tokens in items["title_tokens"] for t in tokens)
            top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: self.max_title_tokens]
            self.vocabularies["title_tokens"] = Vocabulary(sorted(t for t, _ in top))
            self.dense_stats["year"] = _mean_std(items["year"])
            self._items = self._item_tables(items)
        self._fitted = True
        return self

    def _user_columns(self, users: pd.DataFrame) -> pd.DataFrame:
        missing = [c for c in ("user_id", "gender", "age", "occupation", "zip") if c not in users]
        if missing:
            raise ValueError(f"users table lacks columns {missing}")
        if not users["user_id"].is_unique:
            raise ValueError("users table has duplicated user_id values")
        users = users.copy()
        users["zip_prefix"] = users["zip"].astype(str).str[: self.zip_prefix_len]
        return users

    def _item_columns(self, items: pd.DataFrame) -> pd.DataFrame:
        missing = [c for c in ("item_id", "title", "year", "genres") if c not in items]
        if missing:
            raise ValueError(f"items table lacks columns {missing}")
        if not items["item_id"].is_unique:
            raise ValueError("items table has duplicated item_id values")
        items = items.copy()
        items["title_tokens"] = [title_tokens(t) for t in items["title"]]
        return items

    def _user_tables(self, users: pd.DataFrame) -> _EntityTables:
        tables = _EntityTables(index=pd.Index(users["user_id"].to_numpy()))
        for name in USER_SIDE_FEATURES:
            tables.single[name] = _with_unknown(self.vocabularies[name].lookup(users[name]))
        tables.dense["age"] = _with_unknown(_standardise(users["age"], self.dense_stats["age"]))
        return tables

    def _item_tables(self, items: pd.DataFrame) -> _EntityTables:
        tables = _EntityTables(index=pd.Index(items["item_id"].to_numpy()))
        tables.single["year"] = _with_unknown(self.vocabularies["year"].lookup(items["year"]))
        for name in ITEM_MULTI_FEATURES:
            lists = items[name].tolist()
            lengths = np.fromiter((len(v) for v in lists), dtype=np.int64, count=len(lists))
            flat = [v for values in lists for v in values]
            codes = self.vocabularies[name].lookup(flat) if flat else np.zeros(0, dtype=np.int64)
            keep = codes != OOV_INDEX  # capped title tokens: drop unknown tokens
            if not keep.all():
                owner = np.repeat(np.arange(len(lists)), lengths)
                lengths = np.bincount(owner[keep], minlength=len(lists)).astype(np.int64)
                codes = codes[keep]
            offsets = np.concatenate([[0, 0], np.cumsum(lengths)]).astype(np.int64)
            tables.multi[name] = (offsets, codes)
        tables.dense["year"] = _with_unknown(_standardise(items["year"], self.dense_stats["year"]))
        return tables

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, object]:
        """JSON-serialisable state: options, every vocabulary and the dense statistics.

        Store it with a checkpoint so a resumed or serving process uses exactly the same
        indices even if the data files changed; rebuild with :meth:`from_state_dict`.
        """
        self._check_fitted()
        return {
            "id_source": self.id_source,
            "max_title_tokens": self.max_title_tokens,
            "zip_prefix_len": self.zip_prefix_len,
            "has_users": self._users is not None,
            "has_items": self._items is not None,
            "vocabularies": {k: list(v.values) for k, v in self.vocabularies.items()},
            "dense_stats": {k: list(v) for k, v in self.dense_stats.items()},
        }

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, object],
        users: pd.DataFrame | None = None,
        items: pd.DataFrame | None = None,
    ) -> FeatureEncoder:
        """A fitted, frozen encoder with the vocabularies of ``state``.

        ``users``/``items`` supply the side features (looked up through the stored
        vocabularies); they are required when the saved encoder had them.
        """
        encoder = cls(
            id_source=state["id_source"],  # type: ignore[arg-type]
            max_title_tokens=int(state["max_title_tokens"]),  # type: ignore[arg-type]
            zip_prefix_len=int(state["zip_prefix_len"]),  # type: ignore[arg-type]
        )
        for flag, table, what in (("has_users", users, "users"), ("has_items", items, "items")):
            if state[flag] and table is None:
                raise ValueError(f"this encoder was fitted with a {what} table: pass {what}=")
        vocabularies = state["vocabularies"]
        assert isinstance(vocabularies, dict)
        encoder.vocabularies = {k: Vocabulary(v) for k, v in vocabularies.items()}
        stats = state["dense_stats"]
        assert isinstance(stats, dict)
        encoder.dense_stats = {k: (float(v[0]), float(v[1])) for k, v in stats.items()}
        if state["has_users"]:
            encoder._users = encoder._user_tables(encoder._user_columns(users))  # type: ignore[arg-type]
        if state["has_items"]:
            encoder._items = encoder._item_tables(encoder._item_columns(items))  # type: ignore[arg-type]
        encoder._fitted = True
        return encoder

    # ------------------------------------------------------------------ properties

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError(
                "FeatureEncoder is not fitted; call fit(train_ratings, users, items)"
            )

    @property
    def sparse_feature_names(self) -> list[str]:
        """Sparse keys in KJT order."""
        self._check_fitted()
        names = ["user_id", "item_id"]
        if self._users is not None:
            names += list(USER_SIDE_FEATURES)
        if self._items is not None:
            names += ["genres", "year", "title_tokens"]
        return names

    @property
    def sparse_feature_sizes(self) -> dict[str, int]:
        """``{key: num_embeddings}`` (known values + the OOV row 0)."""
        return {name: len(self.vocabularies[name]) for name in self.sparse_feature_names}

    @property
    def multi_valued_features(self) -> list[str]:
        """Keys that can hold several values per rating."""
        return [n for n in self.sparse_feature_names if n in ITEM_MULTI_FEATURES]

    @property
    def dense_feature_names(self) -> list[str]:
        """Dense columns (at least one)."""
        self._check_fitted()
        names = []
        if self._items is not None:
            names.append("year")
        if self._users is not None:
            names.append("age")
        return names or ["bias"]

    # ------------------------------------------------------------------ transform

    def transform(
        self,
        ratings: pd.DataFrame,
        users: pd.DataFrame | None = None,
        items: pd.DataFrame | None = None,
        label_column: str = "label",
    ) -> EncodedRatings:
        """Encode ratings (with a ``label`` column, see :func:`binarize`).

        Args:
            ratings: ``user_id``, ``item_id`` and ``label_column``.
            users, items: side tables to look side features up in (default: the ones given to
                :meth:`fit`); pass a newer catalogue to give new items their side features.
                Their values go through the frozen vocabularies: nothing is re-indexed.

        Returns:
            :class:`EncodedRatings` with ``N = len(ratings)`` rows in ``ratings`` order.
        """
        self._check_fitted()
        if label_column not in ratings.columns:
            raise ValueError(
                f"ratings need a {label_column!r} column (see vq_torchrec.datasets.binarize); "
                f"got {list(ratings.columns)}"
            )
        user_ids = ratings["user_id"].to_numpy()
        item_ids = ratings["item_id"].to_numpy()
        single = {
            "user_id": self.vocabularies["user_id"].lookup(user_ids),
            "item_id": self.vocabularies["item_id"].lookup(item_ids),
        }
        multi: dict[str, JaggedColumn] = {}
        dense: dict[str, np.ndarray] = {}
        user_tables = self._users
        if user_tables is not None and users is not None:
            user_tables = self._user_tables(self._user_columns(users))
        item_tables = self._items
        if item_tables is not None and items is not None:
            item_tables = self._item_tables(self._item_columns(items))
        for tables, raw in ((user_tables, user_ids), (item_tables, item_ids)):
            if tables is None:
                continue
            rows = tables.rows(raw)
            for name, codes in tables.single.items():
                single[name] = codes[rows]
            for name, (offsets, values) in tables.multi.items():
                multi[name] = JaggedColumn(
                    row_keys=torch.from_numpy(rows),
                    offsets=torch.from_numpy(offsets),
                    values=torch.from_numpy(values),
                )
            for name, column in tables.dense.items():
                dense[name] = column[rows]
        names = self.dense_feature_names
        if names == ["bias"]:
            dense_matrix = np.ones((len(ratings), 1), dtype=np.float32)
        else:
            dense_matrix = np.stack([dense[n] for n in names], axis=1).astype(np.float32)
        return EncodedRatings(
            keys=self.sparse_feature_names,
            single={k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in single.items()},
            multi=multi,
            dense=torch.from_numpy(dense_matrix),
            labels=torch.from_numpy(np.array(ratings[label_column].to_numpy(dtype=np.float32))),
            dense_names=names,
        )


def _mean_std(values: pd.Series) -> tuple[float, float]:
    numeric = pd.to_numeric(values, errors="coerce").astype("float64").dropna()
    if numeric.empty:
        return 0.0, 1.0
    std = float(numeric.std(ddof=0))
    return float(numeric.mean()), std if std > 0 else 1.0


def _standardise(values: pd.Series, stats: tuple[float, float]) -> np.ndarray:
    mean, std = stats
    numeric = pd.to_numeric(values, errors="coerce").astype("float64").to_numpy(na_value=np.nan)
    out = (numeric - mean) / std
    return np.nan_to_num(out, nan=0.0).astype(np.float32)


def _with_unknown(values: np.ndarray) -> np.ndarray:
    """Prepend row 0 (the unknown entity): code 0 / dense 0."""
    return np.concatenate([np.zeros(1, dtype=values.dtype), values])
