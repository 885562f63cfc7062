"""Hostile data files: every malformed input gives MovieLensFormatError naming file and line,
and nothing already on disk (the cache) is modified by a failed load."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from movielens_fixtures import (
    write_csv_release,
    write_ml1m,
    write_ml1m_notime,
    write_ml100k,
)

from vq_torchrec.datasets import MovieLensFormatError, load_movielens, load_ratings_file


def _edit_lines(path: Path, edit: Callable[[list[bytes]], list[bytes]]) -> None:
    lines = path.read_bytes().split(b"\n")[:-1]
    path.write_bytes(b"".join(line + b"\n" for line in edit(lines)))


def _replace_line(number: int, text: bytes) -> Callable[[list[bytes]], list[bytes]]:
    def edit(lines: list[bytes]) -> list[bytes]:
        lines[number - 1] = text
        return lines

    return edit


def _expect(loader: Callable[[], object], path: Path, line: int | None, fragment: str) -> None:
    with pytest.raises(MovieLensFormatError) as err:
        loader()
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert err.value.path == path and str(path) in message
    assert err.value.line == line
    if line is not None:
        assert f"line {line}:" in message
    assert fragment in message, message


def _ml1m(tmp_path: Path) -> Path:
    write_ml1m(tmp_path)
    return tmp_path


def test_truncated_last_line(tmp_path: Path) -> None:
    root = _ml1m(tmp_path)
    path = root / "ratings.dat"
    raw = path.read_bytes()
    n_lines = raw.count(b"\n")
    path.write_bytes(raw[:-7])  # cut inside the last timestamp, no final newline
    _expect(lambda: load_movielens("ml-1m", root=root), path, n_lines, "looks truncated")


def test_truncated_line_missing_fields(tmp_path: Path) -> None:
    root = _ml1m(tmp_path)
    path = root / "ratings.dat"
    _edit_lines(path, _replace_line(7, b"3::4::5"))
    _expect(
        lambda: load_movielens("ml-1m", root=root),
        path,
        7,
        "expected 4 '::'-separated fields, found 3",
    )


def test_truncated_file_empty(tmp_path: Path) -> None:
    root = _ml1m(tmp_path)
    path = root / "movies.dat"
    path.write_bytes(b"")
    _expect(lambda: load_movielens("ml-1m", root=root), path, None, "file is empty")


def test_wrong_separator_dat(tmp_path: Path) -> None:
    root = _ml1m(tmp_path)
    path = root / "ratings.dat"
    path.write_bytes(path.read_bytes().replace(b"::", b","))
    _expect(
        lambda: load_movielens("ml-1m", root=root), path, 1, "comma-separated: wrong separator?"
    )


def test_wrong_separator_one_line_ml100k(tmp_path: Path) -> None:
    write_ml100k(tmp_path)
    path = tmp_path / "u.data"
    _edit_lines(path, _replace_line(12, b"3|4|5|881250949"))
    _expect(lambda: load_movielens("ml-100k", root=tmp_path), path, 12, "pipe-separated")


def test_too_many_fields(tmp_path: Path) -> None:
    root = _ml1m(tmp_path)
    path = root / "users.dat"
    _edit_lines(path, _replace_line(4, b"4::M::45::7::02460::extra"))
    _expect(
        lambda: load_movielens("ml-1m", root=root),
        path,
        4,
        "expected 5 '::'-separated fields, found 6",
    )


def test_wrong_encoding_utf16(tmp_path: Path) -> None:
    root = _ml1m(tmp_path)
    path = root / "movies.dat"
    path.write_bytes(path.read_bytes().decode("latin-1").encode("utf-16"))
    _expect(lambda: load_movielens("ml-1m", root=root), path, 1, "wrong encoding (UTF-16?)")


def test_wrong_encoding_utf8_instead_of_latin1(tmp_path: Path) -> None:
    write_ml100k(tmp_path)
    path = tmp_path / "u.item"
    path.write_bytes(path.read_bytes().decode("latin-1").encode("utf-8"))
    # item 2 ("Misérables") on line 2 is the first non-ASCII line
    _expect(lambda: load_movielens("ml-100k", root=tmp_path), path, 2, "UTF-8 encoded but")


def test_wrong_encoding_latin1_instead_of_utf8(tmp_path: Path) -> None:
    write_csv_release(tmp_path)
    path = tmp_path / "movies.csv"
    path.write_bytes(path.read_bytes().decode("utf-8").encode("latin-1"))
    _expect(lambda: load_movielens("ml-25m", root=tmp_path), path, 3, "not valid UTF-8")


def test_missing_column_csv_release(tmp_path: Path) -> None:
    write_csv_release(tmp_path)
    path = tmp_path / "ratings.csv"
    lines = path.read_text().splitlines()
    path.write_text(
        "\n".join(",".join(line.split(",")[:2] + line.split(",")[3:]) for line in lines) + "\n"
    )
    _expect(
        lambda: load_movielens("ml-20m", root=tmp_path), path, 1, "missing column(s) ['rating']"
    )


def test_missing_column_ratings_csv_fallback(tmp_path: Path) -> None:
    write_ml1m_notime(tmp_path)
    path = tmp_path / "ratings.csv"
    path.write_text("userId,movieId\n1,2\n")
    _expect(lambda: load_movielens("ml-1m", root=tmp_path), path, 1, "missing column for rating")


def test_missing_column_generic(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("user,rating\n1,4\n")
    _expect(lambda: load_ratings_file(path), path, 1, "missing column for item_id")


def test_duplicated_header_csv(tmp_path: Path) -> None:
    write_csv_release(tmp_path)
    path = tmp_path / "ratings.csv"
    _edit_lines(path, lambda lines: lines[:5] + [lines[0]] + lines[5:])
    _expect(lambda: load_movielens("ml-latest-small", root=tmp_path), path, 6, "repeated header")


def test_header_in_headerless_file(tmp_path: Path) -> None:
    write_ml100k(tmp_path)
    path = tmp_path / "u.data"
    _edit_lines(path, lambda lines: [b"user_id\titem_id\trating\ttimestamp"] + lines)
    _expect(lambda: load_movielens("ml-100k", root=tmp_path), path, 1, "must be an integer")


@pytest.mark.parametrize("bad", [b"6", b"0", b"4.5", b"-1"])
def test_rating_out_of_range(tmp_path: Path, bad: bytes) -> None:
    root = _ml1m(tmp_path)
    path = root / "ratings.dat"
    _edit_lines(path, _replace_line(9, b"2::3::" + bad + b"::978300760"))
    _expect(lambda: load_movielens("ml-1m", root=root), path, 9, "rating out of range")


def test_rating_out_of_range_half_star_release(tmp_path: Path) -> None:
    write_csv_release(tmp_path)
    path = tmp_path / "ratings.csv"
    _edit_lines(path, _replace_line(4, b"1,2,5.5,978300760"))
    _expect(lambda: load_movielens("ml-25m", root=tmp_path), path, 4, "rating out of range")


@pytest.mark.parametrize("bad", [b"abc", b"1.5", b"1e400"])
def test_non_integer_ids(tmp_path: Path, bad: bytes) -> None:
    root = _ml1m(tmp_path)
    path = root / "ratings.dat"
    _edit_lines(path, _replace_line(5, bad + b"::3::4::978300760"))
    _expect(lambda: load_movielens("ml-1m", root=root), path, 5, "'user_id' must be an integer")


def test_non_integer_item_id_in_items_table(tmp_path: Path) -> None:
    write_ml100k(tmp_path)
    path = tmp_path / "u.item"
    _edit_lines(path, lambda lines: lines[:2] + [b"x" + lines[2]] + lines[3:])
    _expect(
        lambda: load_movielens("ml-100k", root=tmp_path), path, 3, "'item_id' must be an integer"
    )


def test_bad_genre_flag(tmp_path: Path) -> None:
    write_ml100k(tmp_path)
    path = tmp_path / "u.item"
    _edit_lines(path, lambda lines: lines[:3] + [lines[3][:-1] + b"2"] + lines[4:])
    _expect(lambda: load_movielens("ml-100k", root=tmp_path), path, 4, "must be 0 or 1")


def test_empty_field(tmp_path: Path) -> None:
    root = _ml1m(tmp_path)
    path = root / "ratings.dat"
    _edit_lines(path, _replace_line(3, b"1::::4::978300760"))
    _expect(lambda: load_movielens("ml-1m", root=root), path, 3, "empty value in field 2")


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    root = _ml1m(tmp_path)
    path = root / "ratings.dat"
    _edit_lines(
        path, lambda lines: lines[:2] + [b""] + lines[2:5] + [b"1::2::9::978300760"] + lines[5:]
    )
    _expect(lambda: load_movielens("ml-1m", root=root), path, 7, "rating out of range")


def _digest_tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_failed_load_leaves_cache_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VQ_TORCHREC_CACHE", str(tmp_path / "cache"))
    good = tmp_path / "cache" / "movielens" / "ml-100k"
    write_ml100k(good)
    bad = tmp_path / "cache" / "movielens" / "ml-1m"
    write_ml1m(bad)
    _edit_lines(bad / "ratings.dat", _replace_line(2, b"1::2::3"))
    before = _digest_tree(tmp_path / "cache")
    _expect(lambda: load_movielens("ml-1m", download=True), bad / "ratings.dat", 2, "found 3")
    assert _digest_tree(tmp_path / "cache") == before  # no re-download, no rewrite, no extra files
    assert len(load_movielens("ml-100k", download=False).ratings) > 0


def test_truncated_at_line_boundary_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _ml1m(tmp_path)
    with caplog.at_level("WARNING", logger="vq_torchrec.datasets.movielens"):
        data = load_movielens("ml-1m", root=root)
    assert f"{len(data.ratings):,} ratings, but the official ml-1m has 1,000,209" in caplog.text


def test_extra_field_in_quoted_csv_blames_the_right_line(tmp_path: Path) -> None:
    write_csv_release(tmp_path)
    path = tmp_path / "movies.csv"
    # line 3 holds a legitimately quoted title with a comma; line 6 gets a stray field
    _edit_lines(path, lambda lines: lines[:5] + [lines[5] + b",oops"] + lines[6:])
    _expect(
        lambda: load_movielens("ml-20m", root=tmp_path),
        path,
        6,
        "expected 3 comma-separated fields, found 4",
    )
