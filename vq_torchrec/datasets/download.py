"""Download cache for the MovieLens releases: checksum-verified, extracted atomically.

Cache layout: ``<cache root>/<name>/`` holds one release's files directly (``u.data``, ...),
where the cache root is ``$VQ_TORCHREC_CACHE/movielens`` when that variable is set, else
``~/.cache/vq_torchrec/movielens``.

A release folder appears in the cache only by one ``os.rename`` of a fully extracted and
verified temporary folder living next to it, so a crash at any moment leaves either no folder
or a complete one (plus, at worst, a hidden ``.<name>.tmp-*`` folder that is never read).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path, PurePosixPath

from vq_torchrec.datasets.errors import ChecksumMismatchError, MovieLensNotFoundError
from vq_torchrec.datasets.releases import MovieLensRelease, get_release

CACHE_ENV = "VQ_TORCHREC_CACHE"
_CHUNK = 1 << 20


def cache_root() -> Path:
    """``$VQ_TORCHREC_CACHE/movielens`` or ``~/.cache/vq_torchrec/movielens``."""
    base = os.environ.get(CACHE_ENV)
    if base:
        return Path(base).expanduser() / "movielens"
    return Path.home() / ".cache" / "vq_torchrec" / "movielens"


def cache_dir(name: str) -> Path:
    """The cache folder of release ``name`` (it may not exist)."""
    return cache_root() / get_release(name).name


def missing_files_message(release: MovieLensRelease, folder: Path, missing: list[str]) -> str:
    """Say exactly which files to put where."""
    extra = ""
    for nested in (folder / release.folder, folder / release.name):
        if nested.is_dir():
            extra += f" ({nested} exists: did you mean root={nested}?)"
            break
    if release.layout == "dat" and "ratings.dat" in missing:
        extra += " (a ratings.csv with userId,movieId,rating[,timestamp] is accepted instead of ratings.dat)"
    return (
        f"MovieLens {release.name}: missing {', '.join(missing)} in {folder}. "
        f"Put the files {', '.join(release.files)} of the official {release.archive} "
        f"({release.url}, folder {release.folder}/ inside the zip) directly in {folder}{extra}, "
        f"or pass root=<folder holding them>, or call with root=None and download=True when online "
        f"(cache: {cache_root()}, set ${CACHE_ENV} to move it)."
    )


def fetch(url: str, destination: Path) -> None:
    """Copy ``url`` (``https://``, ``file://``) to ``destination``. Tests monkeypatch this."""
    with urllib.request.urlopen(url, timeout=60) as response, open(destination, "wb") as out:
        shutil.copyfileobj(response, out, _CHUNK)


def file_digests(path: Path) -> tuple[str, str, int]:
    """``(sha256, md5, size)`` of a file."""
    sha, md5, size = hashlib.sha256(), hashlib.md5(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), md5.hexdigest(), size


def verify_archive(path: Path, release: MovieLensRelease) -> None:
    """Check every known checksum of ``release`` against ``path``; warn loudly if none is known.

    Raises:
        ChecksumMismatchError: any recorded checksum or size differs.
    """
    sha, md5, size = file_digests(path)
    problems = []
    if release.sha256 is not None and sha != release.sha256:
        problems.append(f"sha256 {sha} != expected {release.sha256}")
    if release.md5 is not None and md5 != release.md5:
        problems.append(f"md5 {md5} != expected {release.md5}")
    if release.size is not None and size != release.size:
        problems.append(f"size {size} != expected {release.size}")
    if problems:
        raise ChecksumMismatchError(
            f"{release.archive} from {release.url}: checksum mismatch ({'; '.join(problems)}). "
            "The download is corrupt or the file was changed upstream; nothing was written to "
            "the cache."
        )
    if release.sha256 is None and release.md5 is None:
        warnings.warn(
            f"NO CHECKSUM is recorded for {release.archive} (GroupLens rebuilds it from time to "
            f"time): the download (sha256 {sha}, {size} bytes) is used UNVERIFIED.",
            UserWarning,
            stacklevel=3,
        )


def _safe_extract(archive: Path, target: Path) -> None:
    with zipfile.ZipFile(archive) as zipped:
        for member in zipped.namelist():
            parts = PurePosixPath(member).parts
            if member.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise ValueError(f"{archive}: unsafe path {member!r} in the zip")
        zipped.extractall(target)


def _release_folder(extracted: Path, release: MovieLensRelease) -> Path:
    candidates = [extracted / release.folder, extracted]
    children = [p for p in extracted.iterdir() if p.is_dir() and not p.name.startswith("__")]
    if len(children) == 1:
        candidates.append(children[0])
    for folder in candidates:
        if all((folder / f).is_file() for f in release.files):
            return folder
    raise ValueError(
        f"{release.archive}: the archive does not contain {', '.join(release.files)} "
        f"under {release.folder}/"
    )


def download_release(name: str, root: Path | None = None) -> Path:
    """Download, verify and extract release ``name`` into ``root / name`` (default cache root).

    Returns the release folder. An existing folder is returned untouched.

    Raises:
        MovieLensNotFoundError: offline / URL unreachable (with where to put the files).
        ChecksumMismatchError: the archive does not match; the cache is left as it was.
    """
    release = get_release(name)
    root = cache_root() if root is None else Path(root)
    target = root / release.name
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{release.name}.tmp-", dir=root))
    try:
        archive = work / release.archive
        try:
            fetch(release.url, archive)
        except (urllib.error.URLError, OSError) as err:
            raise MovieLensNotFoundError(
                f"could not download {release.url} ({err}). "
                + missing_files_message(release, target, list(release.files))
            ) from err
        verify_archive(archive, release)
        extracted = work / "extracted"
        _safe_extract(archive, extracted)
        folder = _release_folder(extracted, release)
        try:
            os.rename(folder, target)
        except OSError:
            if not target.is_dir():  # a concurrent process may have won the race: fine
                raise
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)
