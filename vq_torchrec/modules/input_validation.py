"""Checks a KeyedJaggedTensor before the embedding lookup (an FX leaf module)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

_ID_DTYPES = (torch.int32, torch.int64)


class KJTValidator(nn.Module):
    """Raises a clear error for input a TorchRec lookup would mis-handle.

    Checked: the input is a ``KeyedJaggedTensor``; its keys are exactly the collection's
    features (unknown or missing keys); ids are int32/int64 (not float); lengths are
    non-negative and sum to the number of ids; every id is in ``[0, num_embeddings)`` of
    its table (a sharded TBE would otherwise clamp it silently); weights present and
    floating iff the collection is weighted, and finite (a NaN weight would otherwise reach
    the pooled output and the table's gradient silently); no variable batch per key.

    The range check costs one host sync per call (one ``tolist`` of three flags); pass
    ``enabled=False`` to the owning collection to skip it.

    Args:
        num_embeddings: ``{feature_name: rows}``; a feature served by several tables gets
            the smallest row count.
        is_weighted: whether the collection takes per-id weights.
        feature_tables: ``{feature_name: [table names]}``, named in the non-finite
            weights error (optional).
    """

    def __init__(
        self,
        num_embeddings: Mapping[str, int],
        is_weighted: bool = False,
        feature_tables: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__()
        self._num_embeddings: dict[str, int] = dict(num_embeddings)
        self._is_weighted = is_weighted
        self._feature_tables: dict[str, list[str]] = {
            k: list(v) for k, v in (feature_tables or {}).items()
        }

    def forward(self, features: KeyedJaggedTensor) -> None:
        """Validate ``features`` (``F`` keys, batch ``B``); raises ``TypeError``/``ValueError``."""
        if not isinstance(features, KeyedJaggedTensor):
            raise TypeError(
                f"expected a KeyedJaggedTensor, got {type(features).__name__}"
            )
        keys = features.keys()
        expected = self._num_embeddings
        unknown = [k for k in keys if k not in expected]
        if unknown:
            raise ValueError(
                f"unknown feature keys {unknown} in the KeyedJaggedTensor "
                f"(this collection's features: {list(expected)})"
            )
        missing = [k for k in expected if k not in keys]
        if missing:
            raise ValueError(
                f"feature keys {missing} are missing from the KeyedJaggedTensor "
                f"(got keys {list(keys)})"
            )
        values = features.values()
        if values.dtype not in _ID_DTYPES:
            raise TypeError(
                f"ids must be int32 or int64, got {values.dtype} for features {list(keys)}"
            )
        if features.variable_stride_per_key():
            raise ValueError("variable batch size per key (VBE) is not supported")
        weights = features.weights_or_none()
        if self._is_weighted and weights is None:
            raise ValueError("this collection is weighted but the KeyedJaggedTensor has no weights")
        if weights is not None and not torch.is_floating_point(weights):
            raise TypeError(f"weights must be floating point, got {weights.dtype}")
        lengths = features.lengths()
        num_keys = len(keys)
        if values.numel() == 0 and lengths.numel() == 0:
            return
        bounds = torch.tensor(
            [expected[k] for k in keys], dtype=values.dtype, device=values.device
        )
        lengths_per_key = lengths.view(num_keys, -1).sum(dim=1)
        flags = [
            (lengths < 0).any(),
            lengths_per_key.sum() != values.numel(),
        ]
        if values.numel() > 0:
            ends = torch.cumsum(lengths_per_key, dim=0)
            positions = torch.arange(values.numel(), device=values.device)
            key_of_value = torch.searchsorted(ends, positions, right=True).clamp(max=num_keys - 1)
            flags.append(((values < 0) | (values >= bounds[key_of_value])).any())
        weights_at = None
        if weights is not None and weights.numel() > 0:
            weights_at = len(flags)
            flags.append(~torch.isfinite(weights).all())
        bad = torch.stack(flags).tolist()
        if bad[0]:
            raise ValueError("KeyedJaggedTensor has negative lengths")
        if bad[1]:
            raise ValueError(
                f"KeyedJaggedTensor lengths sum to {int(lengths.sum())} but it holds "
                f"{values.numel()} ids"
            )
        if values.numel() > 0 and bad[2]:
            raise ValueError(self._range_message(features))
        if weights_at is not None and bad[weights_at]:
            raise ValueError(self._weights_message(features))

    def _range_message(self, features: KeyedJaggedTensor) -> str:
        parts = []
        for key, jt in features.to_dict().items():
            ids = jt.values()
            rows = self._num_embeddings[key]
            wrong = ids[(ids < 0) | (ids >= rows)]
            if wrong.numel() > 0:
                parts.append(
                    f"feature {key!r}: ids {wrong[:5].tolist()} outside [0, {rows})"
                )
        return "ids out of range: " + "; ".join(parts)

    def _weights_message(self, features: KeyedJaggedTensor) -> str:
        parts = []
        for key, jt in features.to_dict().items():
            wrong = int((~torch.isfinite(jt.weights())).sum())
            if wrong:
                tables = self._feature_tables.get(key)
                where = f" (tables {tables})" if tables else ""
                parts.append(f"feature {key!r}{where}: {wrong} of {jt.weights().numel()}")
        return "per-id weights hold NaN or Inf: " + "; ".join(parts)
