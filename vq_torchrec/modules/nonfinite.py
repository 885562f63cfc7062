"""Name the table and feature behind a NaN/Inf that reaches a table's quantizer.

The quantizers check their input themselves (``ValueError`` on CPU, an asynchronous device
assert elsewhere) but only see one ``(N, dim)`` batch per table. The VQ leaves know which
rows came from which feature, so they

* on CPU, catch the quantizer's ``ValueError`` and, when a feature's rows are non-finite,
  re-raise it naming the table, the feature (and key) and, for pooled lookups, whether the
  feature's per-id weights are the culprit (:func:`raise_with_context`, error path only);
* on accelerators, enqueue one ``torch._assert_async`` per feature whose message names the
  table and feature (:func:`assert_finite_async`): no host sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, NoReturn

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


class FeatureRows(NamedTuple):
    """The rows ``(n, dim)`` a feature contributes to its table's quantizer batch."""

    key: str
    feature: str
    rows: torch.Tensor


def feature_of(key: str, table: str) -> str:
    """Feature name of an embedding name: ``"f@t"`` (a feature shared by tables) -> ``"f"``."""
    suffix = f"@{table}"
    return key[: -len(suffix)] if key.endswith(suffix) else key


def _label(table: str, part: FeatureRows) -> str:
    key = "" if part.key == part.feature else f" (key {part.key!r})"
    return f"table {table!r}, feature {part.feature!r}{key}"


def assert_finite_async(table: str, parts: Sequence[FeatureRows]) -> None:
    """On an accelerator, one asynchronous device assert per feature naming table and
    feature (no host sync). A no-op on CPU, where :func:`raise_with_context` reports instead."""
    for part in parts:
        if part.rows.device.type == "cpu" or part.rows.numel() == 0:
            continue
        torch._assert_async(
            torch.isfinite(part.rows).all(),
            f"NaN or Inf embeddings reached the VQ quantizer of {_label(table, part)}",
        )


def raise_with_context(
    table: str,
    parts: Sequence[FeatureRows],
    error: Exception,
    features: KeyedJaggedTensor | None = None,
) -> NoReturn:
    """Re-raise ``error`` (the quantizer's ``ValueError``) naming ``table`` and every feature
    whose rows hold NaN/Inf (or, when all rows are finite, every feature of the batch).
    Error path only: its host reads cost nothing on success.

    Args:
        table: the table whose quantizer raised.
        parts: the features' rows, in the order they were concatenated.
        error: the quantizer's exception (chained as ``__cause__``).
        features: the collection's input; when given, non-finite per-id weights of a bad
            feature are named as the cause.
    """
    weights = features.weights_or_none() if features is not None else None
    by_feature = features.to_dict() if weights is not None else {}
    problems = []
    for part in parts:
        bad_rows = int((~torch.isfinite(part.rows)).any(dim=-1).sum()) if part.rows.numel() else 0
        if bad_rows == 0:
            continue
        what = f"{_label(table, part)}: {bad_rows} of {part.rows.shape[0]} rows hold NaN or Inf"
        jt = by_feature.get(part.feature)
        if jt is not None and jt.weights_or_none() is not None:
            bad_weights = int((~torch.isfinite(jt.weights())).sum())
            if bad_weights:
                what += f" (its per-id weights hold {bad_weights} NaN/Inf values)"
            else:
                what += " (its per-id weights are finite: check the table rows it looked up)"
        else:
            what += " (check the table rows it looked up)"
        problems.append(what)
    if problems:
        raise ValueError("NaN or Inf reached the VQ quantizer of " + "; ".join(problems)) from error
    names = ", ".join(repr(part.feature) for part in parts)
    raise ValueError(f"the VQ quantizer of table {table!r} (features {names}) rejected its input: {error}") from error
