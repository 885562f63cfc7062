"""Download into the cache: checksum verification, atomic extraction, offline errors.

No network: the "GroupLens" archive is a zip built in tmp and served through a file:// URL or
a monkeypatched ``fetch``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import pytest
from movielens_fixtures import make_ratings, make_release_zip, write_ml1m, write_ml100k

from vq_torchrec.datasets import (
    ChecksumMismatchError,
    MovieLensNotFoundError,
    cache_dir,
    load_movielens,
)
from vq_torchrec.datasets import download as download_mod
from vq_torchrec.datasets import releases as releases_mod


def _digest_tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VQ_TORCHREC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "movielens"


def _serve(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    archive: Path,
    *,
    sha256: str | None,
    md5: str | None = None,
) -> None:
    """Point release ``name`` at ``archive`` (file:// URL) with the given checksums."""
    release = releases_mod.RELEASES[name]
    patched = dataclasses.replace(release, sha256=sha256, md5=md5, size=None)
    monkeypatch.setitem(releases_mod.RELEASES, name, patched)
    monkeypatch.setattr(type(patched), "url", property(lambda self: archive.as_uri()), raising=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cache_location(cache: Path) -> None:
    assert cache_dir("ml-1m") == cache / "ml-1m"


def test_download_verifies_and_extracts(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = make_release_zip("ml-1m", "ml-1m", tmp_path / "ml-1m.zip")
    _serve(
        monkeypatch,
        "ml-1m",
        archive,
        sha256=_sha256(archive),
        md5=hashlib.md5(archive.read_bytes()).hexdigest(),
    )
    data = load_movielens("ml-1m")
    assert data.root == cache / "ml-1m"
    assert sorted(p.name for p in (cache / "ml-1m").iterdir()) == [
        "movies.dat",
        "ratings.dat",
        "users.dat",
    ]
    assert [p.name for p in cache.iterdir()] == ["ml-1m"]  # no temp folder left behind
    assert len(data.ratings) > 0 and data.users is not None
    # second call reads the cache and does not fetch again
    monkeypatch.setattr(download_mod, "fetch", lambda url, dest: pytest.fail("fetched twice"))
    assert len(load_movielens("ml-1m").ratings) == len(data.ratings)


def test_download_through_monkeypatched_fetch(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = make_release_zip("ml-100k", "ml-100k", tmp_path / "ml-100k.zip")
    release = releases_mod.RELEASES["ml-100k"]
    monkeypatch.setitem(
        releases_mod.RELEASES,
        "ml-100k",
        dataclasses.replace(release, sha256=_sha256(archive), md5=None, size=None),
    )
    seen = []

    def fake_fetch(url: str, destination: Path) -> None:
        seen.append(url)
        destination.write_bytes(archive.read_bytes())

    monkeypatch.setattr(download_mod, "fetch", fake_fetch)
    data = load_movielens("ml-100k")
    assert seen == ["https://files.grouplens.org/datasets/movielens/ml-100k.zip"]
    assert len(data.items) == 8


def test_checksum_mismatch_leaves_cache_untouched(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_ml100k(cache / "ml-100k")  # an existing, good cache entry
    before = _digest_tree(cache)
    archive = make_release_zip("ml-1m", "ml-1m", tmp_path / "ml-1m.zip")
    _serve(monkeypatch, "ml-1m", archive, sha256="0" * 64)
    with pytest.raises(ChecksumMismatchError, match="checksum mismatch.*sha256"):
        load_movielens("ml-1m")
    assert _digest_tree(cache) == before
    assert sorted(p.name for p in cache.iterdir()) == ["ml-100k"]  # no ml-1m, no temp folder


def test_md5_mismatch_is_checked_too(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = make_release_zip("ml-10m", "ml-10M100K", tmp_path / "ml-10m.zip")
    _serve(monkeypatch, "ml-10m", archive, sha256=None, md5="f" * 32)
    with pytest.raises(ChecksumMismatchError, match="md5"):
        load_movielens("ml-10m")
    assert not (cache / "ml-10m").exists()


def test_unknown_checksum_warns_loudly(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = make_release_zip("ml-latest", "ml-latest", tmp_path / "ml-latest.zip")
    _serve(monkeypatch, "ml-latest", archive, sha256=None, md5=None)
    with pytest.warns(UserWarning, match="NO CHECKSUM"):
        data = load_movielens("ml-latest")
    assert len(data.ratings) > 0


def test_crash_during_extraction_leaves_no_half_cache(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = make_release_zip("ml-1m", "ml-1m", tmp_path / "ml-1m.zip")
    _serve(monkeypatch, "ml-1m", archive, sha256=_sha256(archive))

    def crash(archive_path: Path, target: Path) -> None:
        target.mkdir()
        (target / "ml-1m").mkdir()
        (target / "ml-1m" / "ratings.dat").write_text("1::1::")  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(download_mod, "_safe_extract", crash)
    with pytest.raises(KeyboardInterrupt):
        load_movielens("ml-1m")
    assert list(cache.iterdir()) == []


def test_zip_with_unsafe_paths_is_rejected(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("../escape.txt", "x")
    _serve(monkeypatch, "ml-1m", archive, sha256=_sha256(archive))
    with pytest.raises(ValueError, match="unsafe path"):
        load_movielens("ml-1m")
    assert not (tmp_path / "cache" / "escape.txt").exists() and list(cache.iterdir()) == []


def test_offline_error_says_what_to_put_where(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(monkeypatch, "ml-1m", tmp_path / "does-not-exist.zip", sha256=None)
    with pytest.raises(MovieLensNotFoundError) as err:
        load_movielens("ml-1m")
    message = str(err.value)
    for fragment in ("ratings.dat", "movies.dat", "users.dat", str(cache / "ml-1m"), "ml-1m.zip"):
        assert fragment in message
    assert list(cache.iterdir()) == []


def test_download_false_does_not_fetch(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download_mod, "fetch", lambda url, dest: pytest.fail("must not fetch"))
    with pytest.raises(MovieLensNotFoundError, match=r"u\.data.*download=False"):
        load_movielens("ml-100k", download=False)


def test_concurrent_download_keeps_the_winner(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ranks downloading at once: the one that renames second keeps the first's folder."""
    archive = make_release_zip("ml-1m", "ml-1m", tmp_path / "ml-1m.zip")
    _serve(monkeypatch, "ml-1m", archive, sha256=_sha256(archive))
    winner = tmp_path / "winner"
    write_ml1m(winner, make_ratings(seed=9))  # differs from the archive
    original_fetch = download_mod.fetch

    def fetch_while_other_rank_finishes(url: str, destination: Path) -> None:
        original_fetch(url, destination)
        winner.rename(cache / "ml-1m")  # the other rank's rename lands first

    monkeypatch.setattr(download_mod, "fetch", fetch_while_other_rank_finishes)
    expected = _digest_tree(winner)
    assert download_mod.download_release("ml-1m") == cache / "ml-1m"
    assert _digest_tree(cache / "ml-1m") == expected  # the winner's files, untouched
    assert [p.name for p in cache.iterdir()] == ["ml-1m"]
