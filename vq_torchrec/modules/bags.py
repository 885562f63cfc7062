"""What a KeyedJaggedTensor's bags look like: which are empty, which hold exactly one id."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def nonempty_bags(features: KeyedJaggedTensor, only_if_any_empty: bool = False) -> dict[str, torch.Tensor]:
    """``{feature_name: bool (B,)}``: which bags of each feature hold at least one id.

    Reads ``lengths`` as ``(F, B)``. With ``only_if_any_empty`` (CPU tensors only, where
    reading a value is not a device sync) features without any empty bag are left out,
    so callers skip masking them.
    """
    keys = features.keys()
    if not keys:
        return {}
    lengths = features.lengths().view(len(keys), -1)
    nonempty = lengths > 0
    if only_if_any_empty and lengths.device.type == "cpu":
        if lengths.numel() == 0:
            return {}
        has_empty = (~nonempty).any(dim=1).tolist()
        return {key: nonempty[i] for i, key in enumerate(keys) if has_empty[i]}
    return {key: nonempty[i] for i, key in enumerate(keys)}


def single_id_bags(features: KeyedJaggedTensor, names: Sequence[str]) -> list[torch.Tensor | None] | None:
    """Per name in ``names``: the ``(B,)`` ids when every bag of that feature holds exactly one
    id (so the pooled row of bag ``b`` is table row ``ids[b]``), else ``None``. CPU and
    unweighted features only (reading lengths is free there); ``None`` otherwise."""
    keys = features.keys()
    if not keys or features.weights_or_none() is not None or features.lengths().device.type != "cpu":
        return None
    lengths = features.lengths().view(len(keys), -1)
    single = (lengths == 1).all(dim=1).tolist()
    if not any(single):
        return None
    values = features.values().split(features.length_per_key())
    by_name = {key: values[i] for i, key in enumerate(keys) if single[i]}
    return [by_name.get(name) for name in names]
