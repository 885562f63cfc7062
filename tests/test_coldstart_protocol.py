"""Cold-start protocol split and feature sets on generated data."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import torch

from vq_torchrec.coldstart.features import ColdStartFeatures, title_tokens
from vq_torchrec.coldstart.protocol import split_cold_start
from vq_torchrec.coldstart.synthetic import make_synthetic_movielens
from vq_torchrec.coldstart.training import auc_score

N, K = 40, 5




@pytest.fixture(scope="module")
def data():
    return make_synthetic_movielens(num_users=300, num_items=80, max_ratings=120, seed=3)


@pytest.fixture(scope="module")
def split(data):
    return split_cold_start(data.ratings, N, K)


def test_thresholds(data, split):
    counts = data.ratings.groupby("item_id").size()
    assert set(split.old_items) == set(counts[counts > N].index)
    assert set(split.new_items) == set(counts[(counts <= N) & (counts >= 3 * K)].index)
    dropped = set(counts[counts < 3 * K].index)
    assert dropped, "generated data should contain items below 3K"
    every = pd.concat([split.train_base, *[f for _, f in split.phases], split.test])
    assert not dropped & set(every["item_id"])
    assert set(split.train_base["item_id"]) == set(split.old_items)
    # all ratings of old items pre-train; all ratings of new items are in phases or test
    assert len(split.train_base) == counts[counts > N].sum()
    n_new_rows = sum(len(f) for _, f in split.phases) + len(split.test)
    assert n_new_rows == counts[(counts <= N) & (counts >= 3 * K)].sum()


def test_phases_have_k_rows_per_new_item_and_are_time_ordered(split):
    frames = [f for _, f in split.phases] + [split.test]
    for _, frame in split.phases:
        per_item = frame.groupby("item_id").size()
        assert set(per_item.index) == set(split.new_items)
        assert (per_item == K).all()
    for item in split.new_items:
        times = [f.loc[f["item_id"] == item, "timestamp"] for f in frames]
        for earlier, later in zip(times, times[1:]):
            assert earlier.max() <= later.min()


def test_phases_and_test_are_disjoint(split):
    frames = {name: f for name, f in split.phases}
    frames["test"] = split.test
    frames["train_base"] = split.train_base
    keys = {name: set(zip(f["user_id"], f["item_id"])) for name, f in frames.items()}
    names = list(keys)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not keys[a] & keys[b], f"{a} and {b} share rows"
    assert (split.test["rank"] >= 3 * K).all()
    for name, frame in split.phases:
        assert (frame["rank"] < 3 * K).all(), name


def test_labels_binarised(split):
    for frame in [split.train_base, split.test, *[f for _, f in split.phases]]:
        assert ((frame["rating"] >= 4).astype(int) == frame["label"]).all()


def test_validation_never_uses_test(split):
    val = split.validation()
    assert val.phase_names == ["warm_a", "warm_b"]
    assert val.test is split.phase("warm_c")
    assert not set(zip(val.test["user_id"], val.test["item_id"])) & set(
        zip(split.test["user_id"], split.test["item_id"]))


def test_bad_inputs(data):
    with pytest.raises(ValueError, match="timestamp"):
        split_cold_start(data.ratings.drop(columns=["timestamp"]), N, K)
    with pytest.raises(ValueError, match="n_threshold"):
        split_cold_start(data.ratings, 10, 5)
    dup = pd.concat([data.ratings, data.ratings.iloc[:1]])
    with pytest.raises(ValueError, match="duplicate"):
        split_cold_start(dup, N, K)
    with pytest.raises(ValueError, match="no old and|0 old|both must be non-empty"):
        split_cold_start(data.ratings, 10_000, K)


def test_feature_sets(data, split):
    clean = ColdStartFeatures(split, data.users, data.items, "clean")
    cvar = ColdStartFeatures(split, data.users, data.items, "cvar", all_ratings=data.ratings)
    assert clean.dense_keys == ()
    assert cvar.dense_keys == ("count", "timestamp")
    rows = clean.test
    kjt, dense, label = clean.batch(rows)
    assert dense.shape == (len(rows), 0)
    assert "count" not in kjt.keys() and "timestamp" not in kjt.keys()
    kjt_c, dense_c, _ = cvar.batch(cvar.test)
    assert dense_c.shape == (len(rows), 2)
    assert kjt.keys() == kjt_c.keys()
    # count = the item's rating count (whole data) / max count
    counts = data.ratings.groupby("item_id").size()
    item_ids = split.test["item_id"].to_numpy()
    expected = torch.tensor(counts.loc[item_ids].to_numpy() / counts.max(), dtype=torch.float32)
    torch.testing.assert_close(dense_c[:, 0], expected)
    # one bag per row and key; title bags = number of title tokens
    lengths = kjt.to_dict()["title"].lengths()
    titles = data.items.set_index("item_id").loc[item_ids, "title"]
    assert lengths.tolist() == [len(title_tokens(t)) for t in titles]
    assert (kjt.to_dict()["user_id"].lengths() == 1).all()
    with pytest.raises(ValueError, match="feature_set"):
        ColdStartFeatures(split, data.users, data.items, "leaky")
    with pytest.raises(ValueError, match="genres"):
        ColdStartFeatures(split, data.users, data.items.drop(columns=["genres"]), "clean")


def test_title_tokens():
    assert title_tokens("Star Wars: Episode IV (1977)") == ["star", "wars", "episode", "iv"]


def test_auc_matches_pair_counting():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(200, generator=g) > 0.6).float()
    s = torch.randint(0, 10, (200,), generator=g).float()  # many ties
    pos, neg = s[y == 1], s[y == 0]
    diff = pos.unsqueeze(1) - neg.unsqueeze(0)
    brute = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()
    assert auc_score(y, s) == pytest.approx(brute, abs=1e-9)
    with pytest.raises(ValueError, match="both classes"):
        auc_score(torch.ones(5), torch.rand(5))


@pytest.mark.realdata
@pytest.mark.skipif("MOVIELENS_ROOT" not in os.environ, reason="MOVIELENS_ROOT not set")
def test_ml100k_split_sizes():
    from vq_torchrec.datasets import load_movielens

    root = os.path.join(os.environ["MOVIELENS_ROOT"], "ml-100k")
    d = load_movielens("ml-100k", root=root, download=False)
    s = split_cold_start(d.ratings, 100, 10)
    assert s.summary() == {"train_base": 64419, "old_items": 334, "new_items": 472, "test": 13147,
                           "warm_a": 4720, "warm_b": 4720, "warm_c": 4720}
    f = ColdStartFeatures(s, d.users, d.items, "clean")
    kjt, dense, label = f.batch(f.test)
    assert dense.shape == (13147, 0) and label.shape == (13147,)
