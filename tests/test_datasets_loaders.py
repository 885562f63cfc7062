"""load_movielens / load_ratings_file on small generated files in every official format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from movielens_fixtures import (
    ITEMS,
    USERS_1M,
    USERS_100K,
    make_ratings,
    write_csv_release,
    write_ml1m,
    write_ml1m_notime,
    write_ml10m,
    write_ml100k,
)

from vq_torchrec.datasets import (
    MovieLensFormatError,
    MovieLensNotFoundError,
    load_movielens,
    load_ratings_file,
)


def _check_ratings(frame: pd.DataFrame, written: list, with_time: bool = True) -> None:
    expected = pd.DataFrame(written, columns=["user_id", "item_id", "rating", "timestamp"])
    if not with_time:
        expected = expected.drop(columns="timestamp")
    assert list(frame.columns) == list(expected.columns)
    assert frame["user_id"].dtype == np.int64 and frame["item_id"].dtype == np.int64
    assert frame["rating"].dtype == np.float64
    if with_time:
        assert frame["timestamp"].dtype == np.int64
    pd.testing.assert_frame_equal(frame.reset_index(drop=True), expected, check_dtype=False)


def _check_items(items: pd.DataFrame) -> None:
    assert list(items.columns) == ["item_id", "title", "year", "genres"]
    by_id = items.set_index("item_id")
    for item, title, genres in ITEMS:
        assert by_id.loc[item, "title"] == title  # latin-1 decoded: é, à, ...
        assert by_id.loc[item, "genres"] == genres
        assert by_id.loc[item, "year"] == int(title.strip()[-5:-1])


def test_ml100k(tmp_path: Path) -> None:
    written = write_ml100k(tmp_path)
    raw = (tmp_path / "u.item").read_bytes()
    assert b"Mis\xe9rables" in raw  # the file really is latin-1
    data = load_movielens("ml-100k", root=tmp_path)
    assert data.name == "ml-100k" and data.has_timestamps
    _check_ratings(data.ratings, written)
    _check_items(data.items)
    assert list(data.users.columns) == ["user_id", "gender", "age", "occupation", "zip"]
    assert data.users.values.tolist() == [[u, g, a, o, z] for u, a, g, o, z in USERS_100K]


def test_ml100k_genre_flags_without_u_genre(tmp_path: Path) -> None:
    write_ml100k(tmp_path)
    (tmp_path / "u.genre").unlink()  # falls back to the documented genre order
    _check_items(load_movielens("ml-100k", root=tmp_path).items)


def test_ml1m(tmp_path: Path) -> None:
    written = write_ml1m(tmp_path)
    data = load_movielens("ml-1m", root=tmp_path)
    _check_ratings(data.ratings, written)
    _check_items(data.items)
    assert data.users.values.tolist() == [list(u) for u in USERS_1M]
    assert data.users["zip"].tolist()[3] == "02460"  # leading zero kept


def test_ml1m_notime_uses_ratings_csv(tmp_path: Path) -> None:
    written = write_ml1m_notime(tmp_path)
    data = load_movielens("1m", root=tmp_path)
    assert not data.has_timestamps
    assert "timestamp" not in data.ratings.columns
    _check_ratings(data.ratings, written, with_time=False)
    _check_items(data.items)
    assert len(data.users) == len(USERS_1M)


def test_ml10m_half_stars(tmp_path: Path) -> None:
    written = write_ml10m(tmp_path)
    data = load_movielens("ml-10m", root=tmp_path)
    assert data.users is None
    _check_ratings(data.ratings, written)
    assert (data.ratings["rating"] % 1 == 0.5).any()
    _check_items(data.items)


@pytest.mark.parametrize("name", ["ml-20m", "ml-25m", "ml-latest-small", "ml-latest"])
def test_csv_releases(tmp_path: Path, name: str) -> None:
    written = write_csv_release(tmp_path)
    data = load_movielens(name, root=tmp_path)
    assert data.name == name and data.users is None
    _check_ratings(data.ratings, written)
    _check_items(data.items[data.items["item_id"] != 9])
    extra = data.items.set_index("item_id").loc[9]
    assert extra["title"] == "Adventures of Rocky, The (2000)"  # quoted comma, stripped
    assert extra["genres"] == [] and extra["year"] == 2000


def test_unknown_release() -> None:
    with pytest.raises(ValueError, match="unknown MovieLens release 'ml-2m'.*ml-100k"):
        load_movielens("ml-2m", root="/nonexistent")


def test_missing_files_message_names_files_and_folder(tmp_path: Path) -> None:
    write_ml1m(tmp_path)
    (tmp_path / "users.dat").unlink()
    with pytest.raises(MovieLensNotFoundError) as err:
        load_movielens("ml-1m", root=tmp_path)
    message = str(err.value)
    assert "users.dat" in message and str(tmp_path) in message and "ml-1m.zip" in message


def test_generic_loader_aliases_and_mapping(tmp_path: Path) -> None:
    ratings = make_ratings(seed=3)
    path = tmp_path / "my.csv"
    path.write_text("uid,iid,score,extra\n" + "".join(f"{u},{i},{r},x\n" for u, i, r, _ in ratings))
    data = load_ratings_file(path)
    assert data.name == "my" and not data.has_timestamps and data.users is None
    _check_ratings(data.ratings, ratings, with_time=False)
    mapped = tmp_path / "mapped.tsv"
    mapped.write_text(
        "who\twhat\tstars\twhen\n" + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings)
    )
    data = load_ratings_file(
        mapped,
        columns={"user_id": "who", "item_id": "what", "rating": "stars", "timestamp": "when"},
    )
    _check_ratings(data.ratings, ratings)


def test_generic_loader_headerless_dat(tmp_path: Path) -> None:
    ratings = make_ratings(seed=4)
    path = tmp_path / "r.dat"
    path.write_text("".join(f"{u}::{i}::{int(r)}::{t}\n" for u, i, r, t in ratings))
    _check_ratings(load_ratings_file(path).ratings, ratings)


def test_generic_loader_missing_mapped_column(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("user,item,rating\n1,2,3\n")
    with pytest.raises(MovieLensFormatError, match=r"r\.csv, line 1: missing column 'stars'"):
        load_ratings_file(path, columns={"rating": "stars"})


def test_generic_loader_parquet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pyarrow is not a dependency: serve the table through a patched reader.
    frame = pd.DataFrame({"userId": [1, 2], "movieId": [3, 4], "rating": [4.0, 7.5]})
    monkeypatch.setattr(pd, "read_parquet", lambda path: frame)
    (tmp_path / "r.parquet").write_bytes(b"PAR1")
    data = load_ratings_file(tmp_path / "r.parquet")
    assert data.ratings["item_id"].tolist() == [3, 4]
    with pytest.raises(MovieLensFormatError, match=r"r\.parquet, line 2: rating out of range"):
        load_ratings_file(tmp_path / "r.parquet", rating_range=(0.5, 5.0))


def test_root_one_level_too_high_gets_a_hint(tmp_path: Path) -> None:
    write_ml1m(tmp_path / "ml-1m")
    with pytest.raises(MovieLensNotFoundError, match="did you mean root=.*ml-1m"):
        load_movielens("ml-1m", root=tmp_path)


def test_ml10m_titles_in_utf8_or_latin1(tmp_path: Path) -> None:
    """ml-10m's title encoding is undocumented: both decode to the same titles."""
    write_ml10m(tmp_path)
    latin1 = load_movielens("ml-10m", root=tmp_path).items
    path = tmp_path / "movies.dat"
    path.write_bytes(path.read_bytes().decode("latin-1").encode("utf-8"))
    utf8 = load_movielens("ml-10m", root=tmp_path).items
    pd.testing.assert_frame_equal(latin1, utf8)
    _check_items(utf8)
