"""random_split, temporal_leave_last_out and binarize."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vq_torchrec.datasets import binarize, random_split, temporal_leave_last_out


def _ratings(n_users: int = 50, per_user: int = 12, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, n_users + 1):
        n = int(rng.integers(1, per_user + 1))
        items = rng.choice(500, size=n, replace=False)
        times = rng.integers(0, 50, size=n)  # ties on purpose
        rows += [(user, int(i), float(rng.integers(1, 6)), int(t)) for i, t in zip(items, times)]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def test_random_split_sizes_disjoint_and_deterministic() -> None:
    ratings = _ratings()
    train, val, test = random_split(ratings, seed=7)
    n = len(ratings)
    assert (len(train), len(val)) == (int(0.8 * n), int(0.1 * n))
    assert len(train) + len(val) + len(test) == n
    parts = [set(p.index) for p in (train, val, test)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert set().union(*parts) == set(ratings.index)
    again = random_split(ratings, seed=7)
    for a, b in zip((train, val, test), again):
        pd.testing.assert_frame_equal(a, b)
    other = random_split(ratings, seed=8)
    assert set(other[2].index) != set(test.index)
    pd.testing.assert_frame_equal(train, ratings.loc[train.index])  # rows unchanged, file order
    assert train.index.is_monotonic_increasing


def test_random_split_bad_ratios() -> None:
    with pytest.raises(ValueError, match="summing to 1"):
        random_split(_ratings(), ratios=(0.8, 0.3, 0.1))


def test_temporal_leave_last_out() -> None:
    ratings = _ratings(seed=1)
    train, val, test = temporal_leave_last_out(ratings)
    assert len(train) + len(val) + len(test) == len(ratings)
    assert not set(train.index) & set(test.index) and not set(val.index) & set(test.index)
    counts = ratings.groupby("user_id").size()
    assert set(test["user_id"]) == set(counts[counts >= 2].index)
    assert set(val["user_id"]) == set(counts[counts >= 3].index)
    assert test["user_id"].is_unique and val["user_id"].is_unique
    # reference: stable sort by (user, timestamp) keeps file order among ties
    ordered = ratings.sort_values(["user_id", "timestamp"], kind="stable")
    expected_test = ordered.groupby("user_id").tail(1)
    expected_test = expected_test[expected_test["user_id"].map(counts) >= 2]
    assert set(test.index) == set(expected_test.index)
    for user, group in train.groupby("user_id"):
        if user in set(test["user_id"]):
            assert (
                group["timestamp"].max() <= test.loc[test["user_id"] == user, "timestamp"].iloc[0]
            )


def test_temporal_split_refuses_without_timestamps() -> None:
    with pytest.raises(ValueError, match="needs a 'timestamp' column.*random_split"):
        temporal_leave_last_out(_ratings().drop(columns="timestamp"))


def test_binarize() -> None:
    ratings = pd.DataFrame(
        {
            "user_id": [1, 1, 2, 2, 3],
            "item_id": [1, 2, 3, 4, 5],
            "rating": [1.0, 3.0, 4.0, 5.0, 3.5],
        }
    )
    out = binarize(ratings)
    assert out["label"].tolist() == [0.0, 0.0, 1.0, 1.0, 0.0] and out["label"].dtype == np.float32
    assert "label" not in ratings.columns  # input untouched
    dropped = binarize(ratings, drop_neutral=True)
    assert dropped["rating"].tolist() == [1.0, 4.0, 5.0, 3.5]
    assert dropped["label"].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert binarize(ratings, threshold=3.5)["label"].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="'rating' column"):
        binarize(ratings.drop(columns="rating"))
