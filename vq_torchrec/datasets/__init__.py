"""MovieLens data: loaders, splits, labels, DLRM features and batches.

Typical pipeline (the RecBole ml-1m CTR protocol)::

    from vq_torchrec.datasets import (
        FeatureEncoder, MovieLensBatches, binarize, load_movielens, random_split,
    )

    data = load_movielens("ml-1m", root="/data/movielens/ml-1m")  # or root=None: cache/download
    labelled = binarize(data.ratings, threshold=4.0, drop_neutral=True)
    train, val, test = random_split(labelled, ratios=(0.8, 0.1, 0.1), seed=0)
    encoder = FeatureEncoder().fit(train, data.users, data.items)  # frozen vocabularies
    tables = encoder.sparse_feature_sizes          # {key: num_embeddings}, key order = KJT order
    n_dense = len(encoder.dense_feature_names)     # >= 1
    batches = MovieLensBatches(encoder.transform(train), batch_size=4096, shuffle=True, seed=0,
                               rank=rank, world_size=world_size)
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        for batch in batches:  # torchrec.datasets.utils.Batch
            ...

Errors: malformed files raise :class:`MovieLensFormatError` (a ``ValueError``) whose message
starts with ``"<file>, line <n>: "``; missing files raise :class:`MovieLensNotFoundError`
saying which files to put where.
"""

from vq_torchrec.datasets.batches import MovieLensBatches
from vq_torchrec.datasets.data import MovieLensData
from vq_torchrec.datasets.download import cache_dir, cache_root, download_release
from vq_torchrec.datasets.errors import (
    ChecksumMismatchError,
    MovieLensFormatError,
    MovieLensNotFoundError,
)
from vq_torchrec.datasets.features import EncodedRatings, FeatureEncoder, Vocabulary
from vq_torchrec.datasets.generic import load_ratings_file
from vq_torchrec.datasets.labels import binarize
from vq_torchrec.datasets.movielens import load_movielens
from vq_torchrec.datasets.releases import RELEASES, MovieLensRelease, get_release
from vq_torchrec.datasets.splits import random_split, temporal_leave_last_out

__all__ = [
    "RELEASES",
    "ChecksumMismatchError",
    "EncodedRatings",
    "FeatureEncoder",
    "MovieLensBatches",
    "MovieLensData",
    "MovieLensFormatError",
    "MovieLensNotFoundError",
    "MovieLensRelease",
    "Vocabulary",
    "binarize",
    "cache_dir",
    "cache_root",
    "download_release",
    "get_release",
    "load_movielens",
    "load_ratings_file",
    "random_split",
    "temporal_leave_last_out",
]
