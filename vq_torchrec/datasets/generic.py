"""Generic ratings loader: any CSV/TSV/``::``/parquet file with user, item, rating[, timestamp]."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from vq_torchrec.datasets.data import MovieLensData
from vq_torchrec.datasets.errors import MovieLensFormatError
from vq_torchrec.datasets.parsing import (
    as_float,
    as_int,
    check_values,
    read_delimited,
    read_header,
)

# Accepted column names (compared case-insensitively) when ``columns`` is not given.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "user_id": ("user_id", "userid", "user", "uid", "user_id:token"),
    "item_id": (
        "item_id",
        "itemid",
        "item",
        "movieid",
        "movie_id",
        "movie",
        "iid",
        "item_id:token",
    ),
    "rating": ("rating", "ratings", "score", "rating:float"),
    "timestamp": ("timestamp", "time", "ts", "unix_time", "timestamp:float"),
}
_REQUIRED = ("user_id", "item_id", "rating")
_SNIFF_SEPARATORS = ("::", "\t", ",", ";", "|")


def _infer_sep(path: Path, sep: str | None) -> str:
    if sep is not None:
        return sep
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return ","
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".dat":
        return "::"
    with open(path, "rb") as handle:
        first = handle.readline().decode("latin-1")
    for candidate in _SNIFF_SEPARATORS:
        if len(first.split(candidate)) >= 3:
            return candidate
    raise MovieLensFormatError(
        path, 1, "cannot infer the separator (expected one of :: tab , ; |); pass sep="
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _resolve_columns(
    path: Path,
    names: Sequence[str],
    columns: Mapping[str, str] | Sequence[str] | None,
    has_header: bool,
) -> dict[str, int]:
    """Map canonical column -> position in the file."""
    if columns is not None and not isinstance(columns, Mapping):
        # positional names for a headerless file, or a list of file column names in the
        # canonical order user, item, rating[, timestamp]
        columns = dict(zip(("user_id", "item_id", "rating", "timestamp"), columns))
    if not has_header:
        if columns is not None:
            positions = {}
            for key, spec in columns.items():
                if not str(spec).isdigit():
                    raise MovieLensFormatError(
                        path,
                        1,
                        f"file has no header, so column {key!r} must be given as a "
                        f"position, got {spec!r}",
                    )
                positions[key] = int(spec)
            return positions
        if len(names) not in (3, 4):
            raise MovieLensFormatError(
                path,
                1,
                f"headerless file with {len(names)} fields: expected user, item, rating"
                "[, timestamp]; pass columns= to say which is which",
            )
        return {
            key: i
            for i, key in enumerate(("user_id", "item_id", "rating", "timestamp")[: len(names)])
        }
    lowered = [n.lower() for n in names]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise MovieLensFormatError(path, 1, f"duplicated column names in the header: {duplicates}")
    positions = {}
    for key in ("user_id", "item_id", "rating", "timestamp"):
        if columns is not None and key in columns:
            wanted = columns[key]
            if wanted not in names:
                raise MovieLensFormatError(
                    path, 1, f"missing column {wanted!r} (for {key}); header has {names}"
                )
            positions[key] = names.index(wanted)
            continue
        found = next((lowered.index(a) for a in COLUMN_ALIASES[key] if a in lowered), None)
        if found is not None:
            positions[key] = found
        elif key in _REQUIRED:
            raise MovieLensFormatError(
                path,
                1,
                f"missing column for {key} (accepted names: "
                f"{', '.join(COLUMN_ALIASES[key])}; or pass columns=); header has {names}",
            )
    return positions


def load_ratings_file(
    path: str | Path,
    columns: Mapping[str, str] | Sequence[str] | None = None,
    sep: str | None = None,
    *,
    encoding: str = "utf-8",
    rating_values: np.ndarray | None = None,
    rating_range: tuple[float, float] | None = None,
    name: str | None = None,
) -> MovieLensData:
    """Load ratings that are not in a MovieLens release layout.

    Args:
        path: a delimited text file (``.csv``, ``.tsv``, ``.dat`` with ``::``, or any other
            extension with the separator sniffed from line 1) or a ``.parquet`` file.
        columns: which file column holds what: a mapping ``{"user_id": "userId", ...}``
            (missing keys are looked up among :data:`COLUMN_ALIASES`), or a sequence of file
            column names in the order user, item, rating[, timestamp]. For a headerless file
            (detected when every field of line 1 is a number) give positions (``"0"``) or
            nothing (then the order is user, item, rating[, timestamp]).
        sep: field separator; inferred when ``None``.
        encoding: text encoding (only ids and numbers are read, so this matters for the checks).
        rating_values: if given, every rating must be one of these.
        rating_range: if given, every rating must lie in ``[low, high]``.
        name: ``MovieLensData.name`` (default: the file's stem).

    Returns:
        :class:`MovieLensData` with ``users = items = None``; ``ratings`` has ``timestamp``
        only when the file has one (``has_timestamps``).

    Raises:
        MovieLensFormatError: with the file and line of the first problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            frame = pd.read_parquet(path)
        except ImportError as err:
            raise ImportError(
                f"{path}: reading parquet needs pyarrow or fastparquet ({err})"
            ) from err
        names = [str(c) for c in frame.columns]
        positions = _resolve_columns(path, names, columns, has_header=True)
        frame = frame.reset_index(drop=True)
        frame.columns = range(frame.shape[1])
        first_line = 1  # "line" = 1-based row number of the parquet table
    else:
        sep = _infer_sep(path, sep)
        names = read_header(path, sep, encoding)
        has_header = not all(_is_number(n) for n in names)
        positions = _resolve_columns(path, names, columns, has_header)
        frame, first_line = read_delimited(
            path,
            sep=sep,
            n_fields=len(names),
            encoding=encoding,
            header=has_header,
            quoted=sep == ",",
            require_final_newline=False,
        )
    ratings = pd.DataFrame(
        {
            "user_id": as_int(frame[positions["user_id"]], path, first_line, "user_id"),
            "item_id": as_int(frame[positions["item_id"]], path, first_line, "item_id"),
            "rating": as_float(frame[positions["rating"]], path, first_line, "rating"),
        }
    )
    if "timestamp" in positions:
        ratings["timestamp"] = as_int(frame[positions["timestamp"]], path, first_line, "timestamp")
        check_values(
            ratings["timestamp"], None, (0, np.iinfo(np.int64).max), path, first_line, "timestamp"
        )
    check_values(ratings["rating"], rating_values, rating_range, path, first_line, "rating")
    ratings = ratings.reset_index(drop=True)
    return MovieLensData(name=name or path.stem, ratings=ratings, root=path)
