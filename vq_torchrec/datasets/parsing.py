"""Vectorised reading and validation of delimited text files with file+line error messages.

The happy path is one ``pandas.read_csv`` call with the C engine (the ``::`` separator of the
``.dat`` releases is rewritten to a single control character first, so the C engine can be
used) followed by whole-column checks. Only when a check fails is the offending line located,
which may then scan the file line by line.

Line numbers are physical, 1-based line numbers of the file (the header, when present, is line 1).
Blank lines are ignored but still counted.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.api.types import is_float_dtype, is_integer_dtype

from vq_torchrec.datasets.errors import MovieLensFormatError

# Single byte that replaces a multi-character separator (``::``) so pandas' C engine can parse.
_UNIT_SEP = "\x1f"
_OTHER_SEPARATORS = ("::", "\t", ",", ";", "|")


def _sep_name(sep: str) -> str:
    return {"\t": "tab", ",": "comma", "|": "pipe", ";": "semicolon", "::": "'::'"}.get(
        sep, repr(sep)
    )


def read_bytes(path: Path) -> bytes:
    """Read a whole file, with a clear error when it is missing or empty."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    raw = path.read_bytes()
    if not raw or raw.isspace():
        raise MovieLensFormatError(path, None, "file is empty (truncated download or copy?)")
    return raw


def line_of_offset(raw: bytes, offset: int) -> int:
    """1-based line number of the byte at ``offset``."""
    return raw.count(b"\n", 0, offset) + 1


LATIN1 = "latin-1"
UTF8 = "utf-8"
LATIN1_OR_UTF8 = "latin-1-or-utf-8"


def canonical_encoding(encoding: str) -> str:
    """``"latin-1"``, ``"utf-8"`` or ``"latin-1-or-utf-8"`` for the usual spellings."""
    key = encoding.strip().lower().replace("_", "-")
    aliases = {
        "latin-1": LATIN1, "latin1": LATIN1, "iso-8859-1": LATIN1, "iso8859-1": LATIN1,
        "utf-8": UTF8, "utf8": UTF8, "utf-8-sig": UTF8, LATIN1_OR_UTF8: LATIN1_OR_UTF8,
    }  # fmt: skip
    if key not in aliases:
        raise ValueError(f"unsupported encoding {encoding!r}: use latin-1 or utf-8")
    return aliases[key]


def check_encoding(raw: bytes, path: Path, encoding: str) -> str:
    """Reject bytes that cannot be in a text file of ``encoding``; return the codec to use.

    * NUL bytes anywhere: a UTF-16/UTF-32 or binary file.
    * ``"utf-8"``: the bytes must be valid UTF-8 (a leading BOM is allowed).
    * ``"latin-1"``: every byte decodes, so a file that is valid UTF-8 *with* non-ASCII
      characters is rejected as a UTF-8 re-encoding of a latin-1 release (its titles would be
      mojibake otherwise).
    * ``"latin-1-or-utf-8"``: UTF-8 when the bytes are valid UTF-8, else latin-1 (for releases
      whose encoding is not documented, e.g. ml-10m).

    Returns:
        ``"latin-1"`` or ``"utf-8"``.
    """
    encoding = canonical_encoding(encoding)
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise MovieLensFormatError(
            path,
            line_of_offset(raw, nul),
            f"NUL byte at byte offset {nul}: wrong encoding (UTF-16?) or a binary file; "
            f"expected {encoding} text",
        )
    if raw.isascii():
        return UTF8 if encoding == UTF8 else LATIN1
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if encoding == UTF8:
            raise MovieLensFormatError(
                path,
                line_of_offset(raw, err.start),
                f"byte 0x{raw[err.start]:02x} at offset {err.start} is not valid UTF-8 "
                "(wrong encoding? this file must be UTF-8)",
            ) from None
        return LATIN1
    if encoding == LATIN1:
        high = re.search(rb"[\x80-\xff]", raw)
        assert high is not None
        raise MovieLensFormatError(
            path,
            line_of_offset(raw, high.start()),
            "file is UTF-8 encoded but this release's files are latin-1 (ISO-8859-1) "
            "(wrong encoding; convert back with `iconv -f utf-8 -t latin1`)",
        )
    return UTF8


def _split_fields(line: str, sep: str, quoted: bool = False) -> list[str]:
    if quoted and len(sep) == 1:
        return next(csv.reader([line], delimiter=sep), [])
    return line.split(sep)


def _guess_separator(line: str, expected: int, sep: str) -> str:
    hints = [
        s for s in _OTHER_SEPARATORS if s != sep and len(line.split(s)) == expected and s not in sep
    ]
    if hints:
        return f" (the line looks {_sep_name(hints[0])}-separated: wrong separator?)"
    if len(line.split(sep)) < expected:
        return " (truncated line or wrong separator?)"
    return ""


def _field_count_error(
    path: Path,
    text_lines: Sequence[str],
    sep: str,
    expected: int,
    first_line: int,
    quoted: bool = False,
) -> MovieLensFormatError | None:
    """Scan lines (after the header) for the first with the wrong number of fields."""
    for i, line in enumerate(text_lines):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        n = len(_split_fields(line, sep, quoted))
        if n != expected:
            return MovieLensFormatError(
                path,
                first_line + i,
                f"expected {expected} {_sep_name(sep)}-separated fields, found {n}"
                f"{_guess_separator(line, expected, sep)}: {line[:120]!r}",
            )
    return None


def read_delimited(
    path: Path,
    *,
    sep: str,
    n_fields: int,
    encoding: str,
    header: bool = False,
    text_columns: Sequence[int] = (),
    optional_columns: Sequence[int] = (),
    quoted: bool = False,
    require_final_newline: bool = True,
) -> tuple[pd.DataFrame, int]:
    """Read a delimited text file into a DataFrame of raw columns ``0 .. n_fields-1``.

    Args:
        path: the file.
        sep: field separator; ``"::"`` is supported (rewritten to a single byte first).
        n_fields: number of fields every non-blank line must have.
        encoding: ``"latin-1"``, ``"utf-8"`` or ``"latin-1-or-utf-8"`` (see :func:`check_encoding`).
        header: the first line is a header (returned separately by :func:`read_header`; here
            it is skipped).
        text_columns: positions read as ``str`` (no type inference).
        optional_columns: text positions that may be empty (returned as ``""``); an empty
            field anywhere else is an error.
        quoted: honour CSV double quotes (the CSV releases quote titles with commas); the
            ``.dat`` and ml-100k files are read with quoting off (titles contain ``"``).
        require_final_newline: official files end with a newline; a last line without one is
            reported as truncated.

    Returns:
        ``(frame, first_data_line)``: blank lines dropped; ``frame.index`` holds each row's
        position among the data lines, so its physical line is ``first_data_line + index``.
        Columns that had no problem are already numeric (int64/float64) when they parse so.

    Raises:
        MovieLensFormatError: wrong field count / separator, truncated file, encoding problems.
    """
    raw = read_bytes(path)
    if text_columns or not raw.isascii():
        # Text tables are small: check their encoding strictly. Numeric files only need the
        # (copy-free) NUL and ASCII checks; non-ASCII bytes there get the full check.
        codec = check_encoding(raw, path, encoding)
    elif b"\x00" in raw:
        codec = check_encoding(raw, path, encoding)  # raises with the line of the NUL byte
    else:
        codec = UTF8  # pure ASCII
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if require_final_newline and not raw.endswith(b"\n"):
        last = line_of_offset(raw, len(raw) - 1)
        raise MovieLensFormatError(
            path, last, "last line is not terminated by a newline: the file looks truncated"
        )
    parse_sep = sep
    data = raw
    if len(sep) > 1:
        if _UNIT_SEP.encode() in raw:
            pos = raw.find(_UNIT_SEP.encode())
            raise MovieLensFormatError(
                path, line_of_offset(raw, pos), "unexpected control byte 0x1f in a text file"
            )
        data = raw.replace(sep.encode(), _UNIT_SEP.encode())
        parse_sep = _UNIT_SEP
    first_line = 2 if header else 1
    dtype = {i: str for i in text_columns}
    try:
        frame = pd.read_csv(
            io.BytesIO(data),
            sep=parse_sep,
            header=None,
            skiprows=1 if header else 0,
            dtype=dtype,  # type: ignore[arg-type]
            encoding=codec,
            quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE,
            keep_default_na=False,
            na_values=[""],
            skip_blank_lines=False,
            engine="c",
            low_memory=False,
        )
    except pd.errors.EmptyDataError:
        raise MovieLensFormatError(path, None, "no data rows (truncated file?)") from None
    except pd.errors.ParserError as err:
        lines = _data_lines(raw, header, codec)
        found = _field_count_error(path, lines, sep, n_fields, first_line, quoted)
        if found is not None:
            raise found from None
        match = re.search(r"line (\d+)", str(err))
        line = int(match.group(1)) if match else None
        raise MovieLensFormatError(path, line, f"cannot parse: {err}") from None
    if frame.shape[1] != n_fields:
        lines = _data_lines(raw, header, codec)
        found = _field_count_error(path, lines, sep, n_fields, first_line, quoted)
        if found is not None:
            raise found
        raise MovieLensFormatError(
            path, first_line, f"expected {n_fields} fields per line, found {frame.shape[1]}"
        )
    frame.columns = range(n_fields)
    # Blank lines become all-NaN rows (skip_blank_lines=False keeps line numbers exact).
    # Integer columns cannot hold NA: only the others are scanned (keeps the happy path cheap).
    columns_with_na = [
        c for c in frame.columns if frame[c].dtype.kind not in "iu" and frame[c].hasnans
    ]
    if columns_with_na:
        missing = frame.isna().to_numpy()
        blank = missing.all(axis=1)
        required = np.ones(n_fields, dtype=bool)
        required[list(optional_columns)] = False
        partial = missing[:, required].any(axis=1) & ~blank
        if partial.any():
            row = int(np.argmax(partial))
            lines = _data_lines(raw, header, codec)
            found = _field_count_error(
                path, lines[row : row + 1], sep, n_fields, first_line + row, quoted
            )
            if found is not None:
                raise found
            column = int(np.argmax(missing[row] & required))
            raise MovieLensFormatError(
                path, first_line + row, f"empty value in field {column + 1}: {lines[row][:120]!r}"
            )
        if blank.any():
            frame = frame[~blank]
        for col in optional_columns:
            frame[col] = frame[col].fillna("")
        if frame.empty:
            raise MovieLensFormatError(path, None, "no data rows (truncated file?)")
    return frame, first_line


def _data_lines(raw: bytes, header: bool, codec: str) -> list[str]:
    text = raw.decode(codec, "replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines[1:] if header else lines


def read_header(path: Path, sep: str, encoding: str) -> list[str]:
    """Field names of the first line (stripped, BOM removed), for CSV-with-header files."""
    with open(path, "rb") as handle:
        first = handle.readline()
    if not first.strip():
        raise MovieLensFormatError(path, 1, "empty first line: expected a header")
    if b"\x00" in first:
        raise MovieLensFormatError(
            path, 1, "NUL byte in the header: wrong encoding (UTF-16?) or a binary file"
        )
    text = first.decode("utf-8" if "utf" in encoding.lower() else "latin-1", "replace")
    text = text.removeprefix("\ufeff").rstrip("\r\n")
    return [name.strip().strip('"') for name in text.split(sep)]


def _bad_row(series: pd.Series, bad: np.ndarray, path: Path, first_line: int, what: str) -> None:
    if bad.any():
        pos = int(np.argmax(bad))
        row = int(series.index[pos])
        value = series.iloc[pos]
        if isinstance(value, np.generic):
            value = value.item()
        raise MovieLensFormatError(path, first_line + row, f"{what}, got {value!r}")


def as_int(series: pd.Series, path: Path, first_line: int, column: str) -> pd.Series:
    """Column as int64; non-integer values raise with the line (integer-valued floats pass)."""
    if is_integer_dtype(series.dtype):
        if series.dtype == np.uint64:  # values beyond int64
            bad = series.to_numpy() > np.iinfo(np.int64).max
            _bad_row(series, bad, path, first_line, f"column {column!r} does not fit in int64")
        return series.astype(np.int64)
    numeric = series if is_float_dtype(series.dtype) else pd.to_numeric(series, errors="coerce")
    values = numeric.to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(values) | (values != np.round(values)) | (np.abs(values) >= 2.0**63)
    hint = ""
    if bad.any() and _looks_like_name(series.iloc[int(np.argmax(bad))]):
        hint = " (a repeated header line?)"
    _bad_row(series, bad, path, first_line, f"column {column!r} must be an integer{hint}")
    return pd.Series(values.astype(np.int64), index=series.index, name=series.name)


def _looks_like_name(value: object) -> bool:
    return isinstance(value, str) and bool(re.fullmatch(r"\s*[A-Za-z_\"][\w\" -]*\s*", value))


def as_float(series: pd.Series, path: Path, first_line: int, column: str) -> pd.Series:
    """Column as float64; non-numeric or non-finite values raise with the line."""
    if is_integer_dtype(series.dtype) or is_float_dtype(series.dtype):
        numeric = series
    else:
        numeric = pd.to_numeric(series, errors="coerce")
    values = numeric.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    hint = ""
    if bad.any() and _looks_like_name(series.iloc[int(np.argmax(bad))]):
        hint = " (a repeated header line?)"
    _bad_row(series, bad, path, first_line, f"column {column!r} must be a number{hint}")
    return pd.Series(values, index=series.index, name=series.name)


def check_values(
    series: pd.Series,
    allowed: np.ndarray | None,
    value_range: tuple[float, float] | None,
    path: Path,
    first_line: int,
    column: str,
) -> None:
    """Raise with the line of the first value outside ``allowed`` / ``value_range``."""
    values = series.to_numpy()
    if allowed is not None:
        bad = ~np.isin(values, allowed)
        shown = ", ".join(f"{v:g}" for v in allowed)
        _bad_row(series, bad, path, first_line, f"{column} out of range (allowed: {shown})")
    if value_range is not None:
        low, high = value_range
        bad = (values < low) | (values > high)
        _bad_row(series, bad, path, first_line, f"{column} out of range [{low:g}, {high:g}]")
