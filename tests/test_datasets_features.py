"""FeatureEncoder: vocabularies (OOV 0, frozen), jagged side features, dense features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from movielens_fixtures import ITEMS, write_ml1m, write_ml100k

from vq_torchrec.datasets import (
    FeatureEncoder,
    Vocabulary,
    binarize,
    load_movielens,
    load_ratings_file,
    random_split,
)
from vq_torchrec.datasets.features import title_tokens

KEYS = [
    "user_id",
    "item_id",
    "gender",
    "age",
    "occupation",
    "zip",
    "zip_prefix",
    "genres",
    "year",
    "title_tokens",
]


@pytest.fixture
def ml1m(tmp_path: Path):
    write_ml1m(tmp_path)
    return load_movielens("ml-1m", root=tmp_path)


def _per_row(kjt, key: str) -> list[list[int]]:
    jt = kjt[key]
    return [v.tolist() for v in torch.split(jt.values(), jt.lengths().tolist())]


def test_vocabulary_oov_and_size() -> None:
    vocab = Vocabulary([10, 20, 30])
    assert len(vocab) == 4
    assert vocab.lookup([20, 99, 10, 30]).tolist() == [2, 0, 1, 3]
    assert vocab.lookup(pd.Series([np.nan, 30.0])).tolist() == [0, 3]
    with pytest.raises(ValueError, match="unique"):
        Vocabulary([1, 1])


def test_title_tokens() -> None:
    assert title_tokens("Misérables, Les (1995)") == ["misérables", "les"]
    assert title_tokens("The the THE (2000-2003) ") == ["the"]


def test_sizes_keys_and_values(ml1m) -> None:
    labelled = binarize(ml1m.ratings)
    train = labelled[labelled["user_id"] <= 4]
    encoder = FeatureEncoder().fit(train, ml1m.users, ml1m.items)
    assert encoder.sparse_feature_names == KEYS
    sizes = encoder.sparse_feature_sizes
    assert sizes["user_id"] == 4 + 1
    assert sizes["item_id"] == train["item_id"].nunique() + 1
    assert sizes["gender"] == 3 and sizes["age"] == len({u[2] for u in ml1m.users.values}) + 1
    all_genres = {g for _, _, genres in ITEMS for g in genres}
    assert sizes["genres"] == len(all_genres) + 1
    assert encoder.dense_feature_names == ["year", "age"]
    assert encoder.multi_valued_features == ["genres", "title_tokens"]

    encoded = encoder.transform(labelled)
    assert len(encoded) == len(labelled) and encoded.keys == KEYS
    assert encoded.dense.shape == (len(labelled), 2) and encoded.dense.dtype == torch.float32
    assert torch.equal(encoded.labels, torch.tensor(labelled["label"].to_numpy()))
    kjt = encoded.sparse(torch.arange(len(labelled)))
    assert kjt.keys() == KEYS and kjt.stride() == len(labelled)
    genre_vocab = encoder.vocabularies["genres"]
    items = ml1m.items.set_index("item_id")
    for row, (user, item) in enumerate(zip(labelled["user_id"], labelled["item_id"])):
        expected_user = encoder.vocabularies["user_id"].lookup([user])[0]
        assert _per_row(kjt, "user_id")[row] == [expected_user]
        assert expected_user == (
            0 if user > 4 else sorted(train["user_id"].unique()).index(user) + 1
        )
        assert (
            _per_row(kjt, "genres")[row] == genre_vocab.lookup(items.loc[item, "genres"]).tolist()
        )
        tokens = encoder.vocabularies["title_tokens"].lookup(title_tokens(items.loc[item, "title"]))
        assert _per_row(kjt, "title_tokens")[row] == tokens.tolist()
    # dense year: standardised with the catalogue's mean/std
    years = ml1m.items["year"].astype(float)
    expected = (items.loc[labelled["item_id"].iloc[0], "year"] - years.mean()) / years.std(ddof=0)
    assert encoded.dense[0, 0].item() == pytest.approx(expected, rel=1e-5)


def test_unseen_ids_map_to_zero_and_vocab_is_frozen(ml1m) -> None:
    labelled = binarize(ml1m.ratings)
    train, val, test = random_split(labelled, seed=0)
    encoder = FeatureEncoder().fit(train, ml1m.users, ml1m.items)
    sizes = dict(encoder.sparse_feature_sizes)
    before = encoder.transform(train)
    new = pd.DataFrame(
        {"user_id": [999, 1], "item_id": [5, 12345], "rating": [5.0, 1.0], "label": [1.0, 0.0]}
    )
    items = pd.concat(
        [
            ml1m.items,
            pd.DataFrame(
                {
                    "item_id": [12345],
                    "title": ["Brand New (2031)"],
                    "year": [2031],
                    "genres": [["Drama", "Space-Opera"]],
                }
            ),
        ],
        ignore_index=True,
    ).astype({"year": "Int64"})
    encoded = encoder.transform(new, items=items)
    kjt = encoded.sparse(torch.arange(2))
    assert _per_row(kjt, "user_id")[0] == [0]  # unknown user
    assert _per_row(kjt, "gender")[0] == [0]  # ... and its side features
    assert _per_row(kjt, "item_id")[1] == [0]  # new item
    drama = encoder.vocabularies["genres"].lookup(["Drama"]).tolist()
    assert _per_row(kjt, "genres")[1] == drama  # known genre kept, unknown genre dropped
    assert _per_row(kjt, "year")[1] == [0]  # unseen year
    assert encoder.sparse_feature_sizes == sizes  # nothing re-indexed
    after = encoder.transform(train)
    all_rows = torch.arange(len(train))
    assert torch.equal(before.sparse(all_rows).values(), after.sparse(all_rows).values())
    with pytest.raises(RuntimeError, match="frozen"):
        encoder.fit(train, ml1m.users, ml1m.items)


def test_catalogue_id_source(ml1m) -> None:
    train = binarize(ml1m.ratings)
    train = train[train["item_id"] != 8]
    assert (
        FeatureEncoder().fit(train, ml1m.users, ml1m.items).vocabularies["item_id"].lookup([8])[0]
        == 0
    )
    encoder = FeatureEncoder(id_source="catalogue").fit(train, ml1m.users, ml1m.items)
    assert encoder.sparse_feature_sizes["item_id"] == len(ITEMS) + 1
    assert encoder.vocabularies["item_id"].lookup([8])[0] == 8


def test_title_token_cap(ml1m) -> None:
    encoder = FeatureEncoder(max_title_tokens=3).fit(binarize(ml1m.ratings), ml1m.users, ml1m.items)
    assert encoder.sparse_feature_sizes["title_tokens"] == 4
    kjt = encoder.transform(binarize(ml1m.ratings)).sparse(torch.arange(len(ml1m.ratings)))
    assert (
        kjt["title_tokens"].values().max().item() <= 3
        and kjt["title_tokens"].values().min().item() >= 1
    )


def test_ml100k_string_occupations(tmp_path: Path) -> None:
    write_ml100k(tmp_path)
    data = load_movielens("ml-100k", root=tmp_path)
    encoder = FeatureEncoder().fit(binarize(data.ratings), data.users, data.items)
    assert (
        encoder.sparse_feature_sizes["occupation"] == 4 + 1
    )  # technician, other, writer, executive
    assert encoder.sparse_feature_sizes["zip_prefix"] == 6 + 1


def test_ratings_only_has_bias_dense_feature(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("user,item,rating\n1,2,5\n2,3,1\n")
    data = load_ratings_file(path)
    encoder = FeatureEncoder().fit(binarize(data.ratings))
    assert encoder.sparse_feature_names == ["user_id", "item_id"]
    assert encoder.dense_feature_names == ["bias"]
    encoded = encoder.transform(binarize(data.ratings))
    assert encoded.dense.tolist() == [[1.0], [1.0]]


def test_transform_needs_labels_and_fit(ml1m) -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        FeatureEncoder().transform(binarize(ml1m.ratings))
    encoder = FeatureEncoder().fit(ml1m.ratings, ml1m.users, ml1m.items)
    with pytest.raises(ValueError, match="'label' column.*binarize"):
        encoder.transform(ml1m.ratings)


def test_state_dict_round_trip(ml1m) -> None:
    import json

    labelled = binarize(ml1m.ratings)
    train, _, test = random_split(labelled, seed=1)
    encoder = FeatureEncoder(max_title_tokens=7).fit(train, ml1m.users, ml1m.items)
    state = json.loads(json.dumps(encoder.state_dict()))
    restored = FeatureEncoder.from_state_dict(state, ml1m.users, ml1m.items)
    assert restored.sparse_feature_sizes == encoder.sparse_feature_sizes
    assert restored.dense_feature_names == encoder.dense_feature_names
    a, b = encoder.transform(test), restored.transform(test)
    rows = torch.arange(len(test))
    assert torch.equal(a.dense, b.dense)
    assert torch.equal(a.sparse(rows).values(), b.sparse(rows).values())
    assert torch.equal(a.sparse(rows).lengths(), b.sparse(rows).lengths())
    with pytest.raises(ValueError, match="pass users="):
        FeatureEncoder.from_state_dict(state)
