"""Train/validation/test splits of a ratings DataFrame (the item cold-start split lives in
:mod:`vq_torchrec.coldstart`).

Every split returns DataFrames that keep the input's index (so the parts are disjoint by index
and their union is the input) and the input's row order within each part.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def random_split(
    ratings: pd.DataFrame, ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Seeded random split of rows into (train, val, test), RecBole's ``RS`` with ``group_by=None``.

    Sizes: ``floor(r_train * n)``, ``floor(r_val * n)``, the rest to test. The same
    ``(ratings, ratios, seed)`` always gives the same parts (numpy ``default_rng(seed)``).

    Raises:
        ValueError: ratios not three non-negative numbers summing to 1.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or not np.isclose(sum(ratios), 1.0):
        raise ValueError(f"ratios must be three non-negative numbers summing to 1, got {ratios}")
    n = len(ratings)
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(np.floor(ratios[0] * n))
    n_val = int(np.floor(ratios[1] * n))
    parts = (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])
    return tuple(ratings.iloc[np.sort(p)] for p in parts)  # type: ignore[return-value]


def temporal_leave_last_out(
    ratings: pd.DataFrame,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per user: last rating (by ``timestamp``) to test, second-to-last to val, the rest to train.

    Ties in ``timestamp`` keep file order (stable sort). Users with two ratings give one to
    train and one to test; users with one rating keep it in train.

    Raises:
        ValueError: ``ratings`` has no ``timestamp`` column (e.g. ``ml-1m-notime``): a temporal
            split needs timestamps; use :func:`random_split` instead.
    """
    if "timestamp" not in ratings.columns:
        raise ValueError(
            "temporal_leave_last_out needs a 'timestamp' column, but these ratings have none "
            "(MovieLensData.has_timestamps is False, e.g. a ratings.csv without timestamps); "
            "use random_split instead"
        )
    users = ratings["user_id"].to_numpy()
    times = ratings["timestamp"].to_numpy()
    order = np.lexsort((np.arange(len(ratings)), times, users))  # by user, time, file order
    sorted_users = users[order]
    counts = np.bincount(np.unique(sorted_users, return_inverse=True)[1])
    ends = np.cumsum(counts)
    rank_from_end = np.empty(len(order), dtype=np.int64)
    rank_from_end[order] = np.repeat(ends, counts) - 1 - np.arange(len(order))
    n_user = np.empty(len(order), dtype=np.int64)
    n_user[order] = np.repeat(counts, counts)
    test = (rank_from_end == 0) & (n_user >= 2)
    val = (rank_from_end == 1) & (n_user >= 3)
    train = ~(test | val)
    return ratings[train], ratings[val], ratings[test]
