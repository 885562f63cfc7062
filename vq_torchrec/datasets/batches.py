"""MovieLensBatches: deterministic, rank-sliced, resumable batches of ``torchrec`` ``Batch``."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torchrec.datasets.utils import Batch

from vq_torchrec.datasets.features import EncodedRatings


class MovieLensBatches:
    """Iterate ``Batch(dense_features (B, n_dense), sparse_features KJT, labels (B,))``.

    Order: with ``shuffle`` a permutation drawn from ``numpy.random.default_rng([seed, epoch])``
    (so it depends only on ``seed`` and the epoch set by :meth:`set_epoch`), else file order.

    Ranks: the epoch's order is made a multiple of ``world_size`` -- padded by wrapping around
    (``drop_last=False``, a few rows repeat, as ``DistributedSampler`` does) or cut
    (``drop_last=True``) -- and rank ``r`` takes rows ``r, r + W, r + 2W, ...``. So the ranks'
    rows are disjoint (up to the padding) and every rank yields the same number of batches of
    the same sizes, which the collectives of ``DistributedModelParallel`` need.

    Resume: :meth:`skip_batches` makes the next iteration start at that batch of the epoch.

    Args:
        encoded: the encoded ratings.
        batch_size: rows per batch (per rank).
        shuffle: shuffle each epoch.
        seed: shuffle seed.
        drop_last: drop the last partial batch (and the rows that do not divide among ranks).
        rank, world_size: this process's slice.
    """

    def __init__(
        self,
        encoded: EncodedRatings,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if len(encoded) == 0:
            raise ValueError("no rows to batch")
        self.encoded = encoded
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration uses."""
        self.epoch = epoch

    def skip_batches(self, n: int) -> None:
        """Start the next iteration at batch ``n`` of the current epoch (for resuming)."""
        if not 0 <= n <= len(self):
            raise ValueError(f"cannot skip {n} batches of an epoch of {len(self)}")
        self._skip = n

    @property
    def rows_per_rank(self) -> int:
        n, w = len(self.encoded), self.world_size
        return n // w if self.drop_last else -(-n // w)

    def __len__(self) -> int:
        per_rank = self.rows_per_rank
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def rank_rows(self) -> torch.Tensor:
        """``(rows_per_rank,)`` int64: this rank's rows of the current epoch, in batch order."""
        n = len(self.encoded)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        else:
            order = np.arange(n)
        total = self.rows_per_rank * self.world_size
        if total > n:
            order = np.concatenate([order, order[: total - n]])
        else:
            order = order[:total]
        return torch.from_numpy(np.ascontiguousarray(order[self.rank : total : self.world_size]))

    def padding_mask(self, batch_index: int) -> torch.Tensor:
        """``(B,)`` bool: True for the rows of batch ``batch_index`` that only pad this rank
        (duplicates added so ranks have equal sizes). Exclude them when computing exact
        evaluation metrics under ``world_size > 1``; all False on a single process."""
        positions = torch.arange(self.rank, self.rows_per_rank * self.world_size, self.world_size)
        chunk = positions[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
        return chunk >= len(self.encoded)

    def batch(self, rows: torch.Tensor) -> Batch:
        """The ``Batch`` of rows ``rows`` (``(B,)`` int64)."""
        dense, sparse, labels = self.encoded.rows(rows)
        return Batch(dense_features=dense, sparse_features=sparse, labels=labels)

    def __iter__(self) -> Iterator[Batch]:
        start, self._skip = self._skip, 0
        rows = self.rank_rows()
        for b in range(start, len(self)):
            yield self.batch(rows[b * self.batch_size : (b + 1) * self.batch_size])
