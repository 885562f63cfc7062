"""The CVAR item cold-start protocol (Zhao et al., SIGIR 2022) as a data split.

Ratings are binarised (``label = rating >= positive_threshold``). Items with more than ``N``
ratings are *old*: all their ratings pre-train the backbone (``train_base``). Items with
``3K..N`` ratings are *new*: sorted by time, their first ``K`` ratings form ``warm_a``, the next
``K`` ``warm_b``, the next ``K`` ``warm_c`` and the rest the ``test`` set. Items with fewer than
``3K`` ratings are dropped (as in the reference preprocessing).

Model or variant selection must not look at ``test``: :meth:`ColdStartSplit.validation` gives the
same protocol one step shorter, with ``warm_c`` as the held-out set (phases ``warm_a``,
``warm_b``), so a variant can be chosen on data that precedes the test period of every new item.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

REQUIRED_COLUMNS = ("user_id", "item_id", "rating", "timestamp")


@dataclass
class ColdStartSplit:
    """Row frames of one cold-start split (each has the columns of the ratings frame plus
    ``label`` (int 0/1) and ``rank`` (0-based position of the row in its item's time order)).

    Attributes:
        train_base: all ratings of old items (pre-training data).
        phases: ``[(name, frame), ...]`` warm-up phases in order (``warm_a``, ``warm_b``,
            ``warm_c`` for the full protocol).
        test: held-out rows of the new items (evaluated before and after every phase).
        old_items / new_items: sorted int64 arrays of item ids.
        n_threshold / k: the protocol's ``N`` and ``K``.
    """

    train_base: pd.DataFrame
    phases: list[tuple[str, pd.DataFrame]]
    test: pd.DataFrame
    old_items: np.ndarray
    new_items: np.ndarray
    n_threshold: int
    k: int
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def phase_names(self) -> list[str]:
        return [name for name, _ in self.phases]

    def phase(self, name: str) -> pd.DataFrame:
        for phase_name, frame in self.phases:
            if phase_name == name:
                return frame
        raise KeyError(f"no phase named {name!r}; phases are {self.phase_names}")

    def validation(self) -> ColdStartSplit:
        """The protocol one step shorter for model selection: phases ``warm_a``, ``warm_b``,
        held-out set ``warm_c`` (never the test rows)."""
        if len(self.phases) < 2:
            raise ValueError(
                f"validation() needs at least 2 phases to hold the last one out, got {self.phase_names}"
            )
        *phases, (_, held_out) = self.phases
        return ColdStartSplit(
            train_base=self.train_base,
            phases=list(phases),
            test=held_out,
            old_items=self.old_items,
            new_items=self.new_items,
            n_threshold=self.n_threshold,
            k=self.k,
        )

    def summary(self) -> dict[str, int]:
        out = {"train_base": len(self.train_base), "old_items": len(self.old_items),
               "new_items": len(self.new_items), "test": len(self.test)}
        out.update({name: len(frame) for name, frame in self.phases})
        return out


def _check_ratings(ratings: pd.DataFrame) -> None:
    if not isinstance(ratings, pd.DataFrame):
        raise TypeError(f"ratings must be a pandas DataFrame, got {type(ratings).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in ratings.columns]
    if missing:
        raise ValueError(f"ratings frame lacks column(s) {missing}; it has {list(ratings.columns)}")
    if ratings.duplicated(["user_id", "item_id"]).any():
        raise ValueError("ratings frame has duplicate (user_id, item_id) pairs")


def split_cold_start(
    ratings: pd.DataFrame,
    n_threshold: int = 200,
    k: int = 20,
    positive_threshold: float = 4.0,
) -> ColdStartSplit:
    """Split ``ratings`` (columns ``user_id, item_id, rating, timestamp``) by the CVAR protocol.

    Within an item, rows are ordered by ``timestamp`` with ties kept in input order (stable).
    """
    _check_ratings(ratings)
    if k <= 0 or n_threshold < 3 * k:
        raise ValueError(f"need k > 0 and n_threshold >= 3*k, got n_threshold={n_threshold}, k={k}")
    df = ratings.reset_index(drop=True).copy()
    df["label"] = (df["rating"] >= positive_threshold).astype(np.int64)
    df = df.sort_values(["item_id", "timestamp"], kind="mergesort").reset_index(drop=True)
    df["rank"] = df.groupby("item_id").cumcount().astype(np.int64)
    counts = df.groupby("item_id")["rating"].transform("size")
    old_mask = counts > n_threshold
    new_mask = (counts <= n_threshold) & (counts >= 3 * k)
    old_items = np.sort(df.loc[old_mask, "item_id"].unique()).astype(np.int64)
    new_items = np.sort(df.loc[new_mask, "item_id"].unique()).astype(np.int64)
    if len(old_items) == 0 or len(new_items) == 0:
        raise ValueError(
            f"split has {len(old_items)} old and {len(new_items)} new items "
            f"(n_threshold={n_threshold}, k={k}); both must be non-empty"
        )
    train_base = df[old_mask].sort_values("timestamp", kind="mergesort").reset_index(drop=True)
    new = df[new_mask]
    phases = []
    for i, name in enumerate(("warm_a", "warm_b", "warm_c")):
        part = new[(new["rank"] >= i * k) & (new["rank"] < (i + 1) * k)]
        phases.append((name, part.reset_index(drop=True)))
    test = new[new["rank"] >= 3 * k].reset_index(drop=True)
    return ColdStartSplit(
        train_base=train_base,
        phases=phases,
        test=test,
        old_items=old_items,
        new_items=new_items,
        n_threshold=n_threshold,
        k=k,
    )


# (N, K) per dataset, as in the reference experiments.
PROTOCOL_DEFAULTS: dict[str, tuple[int, int]] = {"ml-1m": (200, 20), "ml-100k": (100, 10)}
