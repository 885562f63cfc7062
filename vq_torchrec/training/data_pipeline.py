"""MovieLens -> encoded train/val/test splits -> per-rank batch iterators.

Glue over :mod:`vq_torchrec.datasets` used by the example and the quality benchmark:
load a release, binarize ratings (``rating >= threshold`` positive, optionally drop the
neutral 3s), split (seeded random 8:1:1 or per-user temporal leave-last-out), fit the feature
encoder on the catalogue + train split, and build ``MovieLensBatches`` sharded by rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vq_torchrec.training.dist_env import DistEnv

Split = Literal["random", "temporal"]


def release_name(dataset: str) -> str:
    """The MovieLens release a dataset folder name holds: ``"ml-1m-notime"`` -> ``"ml-1m"``
    (a variant folder of a release, e.g. ``$MOVIELENS_ROOT/ml-1m-notime``), else ``dataset``."""
    from vq_torchrec.datasets import RELEASES

    key = dataset.strip().lower()
    if key in RELEASES or f"ml-{key}" in RELEASES:
        return dataset
    for name in sorted(RELEASES, key=len, reverse=True):
        if key.startswith(name + "-"):
            return name
    return dataset


def resolve_data_root(dataset: str, data_root: str | os.PathLike[str] | None) -> Path | None:
    """``data_root`` if given, else ``$MOVIELENS_ROOT/<dataset>`` if that variable is set,
    else ``None`` (the loader's download cache)."""
    if data_root is not None:
        path = Path(data_root)
        if not path.exists():
            raise FileNotFoundError(f"--data-root {path} does not exist")
        return path
    env_root = os.environ.get("MOVIELENS_ROOT")
    if env_root:
        path = Path(env_root) / dataset
        if not path.exists():
            raise FileNotFoundError(
                f"MOVIELENS_ROOT={env_root} has no folder {dataset!r}; put the release's files "
                f"in {path} or pass --data-root"
            )
        return path
    return None


@dataclass
class PreparedData:
    """Encoded splits plus what the model builder needs.

    Attributes:
        train, val, test: encoded splits (``FeatureEncoder.transform`` outputs).
        sparse_feature_sizes: ``{feature: vocabulary size}``.
        num_dense: number of dense features.
        sizes: ``{"train", "val", "test"}`` example counts.
    """

    train: Any
    val: Any
    test: Any
    sparse_feature_sizes: dict[str, int]
    num_dense: int
    sizes: dict[str, int]
    positive_rate: float


def prepare_movielens(
    dataset: str = "ml-100k",
    data_root: str | os.PathLike[str] | None = None,
    split: Split = "random",
    seed: int = 0,
    threshold: float = 4.0,
    drop_neutral: bool = False,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    download: bool = True,
) -> PreparedData:
    """Load, binarize, split and encode one MovieLens release (see module docstring)."""
    from vq_torchrec import datasets as ds

    if split not in ("random", "temporal"):
        raise ValueError(f"split must be 'random' or 'temporal', got {split!r}")
    root = resolve_data_root(dataset, data_root)
    data = ds.load_movielens(release_name(dataset), root=root, download=download)
    ratings = ds.binarize(data.ratings, threshold=threshold, drop_neutral=drop_neutral)
    if split == "random":
        train, val, test = ds.random_split(ratings, ratios=ratios, seed=seed)
    else:
        if "timestamp" not in ratings.columns:
            raise ValueError(
                f"--split temporal needs timestamps, but {dataset} has none; use --split random"
            )
        train, val, test = ds.temporal_leave_last_out(ratings)
    encoder = ds.FeatureEncoder(id_source="catalogue").fit(train, data.users, data.items)
    enc = [encoder.transform(part) for part in (train, val, test)]
    labels = train["label"] if "label" in train.columns else None
    pos = float(labels.mean()) if labels is not None and len(labels) else float("nan")
    return PreparedData(
        train=enc[0],
        val=enc[1],
        test=enc[2],
        sparse_feature_sizes=dict(encoder.sparse_feature_sizes),
        num_dense=len(encoder.dense_feature_names),
        sizes={"train": len(train), "val": len(val), "test": len(test)},
        positive_rate=pos,
    )


def make_batches(
    encoded: Any,
    batch_size: int,
    env: DistEnv,
    shuffle: bool,
    seed: int,
    drop_last: bool,
) -> Any:
    """``MovieLensBatches`` over ``encoded`` for this rank (``batch_size`` is per rank)."""
    from vq_torchrec.datasets import MovieLensBatches

    return MovieLensBatches(
        encoded,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        rank=env.rank,
        world_size=env.world_size,
    )
