"""MovieLensData: what every loader returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

RATING_COLUMNS = ("user_id", "item_id", "rating", "timestamp")


@dataclass
class MovieLensData:
    """Ratings plus optional side features of one data set.

    Attributes:
        name: release name (``"ml-1m"``) or, for :func:`load_ratings_file`, the file's stem.
        ratings: one row per rating, columns ``user_id`` (int64), ``item_id`` (int64),
            ``rating`` (float64) and ``timestamp`` (int64, seconds since the epoch). The
            ``timestamp`` column is absent when the source has none (``has_timestamps``).
            Rows are in file order; ids are the raw ids of the file.
        users: ``user_id, gender, age, occupation, zip`` (ml-100k, ml-1m) or ``None``.
        items: ``item_id, title, year (Int64, <NA> if unknown), genres (list of str)`` or ``None``.
        root: the folder (or file) the data was read from.
    """

    name: str
    ratings: pd.DataFrame
    users: pd.DataFrame | None = None
    items: pd.DataFrame | None = None
    root: Path | None = None

    @property
    def has_timestamps(self) -> bool:
        """Whether ``ratings`` has a ``timestamp`` column."""
        return "timestamp" in self.ratings.columns

    def __repr__(self) -> str:
        users = "None" if self.users is None else f"{len(self.users)} rows"
        items = "None" if self.items is None else f"{len(self.items)} rows"
        return (
            f"MovieLensData(name={self.name!r}, ratings={len(self.ratings)} rows, "
            f"users={users}, items={items}, has_timestamps={self.has_timestamps})"
        )
