"""``load_movielens``: every MovieLens release in its official format and encoding.

Formats (GroupLens READMEs):

* ml-100k: ``u.data`` (tab: user, item, rating, timestamp), ``u.item`` (pipe, latin-1: id, title,
  release date, video release date, IMDb URL, 19 genre flags), ``u.user`` (pipe: id, age,
  gender, occupation, zip), optional ``u.genre`` (genre names and flag positions).
* ml-1m, ml-10m: ``::``-separated latin-1 ``ratings.dat`` (user, movie, rating, timestamp),
  ``movies.dat`` (id, title, ``|``-separated genres), ml-1m also ``users.dat`` (id, gender,
  age bucket, occupation code, zip).
* ml-20m, ml-25m, ml-latest-small, ml-latest: UTF-8 CSV with header, ``ratings.csv``
  (userId, movieId, rating, timestamp) and ``movies.csv`` (movieId, title, genres).

A ``.dat`` release folder without ``ratings.dat`` but with a ``ratings.csv``
(``userId,movieId,rating[,timestamp]``) is read through :func:`load_ratings_file`; without
timestamps the result has no ``timestamp`` column (``has_timestamps`` is False).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from vq_torchrec.datasets.data import MovieLensData
from vq_torchrec.datasets.download import cache_dir, download_release, missing_files_message
from vq_torchrec.datasets.errors import MovieLensFormatError, MovieLensNotFoundError
from vq_torchrec.datasets.generic import load_ratings_file
from vq_torchrec.datasets.parsing import (
    as_float,
    as_int,
    check_values,
    read_delimited,
    read_header,
)
from vq_torchrec.datasets.releases import MovieLensRelease, get_release

ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
logger = logging.getLogger(__name__)
NO_GENRES = "(no genres listed)"
_YEAR_IN_TITLE = r"\((\d{4})[^()]*\)\s*$"


# ----------------------------------------------------------------------------- ratings


def _ratings_frame(
    frame: pd.DataFrame, path: Path, first_line: int, release: MovieLensRelease
) -> pd.DataFrame:
    ratings = pd.DataFrame(
        {
            "user_id": as_int(frame[0], path, first_line, "user_id"),
            "item_id": as_int(frame[1], path, first_line, "item_id"),
            "rating": as_float(frame[2], path, first_line, "rating"),
            "timestamp": as_int(frame[3], path, first_line, "timestamp"),
        }
    )
    check_values(ratings["rating"], release.ratings_allowed, None, path, first_line, "rating")
    check_values(
        ratings["timestamp"], None, (0, np.iinfo(np.int64).max), path, first_line, "timestamp"
    )
    return ratings.reset_index(drop=True)


def _read_ratings_text(path: Path, sep: str, release: MovieLensRelease) -> pd.DataFrame:
    frame, first_line = read_delimited(path, sep=sep, n_fields=4, encoding="latin-1")
    return _ratings_frame(frame, path, first_line, release)


def _read_ratings_csv(path: Path, release: MovieLensRelease) -> pd.DataFrame:
    _expect_header(path, ("userId", "movieId", "rating", "timestamp"), "utf-8")
    frame, first_line = read_delimited(
        path, sep=",", n_fields=4, encoding="utf-8", header=True, quoted=True
    )
    return _ratings_frame(frame, path, first_line, release)


def _expect_header(path: Path, expected: tuple[str, ...], encoding: str) -> None:
    names = read_header(path, ",", encoding)
    if names != list(expected):
        missing = [n for n in expected if n not in names]
        what = f"missing column(s) {missing}" if missing else "unexpected columns"
        raise MovieLensFormatError(path, 1, f"{what}: header is {names}, expected {list(expected)}")


# ----------------------------------------------------------------------------- items


def _years_from_titles(titles: pd.Series) -> pd.Series:
    return pd.to_numeric(titles.str.extract(_YEAR_IN_TITLE, expand=False), errors="coerce").astype(
        "Int64"
    )


def _split_genres(genres: pd.Series) -> pd.Series:
    return genres.map(lambda g: [] if g in ("", NO_GENRES) else g.split("|"))


def _items_frame(
    ids: pd.Series, titles: pd.Series, years: pd.Series, genres: pd.Series
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": ids.to_numpy(),
            "title": titles.to_numpy(),
            "year": years.to_numpy(),
            "genres": genres.to_numpy(),
        }
    ).astype({"year": "Int64"})


def _genre_names_100k(root: Path) -> tuple[str, ...]:
    path = root / "u.genre"
    if not path.is_file():
        return ML100K_GENRES
    frame, first_line = read_delimited(
        path, sep="|", n_fields=2, encoding="latin-1", text_columns=(0,)
    )
    index = as_int(frame[1], path, first_line, "genre index")
    names = [""] * len(frame)
    for pos, (name, idx) in enumerate(zip(frame[0], index)):
        if not 0 <= idx < len(frame) or names[idx]:
            raise MovieLensFormatError(
                path, first_line + int(frame.index[pos]), f"bad genre index {idx}"
            )
        names[idx] = name
    return tuple(names)


def _read_items_100k(root: Path) -> pd.DataFrame:
    path = root / "u.item"
    genre_names = _genre_names_100k(root)
    n_fields = 5 + len(genre_names)
    frame, first_line = read_delimited(
        path,
        sep="|",
        n_fields=n_fields,
        encoding="latin-1",
        text_columns=(1, 2, 3, 4),
        optional_columns=(2, 3, 4),
    )
    ids = as_int(frame[0], path, first_line, "item_id")
    flags = np.stack(
        [
            as_int(frame[5 + g], path, first_line, f"genre flag {genre_names[g]}").to_numpy()
            for g in range(len(genre_names))
        ],
        axis=1,
    )
    bad = ~np.isin(flags, (0, 1))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise MovieLensFormatError(
            path,
            first_line + int(frame.index[row]),
            f"genre flag {genre_names[col]!r} must be 0 or 1, got {flags[row, col]}",
        )
    names = np.array(genre_names, dtype=object)
    genres = pd.Series([list(names[row.astype(bool)]) for row in flags], index=frame.index)
    years = _years_from_titles(frame[1])
    release_years = pd.to_numeric(frame[2].str[-4:], errors="coerce").astype("Int64")
    years = years.fillna(release_years)
    return _items_frame(ids, frame[1], years, genres)


def _read_items_dat(path: Path, encoding: str) -> pd.DataFrame:
    frame, first_line = read_delimited(
        path, sep="::", n_fields=3, encoding=encoding, text_columns=(1, 2)
    )
    ids = as_int(frame[0], path, first_line, "item_id")
    return _items_frame(ids, frame[1], _years_from_titles(frame[1]), _split_genres(frame[2]))


def _read_items_csv(path: Path) -> pd.DataFrame:
    _expect_header(path, ("movieId", "title", "genres"), "utf-8")
    frame, first_line = read_delimited(
        path, sep=",", n_fields=3, encoding="utf-8", header=True, quoted=True, text_columns=(1, 2)
    )
    ids = as_int(frame[0], path, first_line, "item_id")
    titles = frame[1].str.strip()
    return _items_frame(ids, titles, _years_from_titles(titles), _split_genres(frame[2]))


# ----------------------------------------------------------------------------- users


def _read_users_100k(path: Path) -> pd.DataFrame:
    frame, first_line = read_delimited(
        path, sep="|", n_fields=5, encoding="latin-1", text_columns=(2, 3, 4)
    )
    return pd.DataFrame(
        {
            "user_id": as_int(frame[0], path, first_line, "user_id").to_numpy(),
            "gender": frame[2].to_numpy(),
            "age": as_int(frame[1], path, first_line, "age").to_numpy(),
            "occupation": frame[3].to_numpy(),
            "zip": frame[4].to_numpy(),
        }
    )


def _read_users_dat(path: Path) -> pd.DataFrame:
    frame, first_line = read_delimited(
        path, sep="::", n_fields=5, encoding="latin-1", text_columns=(1, 4)
    )
    return pd.DataFrame(
        {
            "user_id": as_int(frame[0], path, first_line, "user_id").to_numpy(),
            "gender": frame[1].to_numpy(),
            "age": as_int(frame[2], path, first_line, "age").to_numpy(),
            "occupation": as_int(frame[3], path, first_line, "occupation").to_numpy(),
            "zip": frame[4].to_numpy(),
        }
    )


# ----------------------------------------------------------------------------- entry point


def _ratings_csv_fallback(root: Path, release: MovieLensRelease) -> pd.DataFrame:
    data = load_ratings_file(
        root / "ratings.csv",
        sep=",",
        rating_values=release.ratings_allowed,
    )
    return data.ratings


def _check_files(root: Path, release: MovieLensRelease) -> None:
    if not root.is_dir():
        raise MovieLensNotFoundError(missing_files_message(release, root, list(release.files)))
    missing = [f for f in release.files if not (root / f).is_file()]
    if release.layout == "dat" and missing == ["ratings.dat"] and (root / "ratings.csv").is_file():
        missing = []
    if missing:
        raise MovieLensNotFoundError(missing_files_message(release, root, missing))


def read_release(root: Path, release: MovieLensRelease) -> MovieLensData:
    """Parse the release folder ``root`` (no download)."""
    _check_files(root, release)
    users = None
    if release.layout == "100k":
        ratings = _read_ratings_text(root / "u.data", "\t", release)
        items = _read_items_100k(root)
        users = _read_users_100k(root / "u.user")
    elif release.layout == "dat":
        if (root / "ratings.dat").is_file():
            ratings = _read_ratings_text(root / "ratings.dat", "::", release)
        else:
            ratings = _ratings_csv_fallback(root, release)
        items = _read_items_dat(root / "movies.dat", release.text_encoding)
        if (root / "users.dat").is_file():
            users = _read_users_dat(root / "users.dat")
    else:
        ratings = _read_ratings_csv(root / "ratings.csv", release)
        items = _read_items_csv(root / "movies.csv")
    if release.num_ratings is not None and len(ratings) != release.num_ratings:
        logger.warning(
            "%s: %s ratings, but the official %s has %s: a subset, or a file truncated at a "
            "line boundary?",
            root,
            f"{len(ratings):,}",
            release.name,
            f"{release.num_ratings:,}",
        )
    return MovieLensData(name=release.name, ratings=ratings, users=users, items=items, root=root)


def load_movielens(
    name: str, root: str | Path | None = None, download: bool = True
) -> MovieLensData:
    """Load a MovieLens release.

    Args:
        name: ``ml-100k``, ``ml-1m``, ``ml-10m``, ``ml-20m``, ``ml-25m``, ``ml-latest-small`` or
            ``ml-latest``.
        root: the folder holding that release's files (for ml-100k the folder with ``u.data``,
            ``u.item``, ``u.user``). ``None``: the cache folder :func:`cache_dir` ``(name)``,
            downloaded there (checksum verified, extracted atomically) when absent and
            ``download`` is True.
        download: allow downloading into the cache when ``root`` is ``None``.

    Returns:
        :class:`MovieLensData`.

    Raises:
        MovieLensNotFoundError: files missing (the message says which files to put where).
        MovieLensFormatError: a malformed file (the message names the file and line).
        ChecksumMismatchError: a downloaded archive does not match its recorded checksum.
    """
    release = get_release(name)
    if root is not None:
        return read_release(Path(root).expanduser(), release)
    folder = cache_dir(release.name)
    if not folder.is_dir():
        if not download:
            raise MovieLensNotFoundError(
                missing_files_message(release, folder, list(release.files))
                + " (download=False, so nothing was downloaded)"
            )
        folder = download_release(release.name)
    return read_release(folder, release)
