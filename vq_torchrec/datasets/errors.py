"""Errors raised by the MovieLens data layer."""

from __future__ import annotations

from pathlib import Path


class MovieLensFormatError(ValueError):
    """A data file does not have the expected format.

    The message always starts with ``"<file>, line <n>: "`` (or ``"<file>: "`` when the problem
    is not tied to one line, e.g. an empty file), so the user can open the file at that line.

    Attributes:
        path: the offending file.
        line: 1-based physical line number in that file, or ``None``.
        reason: the message without the location prefix.
    """

    def __init__(self, path: str | Path, line: int | None, reason: str) -> None:
        self.path = Path(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}, line {line}" if line is not None else f"{self.path}"
        super().__init__(f"{where}: {reason}")


class MovieLensNotFoundError(FileNotFoundError):
    """The files of a release are not present locally and could not be downloaded."""


class ChecksumMismatchError(ValueError):
    """A downloaded archive does not match the checksum recorded for it."""
