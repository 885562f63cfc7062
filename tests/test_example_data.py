"""A tiny ml-100k-format release for the example / resume tests (plus a check that it loads).

``write_tiny_ml100k(folder)`` writes ``u.data``, ``u.item``, ``u.user`` in the official
formats (tab / pipe, latin-1) with ratings that carry signal (user and item biases), so a
model trained on it reaches an AUC clearly above 0.5 in a few steps.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "dlrm_movielens.py"
GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
]
OCCUPATIONS = ["technician", "other", "writer", "executive", "student", "artist"]
WORDS = ["Star", "Heat", "Love", "Night", "Café", "Story", "Wars", "Dream", "City", "Dark"]


def write_tiny_ml100k(
    folder: Path, n_users: int = 48, n_items: int = 40, per_user: int = 18, seed: int = 0
) -> Path:
    """Write the release into ``folder`` and return it."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    user_bias = rng.normal(0, 1.0, n_users + 1)
    item_bias = rng.normal(0, 1.0, n_items + 1)
    lines = []
    for u in range(1, n_users + 1):
        items = rng.choice(np.arange(1, n_items + 1), size=per_user, replace=False)
        for k, i in enumerate(items):
            score = user_bias[u] + item_bias[i] + rng.normal(0, 0.7)
            rating = int(np.clip(np.round(3.3 + score), 1, 5))
            lines.append(f"{u}\t{i}\t{rating}\t{880000000 + 1000 * u + 7 * k}\n")
    (folder / "u.data").write_bytes("".join(lines).encode("latin-1"))
    items_txt = []
    for i in range(1, n_items + 1):
        title = f"{WORDS[i % len(WORDS)]} {WORDS[(3 * i) % len(WORDS)]} ({1970 + i % 25})"
        flags = ["0"] * len(GENRES)
        for g in rng.choice(np.arange(1, len(GENRES)), size=1 + i % 3, replace=False):
            flags[g] = "1"
        year = 1970 + i % 25
        items_txt.append(
            f"{i}|{title}|01-Jan-{year}||http://us.imdb.com/M/title-exact?{i}|{'|'.join(flags)}\n"
        )
    (folder / "u.item").write_bytes("".join(items_txt).encode("latin-1"))
    users_txt = [
        f"{u}|{18 + u % 50}|{'MF'[u % 2]}|{OCCUPATIONS[u % len(OCCUPATIONS)]}|{10000 + 37 * u}\n"
        for u in range(1, n_users + 1)
    ]
    (folder / "u.user").write_bytes("".join(users_txt).encode("latin-1"))
    return folder


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def example_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MOVIELENS_ROOT", None)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def example_cmd(data: Path, out: Path, *args: str, nproc: int = 0, max_restarts: int = 0) -> list[str]:
    """Command line of the example (under ``torch.distributed.run`` when ``nproc``)."""
    base = [
        str(EXAMPLE), "--data-root", str(data), "--output", str(out), "--no-progress",
        "--no-download", "--batch-size", "64", "--eval-batch-size", "128", "--embedding-dim", "8",
        "--codebook-size", "16", "--dense-arch", "16", "--over-arch", "16",
    ]
    if nproc:
        launcher = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", f"--max-restarts={max_restarts}",
            "--monitor-interval=0.2",
        ]
        return launcher + base + list(args)
    return [sys.executable] + base + list(args)


def run_example(cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=example_env())
    if proc.returncode != 0:
        raise AssertionError(
            f"example failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def test_tiny_release_loads(tmp_path: Path) -> None:
    from vq_torchrec.datasets import load_movielens

    data = load_movielens("ml-100k", root=write_tiny_ml100k(tmp_path / "ml-100k"))
    assert len(data.ratings) == 48 * 18
    assert data.users is not None and len(data.users) == 48
    assert data.items is not None and len(data.items) == 40
    assert set(data.ratings["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    # both classes present after binarizing (AUC is defined)
    assert 0.2 < float((data.ratings["rating"] >= 4).mean()) < 0.8
