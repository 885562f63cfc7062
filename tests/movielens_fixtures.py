"""Generators of small MovieLens-format release folders (no real MovieLens data in the repo).

Each ``write_*`` function writes one release's files in its official format and encoding into
a folder and returns the ratings it wrote as ``(user, item, rating, timestamp)`` tuples, so
tests can compare what a loader reads with what was written.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from vq_torchrec.datasets.movielens import ML100K_GENRES as OFFICIAL_ML100K_GENRES

# Titles with non-ASCII latin-1 characters (as in the real u.item / movies.dat).
ITEMS = [
    (1, "Toy Story (1995)", ["Animation", "Children's", "Comedy"]),
    (2, "Misérables, Les (1995)", ["Drama", "War"]),
    (3, "Café au lait (1993)", ["Comedy"]),
    (4, "Jumanji (1995)", ["Adventure", "Children's", "Fantasy"]),
    (5, "Città delle donne, La (1980)", ["Drama"]),
    (6, "Star Wars (1977)", ["Action", "Sci-Fi"]),
    (7, "Heat (1995)", ["Action", "Crime", "Thriller"]),
    (8, "Nénette et Boni (1996)", ["Drama"]),
]
USERS_1M = [  # id, gender, age bucket, occupation code, zip
    (1, "F", 1, 10, "48067"),
    (2, "M", 56, 16, "70072"),
    (3, "M", 25, 15, "55117"),
    (4, "M", 45, 7, "02460"),
    (5, "F", 25, 20, "98107-4707"),
    (6, "F", 35, 9, "55117"),
]
USERS_100K = [  # id, age, gender, occupation, zip
    (1, 24, "M", "technician", "85711"),
    (2, 53, "F", "other", "94043"),
    (3, 23, "M", "writer", "32067"),
    (4, 24, "M", "technician", "43537"),
    (5, 33, "F", "other", "15213"),
    (6, 42, "M", "executive", "T8H1N"),
]
ML100K_GENRES = list(OFFICIAL_ML100K_GENRES)


def make_ratings(
    n_users: int = 6, n_items: int = 8, per_user: int = 5, half_stars: bool = False, seed: int = 0
) -> list[tuple[int, int, float, int]]:
    """Distinct (user, item) pairs with ratings and increasing-ish timestamps."""
    rng = np.random.default_rng(seed)
    out = []
    for user in range(1, n_users + 1):
        items = rng.choice(np.arange(1, n_items + 1), size=min(per_user, n_items), replace=False)
        for k, item in enumerate(items):
            rating = float(rng.integers(1, 11) / 2) if half_stars else float(rng.integers(1, 6))
            out.append(
                (user, int(item), rating, 978300000 + 1000 * user + int(rng.integers(0, 900)) + k)
            )
    return out


def _fmt(r: float) -> str:
    return str(int(r)) if float(r).is_integer() else str(r)


def write_ml100k(folder: Path, ratings: list | None = None) -> list:
    """ml-100k: ``u.data`` (tab), ``u.item`` / ``u.user`` / ``u.genre`` (pipe, latin-1)."""
    folder.mkdir(parents=True, exist_ok=True)
    ratings = make_ratings() if ratings is None else ratings
    (folder / "u.data").write_bytes(
        "".join(f"{u}\t{i}\t{_fmt(r)}\t{t}\n" for u, i, r, t in ratings).encode("latin-1")
    )
    lines = []
    for item, title, genres in ITEMS:
        year = title[-5:-1]
        flags = "|".join("1" if g in genres else "0" for g in ML100K_GENRES)
        url = f"http://us.imdb.com/M/title-exact?{title.replace(' ', '%20')}"
        lines.append(f"{item}|{title}|01-Jan-{year}||{url}|{flags}\n")
    (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))
    (folder / "u.user").write_bytes(
        "".join(f"{u}|{a}|{g}|{o}|{z}\n" for u, a, g, o, z in USERS_100K).encode("latin-1")
    )
    (folder / "u.genre").write_bytes(
        ("".join(f"{g}|{k}\n" for k, g in enumerate(ML100K_GENRES)) + "\n").encode("latin-1")
    )
    return ratings


def write_movies_dat(folder: Path) -> None:
    (folder / "movies.dat").write_bytes(
        "".join(f"{i}::{t}::{'|'.join(g)}\n" for i, t, g in ITEMS).encode("latin-1")
    )


def write_users_dat(folder: Path) -> None:
    (folder / "users.dat").write_bytes(
        "".join(f"{u}::{g}::{a}::{o}::{z}\n" for u, g, a, o, z in USERS_1M).encode("latin-1")
    )


def write_ml1m(folder: Path, ratings: list | None = None) -> list:
    """ml-1m: ``::``-separated latin-1 ``ratings.dat``, ``movies.dat``, ``users.dat``."""
    folder.mkdir(parents=True, exist_ok=True)
    ratings = make_ratings() if ratings is None else ratings
    (folder / "ratings.dat").write_bytes(
        "".join(f"{u}::{i}::{_fmt(r)}::{t}\n" for u, i, r, t in ratings).encode("latin-1")
    )
    write_movies_dat(folder)
    write_users_dat(folder)
    return ratings


def write_ml1m_notime(folder: Path, ratings: list | None = None) -> list:
    """Like ``ml-1m-notime``: ``ratings.csv`` (userId,movieId,rating) + movies.dat + users.dat."""
    folder.mkdir(parents=True, exist_ok=True)
    ratings = make_ratings() if ratings is None else ratings
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating\n" + "".join(f"{u},{i},{_fmt(r)}\n" for u, i, r, _ in ratings)
    )
    write_movies_dat(folder)
    write_users_dat(folder)
    return ratings


def write_ml10m(folder: Path, ratings: list | None = None) -> list:
    """ml-10m: ``::`` ``ratings.dat`` with half stars, ``movies.dat``; no users."""
    folder.mkdir(parents=True, exist_ok=True)
    ratings = make_ratings(half_stars=True) if ratings is None else ratings
    (folder / "ratings.dat").write_bytes(
        "".join(f"{u}::{i}::{_fmt(r)}::{t}\n" for u, i, r, t in ratings).encode("latin-1")
    )
    write_movies_dat(folder)
    return ratings


def write_csv_release(folder: Path, ratings: list | None = None) -> list:
    """ml-20m/25m/latest: UTF-8 ``ratings.csv`` and ``movies.csv`` with header and quoting."""
    folder.mkdir(parents=True, exist_ok=True)
    ratings = make_ratings(half_stars=True) if ratings is None else ratings
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        + "".join(f"{u},{i},{r:.1f},{t}\n" for u, i, r, t in ratings),
        encoding="utf-8",
    )
    lines = ["movieId,title,genres\n"]
    for item, title, genres in ITEMS:
        quoted = f'"{title}"' if "," in title else title
        lines.append(f"{item},{quoted},{'|'.join(genres) or '(no genres listed)'}\n")
    lines.append('9,"Adventures of Rocky, The (2000) "' + ",(no genres listed)\n")
    (folder / "movies.csv").write_text("".join(lines), encoding="utf-8")
    return ratings


WRITERS = {
    "ml-100k": write_ml100k,
    "ml-1m": write_ml1m,
    "ml-10m": write_ml10m,
    "ml-20m": write_csv_release,
    "ml-25m": write_csv_release,
    "ml-latest-small": write_csv_release,
    "ml-latest": write_csv_release,
}


def make_release_zip(name: str, zip_folder: str, destination: Path) -> Path:
    """A zip shaped like the official archive: files under ``zip_folder/``."""
    staging = destination.parent / f"staging-{name}"
    WRITERS[name](staging)
    with zipfile.ZipFile(destination, "w") as zipped:
        for path in sorted(staging.iterdir()):
            zipped.write(path, f"{zip_folder}/{path.name}")
    return destination
