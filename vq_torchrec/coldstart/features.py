"""Cold-start feature sets as precomputed tensors, served as TorchRec ``KeyedJaggedTensor`` batches.

Two feature sets:

* ``cvar`` -- the reference's: sparse ``user_id, gender, age, occupation, zip, item_id, year``,
  multi-hot ``title`` (word tokens) and ``genres``, plus two dense features: the item's rating
  count over the whole data set (normalised by the maximum) and the rating's timestamp
  (min-max normalised). Both dense features leak the test period (the count includes test rows).
* ``clean`` -- the same sparse features without ``count`` and ``timestamp`` (the honest default).

Everything is indexed once into tensors (users, items, rows); a batch is a gather plus one
``KeyedJaggedTensor`` construction, so a training epoch costs no pandas work.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from vq_torchrec.coldstart.protocol import ColdStartSplit

FEATURE_SETS = ("cvar", "clean")
USER_KEYS = ("user_id", "gender", "age", "occupation", "zip")
ITEM_KEYS = ("item_id", "year", "title", "genres")
SPARSE_KEYS = USER_KEYS + ITEM_KEYS
ITEM_SIDE_KEYS = ("year", "title", "genres")
DENSE_KEYS = {"cvar": ("count", "timestamp"), "clean": ()}

_TITLE_YEAR = re.compile(r"\(\d{4}\)\s*$")
_TOKEN = re.compile(r"[a-z0-9]+")


def title_tokens(title: str) -> list[str]:
    """Lower-cased word tokens of a movie title, without the trailing ``(year)``."""
    return _TOKEN.findall(_TITLE_YEAR.sub("", str(title)).lower())


@dataclass
class RowBlock:
    """One set of rows as tensors. ``user``/``item``: ``(R,)`` long indices into the user/item
    tables; ``timestamp``: ``(R,)`` float in [0, 1]; ``label``: ``(R,)`` float 0/1;
    ``rank``: ``(R,)`` long position of the row in its item's time order."""

    user: torch.Tensor
    item: torch.Tensor
    timestamp: torch.Tensor
    label: torch.Tensor
    rank: torch.Tensor

    def __len__(self) -> int:
        return int(self.label.numel())

    def subset(self, idx: torch.Tensor) -> RowBlock:
        return RowBlock(self.user[idx], self.item[idx], self.timestamp[idx], self.label[idx],
                        self.rank[idx])


def _codes(values: pd.Series) -> tuple[np.ndarray, int]:
    """Dense integer codes starting at 0 and the vocabulary size."""
    codes, uniques = pd.factorize(values.astype(str), sort=True)
    return codes.astype(np.int64), max(len(uniques), 1)


def _pad(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max((len(x) for x in lists), default=1))
    out = torch.zeros(len(lists), width, dtype=torch.long)
    lengths = torch.zeros(len(lists), dtype=torch.long)
    for i, x in enumerate(lists):
        out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        lengths[i] = len(x)
    return out, lengths


class ColdStartFeatures:
    """Indexes users, items and the rows of a :class:`ColdStartSplit` for one feature set.

    Args:
        split: the protocol split.
        users: frame with ``user_id, gender, age, occupation, zip``.
        items: frame with ``item_id, title, year, genres`` (``genres``: list of strings).
        feature_set: ``"cvar"`` or ``"clean"``.
        all_ratings: the full ratings frame (``item_id, timestamp``), for the ``cvar`` count and
            timestamp normalisation; defaults to the union of the split's frames.

    Attributes:
        table_sizes: ``{key: num_embeddings}`` for every sparse key.
        dense_keys: names of the dense columns served by :meth:`batch`.
        item_index: ``{raw item id: row}`` and ``user_index`` likewise.
    """

    def __init__(
        self,
        split: ColdStartSplit,
        users: pd.DataFrame,
        items: pd.DataFrame,
        feature_set: str = "clean",
        all_ratings: pd.DataFrame | None = None,
    ) -> None:
        if feature_set not in FEATURE_SETS:
            raise ValueError(f"unknown feature_set {feature_set!r}; expected one of {FEATURE_SETS}")
        for name, frame, cols in (
            ("users", users, USER_KEYS),
            ("items", items, ("item_id", "title", "year", "genres")),
        ):
            missing = [c for c in cols if c not in frame.columns]
            if missing:
                raise ValueError(f"{name} frame lacks column(s) {missing}; it has {list(frame.columns)}")
        self.feature_set = feature_set
        self.k = split.k
        self.num_protocol_phases = len(split.phases)
        self.dense_keys: tuple[str, ...] = DENSE_KEYS[feature_set]
        frames = [split.train_base, *[f for _, f in split.phases], split.test]
        if all_ratings is None:
            all_ratings = pd.concat([f[["user_id", "item_id", "timestamp"]] for f in frames])

        # Users: every user of the side table (so that unseen users still have a row).
        users = users.drop_duplicates("user_id").sort_values("user_id").reset_index(drop=True)
        self.user_index = {int(u): i for i, u in enumerate(users["user_id"].tolist())}
        user_cols = {"user_id": np.arange(len(users), dtype=np.int64)}
        self.table_sizes: dict[str, int] = {"user_id": len(users)}
        for key in USER_KEYS[1:]:
            user_cols[key], self.table_sizes[key] = _codes(users[key])
        self.user_feats = {k: torch.from_numpy(v) for k, v in user_cols.items()}

        # Items: every item of the side table.
        items = items.drop_duplicates("item_id").sort_values("item_id").reset_index(drop=True)
        self.item_index = {int(m): i for i, m in enumerate(items["item_id"].tolist())}
        self.table_sizes["item_id"] = len(items)
        year, self.table_sizes["year"] = _codes(items["year"].fillna(-1).astype(int))
        tokens = [title_tokens(t) for t in items["title"].tolist()]
        vocab = {w: i for i, w in enumerate(sorted({w for ts in tokens for w in ts}))}
        self.table_sizes["title"] = max(len(vocab), 1)
        genre_lists = [list(g) if isinstance(g, (list, tuple, np.ndarray)) else [] for g in items["genres"]]
        gvocab = {g: i for i, g in enumerate(sorted({g for gs in genre_lists for g in gs}))}
        self.table_sizes["genres"] = max(len(gvocab), 1)
        self.item_year = torch.from_numpy(year)
        # Dense content vector per item: genre multi-hot and the standardised release year.
        raw_year = pd.to_numeric(items["year"], errors="coerce").to_numpy(dtype=np.float64)
        known = np.isfinite(raw_year)
        y_mean = raw_year[known].mean() if known.any() else 0.0
        y_std = raw_year[known].std() if known.sum() > 1 else 1.0
        year_z = np.where(known, (raw_year - y_mean) / max(y_std, 1e-6), 0.0)
        multi_hot = np.zeros((len(items), len(gvocab)), dtype=np.float32)
        for i, gs in enumerate(genre_lists):
            for g in gs:
                multi_hot[i, gvocab[g]] = 1.0
        self.item_content = torch.from_numpy(
            np.concatenate([multi_hot, year_z[:, None], (~known)[:, None]], axis=1).astype(np.float32)
        )
        self.title_pad, self.title_len = _pad([[vocab[w] for w in ts] for ts in tokens])
        self.genre_pad, self.genre_len = _pad([[gvocab[g] for g in gs] for gs in genre_lists])
        counts = all_ratings.groupby("item_id").size()
        count = np.array([counts.get(m, 0) for m in items["item_id"].tolist()], dtype=np.float32)
        self.item_count = torch.from_numpy(count / max(count.max(), 1.0))
        self._t_min = float(all_ratings["timestamp"].min())
        self._t_span = max(float(all_ratings["timestamp"].max()) - self._t_min, 1.0)

        self.old_items = self.items_to_index(split.old_items)
        self.new_items = self.items_to_index(split.new_items)
        self.train_base = self.rows(split.train_base)
        self.phases = [(name, self.rows(frame)) for name, frame in split.phases]
        self.test = self.rows(split.test)

    def validation_view(self) -> ColdStartFeatures:
        """The same features with the last phase held out as the evaluation set (see
        :meth:`ColdStartSplit.validation`): for model selection without the test rows."""
        if len(self.phases) < 2:
            raise ValueError(f"validation_view() needs >= 2 phases, got {[n for n, _ in self.phases]}")
        view = copy.copy(self)
        view.phases = self.phases[:-1]
        view.test = self.phases[-1][1]
        return view

    # ------------------------------------------------------------------ indexing
    def items_to_index(self, item_ids: np.ndarray) -> torch.Tensor:
        """Raw item ids -> ``(n,)`` long row indices of the item tables."""
        try:
            return torch.tensor([self.item_index[int(m)] for m in item_ids], dtype=torch.long)
        except KeyError as err:
            raise ValueError(f"item id {err.args[0]} is not in the items side table") from None

    def rows(self, frame: pd.DataFrame) -> RowBlock:
        try:
            user = [self.user_index[int(u)] for u in frame["user_id"].tolist()]
        except KeyError as err:
            raise ValueError(f"user id {err.args[0]} is not in the users side table") from None
        item = self.items_to_index(frame["item_id"].to_numpy())
        ts = (frame["timestamp"].to_numpy(dtype=np.float64) - self._t_min) / self._t_span
        return RowBlock(
            user=torch.tensor(user, dtype=torch.long),
            item=item,
            timestamp=torch.from_numpy(ts.astype(np.float32)),
            label=torch.from_numpy(frame["label"].to_numpy(dtype=np.float32)),
            rank=torch.from_numpy(frame["rank"].to_numpy(dtype=np.int64).copy()),
        )

    # ------------------------------------------------------------------ batches
    def kjt(self, user: torch.Tensor, item: torch.Tensor) -> KeyedJaggedTensor:
        """``KeyedJaggedTensor`` over :data:`SPARSE_KEYS` for ``B`` (user, item) index pairs."""
        b = user.numel()
        ones = torch.ones(b, dtype=torch.long)
        t_len, g_len = self.title_len[item], self.genre_len[item]
        t_pad, g_pad = self.title_pad[item], self.genre_pad[item]
        t_mask = torch.arange(t_pad.shape[1]).unsqueeze(0) < t_len.unsqueeze(1)
        g_mask = torch.arange(g_pad.shape[1]).unsqueeze(0) < g_len.unsqueeze(1)
        values = [self.user_feats[k][user] for k in USER_KEYS]
        values += [item, self.item_year[item], t_pad[t_mask], g_pad[g_mask]]
        lengths = [ones] * (len(USER_KEYS) + 2) + [t_len, g_len]
        return KeyedJaggedTensor(
            keys=list(SPARSE_KEYS), values=torch.cat(values), lengths=torch.cat(lengths)
        )

    def dense(self, item: torch.Tensor, timestamp: torch.Tensor) -> torch.Tensor:
        """``(B, len(dense_keys))`` float dense features."""
        if not self.dense_keys:
            return torch.zeros(item.numel(), 0)
        return torch.stack([self.item_count[item], timestamp], dim=1)

    def batch(self, rows: RowBlock) -> tuple[KeyedJaggedTensor, torch.Tensor, torch.Tensor]:
        """``(kjt, dense (B, D), label (B,))`` for a block of rows."""
        return self.kjt(rows.user, rows.item), self.dense(rows.item, rows.timestamp), rows.label

    def item_kjt(self, item: torch.Tensor) -> KeyedJaggedTensor:
        """A batch of items paired with user row 0 (for reading item-side embeddings)."""
        return self.kjt(torch.zeros_like(item), item)

    def iter_batches(
        self, rows: RowBlock, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
    ):
        """Yields :class:`RowBlock` batches (shuffled with ``generator`` when ``shuffle``)."""
        n = len(rows)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            yield rows.subset(order[start : start + batch_size])
