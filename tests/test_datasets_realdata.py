"""Real MovieLens files under $MOVIELENS_ROOT (skipped only when the variable is unset)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vq_torchrec.datasets import (
    FeatureEncoder,
    MovieLensBatches,
    binarize,
    load_movielens,
    random_split,
    temporal_leave_last_out,
)

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.slow,
    pytest.mark.skipif("MOVIELENS_ROOT" not in os.environ, reason="MOVIELENS_ROOT is not set"),
]


def _root(name: str) -> Path:
    return Path(os.environ["MOVIELENS_ROOT"]) / name


def _counts(ratings) -> dict[int, int]:
    values, counts = np.unique(ratings["rating"].to_numpy(), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def test_ml100k() -> None:
    data = load_movielens("ml-100k", root=_root("ml-100k"))
    assert len(data.ratings) == 100_000 and data.has_timestamps
    assert data.ratings["user_id"].nunique() == 943 and data.ratings["item_id"].nunique() == 1682
    assert len(data.users) == 943 and len(data.items) == 1682
    assert _counts(data.ratings) == {1: 6110, 2: 11370, 3: 27145, 4: 34174, 5: 21201}
    titles = data.items["title"]
    assert (~titles.map(str.isascii)).sum() == 9  # the 9 latin-1 lines of u.item
    assert data.items.set_index("item_id").loc[1, "genres"] == ["Animation", "Children's", "Comedy"]
    assert data.items["year"].isna().sum() == 1  # item 267 "unknown"


def test_ml1m_u2999_with_timestamps() -> None:
    data = load_movielens("ml-1m", root=_root("ml-1m-u2999"))
    assert len(data.ratings) == 487_650 and data.has_timestamps
    assert data.ratings["user_id"].nunique() == 2999 and data.ratings["item_id"].nunique() == 3615
    assert _counts(data.ratings) == {1: 27472, 2: 53838, 3: 127216, 4: 170579, 5: 108545}
    assert len(data.users) == 6040 and len(data.items) == 3883
    train, val, test = temporal_leave_last_out(data.ratings)
    assert len(test) == len(val) == 2999


def test_ml1m_notime_full() -> None:
    data = load_movielens("ml-1m", root=_root("ml-1m-notime"))
    assert len(data.ratings) == 1_000_209 and not data.has_timestamps
    assert data.ratings["user_id"].nunique() == 6040 and data.ratings["item_id"].nunique() == 3706
    assert _counts(data.ratings) == {1: 56174, 2: 107557, 3: 261197, 4: 348971, 5: 226310}
    with pytest.raises(ValueError, match="timestamp"):
        temporal_leave_last_out(data.ratings)
    # RecBole ml-1m protocol: drop 3s, 4-5 positive, random 8:1:1
    labelled = binarize(data.ratings, drop_neutral=True)
    assert len(labelled) == 1_000_209 - 261_197
    train, val, test = random_split(labelled, seed=0)
    encoder = FeatureEncoder().fit(train, data.users, data.items)
    batches = MovieLensBatches(encoder.transform(test), batch_size=4096, shuffle=False)
    batch = next(iter(batches))
    assert batch.sparse_features.keys() == encoder.sparse_feature_names
    for key, size in encoder.sparse_feature_sizes.items():
        values = batch.sparse_features[key].values()
        assert int(values.max()) < size and int(values.min()) >= 0
    assert torch.isfinite(batch.dense_features).all()
