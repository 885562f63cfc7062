"""The MovieLens releases: official archive, checksums, files and formats."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/{archive}"

WHOLE_STARS = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
HALF_STARS = np.arange(1, 11, dtype=np.float64) / 2.0  # 0.5 .. 5.0


@dataclass(frozen=True)
class MovieLensRelease:
    """One MovieLens release.

    Attributes:
        name: canonical name (``"ml-1m"``).
        archive: file name of the official zip on the GroupLens site.
        folder: top-level folder inside the zip.
        layout: ``"100k"`` (tab/pipe files), ``"dat"`` (``::``-separated latin-1) or
            ``"csv"`` (CSV with header, UTF-8).
        files: files that must be present in a release folder.
        ratings_allowed: the rating values the release may contain.
        sha256: SHA-256 of the official zip, or ``None`` when not known.
        md5: MD5 of the official zip as published by GroupLens, or ``None``.
        size: size in bytes of the official zip, or ``None``.
        num_ratings: rows of the official ratings file (``None`` for ``ml-latest``, which
            changes); a different count only warns (subsets such as users 1-2999 are allowed).

    Checksums: SHA-256 and sizes for ml-100k, ml-1m, ml-20m, ml-25m and ml-latest-small are the
    values TensorFlow Datasets records for these URLs (``url_checksums/movielens.txt``); MD5s for
    ml-100k, ml-1m, ml-10m, ml-20m and ml-25m are the ones GroupLens publishes next to the zips
    (``<archive>.md5``). ``ml-latest`` is rebuilt by GroupLens from time to time, so no checksum
    is recorded: its download is accepted with a loud warning.
    """

    name: str
    archive: str
    folder: str
    layout: str
    files: tuple[str, ...]
    ratings_allowed: np.ndarray
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    num_ratings: int | None = None

    @property
    def text_encoding(self) -> str:
        """Encoding of the title files: latin-1 (ml-100k, ml-1m), UTF-8 (CSV releases); ml-10m's
        is not documented, so it is detected (UTF-8 if the bytes are valid UTF-8, else latin-1)."""
        if self.layout == "csv":
            return "utf-8"
        return "latin-1-or-utf-8" if self.name == "ml-10m" else "latin-1"

    @property
    def url(self) -> str:
        return GROUPLENS_URL.format(archive=self.archive)


_CSV_FILES = ("ratings.csv", "movies.csv")

RELEASES: dict[str, MovieLensRelease] = {
    r.name: r
    for r in (
        MovieLensRelease(
            "ml-100k",
            "ml-100k.zip",
            "ml-100k",
            "100k",
            ("u.data", "u.item", "u.user"),
            WHOLE_STARS,
            sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
            md5="0e33842e24a9c977be4e0107933c0723",
            size=4924029,
            num_ratings=100_000,
        ),
        MovieLensRelease(
            "ml-1m",
            "ml-1m.zip",
            "ml-1m",
            "dat",
            ("ratings.dat", "movies.dat", "users.dat"),
            WHOLE_STARS,
            sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
            md5="c4d9eecfca2ab87c1945afe126590906",
            size=5917549,
            num_ratings=1_000_209,
        ),
        MovieLensRelease(
            "ml-10m",
            "ml-10m.zip",
            "ml-10M100K",
            "dat",
            ("ratings.dat", "movies.dat"),
            HALF_STARS,
            sha256=None,
            md5="ce571fd55effeba0271552578f2648bd",
            num_ratings=10_000_054,
        ),
        MovieLensRelease(
            "ml-20m",
            "ml-20m.zip",
            "ml-20m",
            "csv",
            _CSV_FILES,
            HALF_STARS,
            sha256="96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
            md5="cd245b17a1ae2cc31bb14903e1204af3",
            size=198702078,
            num_ratings=20_000_263,
        ),
        MovieLensRelease(
            "ml-25m",
            "ml-25m.zip",
            "ml-25m",
            "csv",
            _CSV_FILES,
            HALF_STARS,
            sha256="8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa",
            md5="6b51fb2759a8657d3bfcbfc42b592ada",
            size=261978986,
            num_ratings=25_000_095,
        ),
        MovieLensRelease(
            "ml-latest-small",
            "ml-latest-small.zip",
            "ml-latest-small",
            "csv",
            _CSV_FILES,
            HALF_STARS,
            sha256="696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436",
            size=978202,
            num_ratings=100_836,
        ),
        MovieLensRelease(
            "ml-latest",
            "ml-latest.zip",
            "ml-latest",
            "csv",
            _CSV_FILES,
            HALF_STARS,
        ),
    )
}


def get_release(name: str) -> MovieLensRelease:
    """The release called ``name`` (``"ml-1m"``; ``"1m"`` is accepted too)."""
    key = name.strip().lower()
    if not key.startswith("ml-"):
        key = f"ml-{key}"
    if key not in RELEASES:
        raise ValueError(
            f"unknown MovieLens release {name!r}; known: {', '.join(sorted(RELEASES))}"
        )
    return RELEASES[key]
