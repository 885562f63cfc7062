"""The grouped fast path of :class:`~vq_torchrec.modules.keyed_tensor_quantizer.KeyedTensorQuantizer`:
all quantized keys of a pooled ``KeyedTensor`` through
:func:`vq_torchrec.quantization.grouped.quantize_slots` at once."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from vq_torchrec.modules.bags import nonempty_bags, single_id_bags
from vq_torchrec.modules.nonfinite import FeatureRows, raise_with_context
from vq_torchrec.quantization.grouped import (
    GroupedResult,
    device_index,
    grouped_eligible,
    quantize_slots,
)
from vq_torchrec.quantization.output import VQOutput
from vq_torchrec.quantization.stats import perplexity, usage
from vq_torchrec.quantization.validation import validate_input

if TYPE_CHECKING:
    from vq_torchrec.modules.keyed_tensor_quantizer import KeyedTensorQuantizer


def grouped_forward(
    leaf: KeyedTensorQuantizer, pooled: KeyedTensor, features: KeyedJaggedTensor | None
) -> KeyedTensor | None:
    """``leaf``'s forward on the grouped fast path (see :class:`KeyedTensorQuantizer`), or
    ``None`` where that path does not apply (the caller then runs the per-table path)."""
    d = leaf._common_dim
    values = pooled.values()
    keys = pooled.keys()
    if d is None or values.dtype != torch.float32 or values.dim() != 2 or not leaf._key_tables:
        return None
    if sorted(keys) != sorted(leaf._keys) or any(n != d for n in pooled.length_per_key()):
        return None
    slots = [i for i, k in enumerate(keys) if k in leaf._key_tables]
    tables: list[str] = []
    slot_table: list[int] = []
    for i in slots:
        table = leaf._key_tables[keys[i]]
        if table not in tables:
            tables.append(table)
        slot_table.append(tables.index(table))
    quantizers = [leaf.quantizers[t] for t in tables]
    if not grouped_eligible(quantizers, d):
        return None
    b = values.shape[0]
    zv = values.view(b, len(keys), d)
    z = zv if len(slots) == len(keys) else zv.index_select(1, device_index(tuple(slots), values.device))
    feats = [leaf._key_features[keys[i]] for i in slots]
    mask = None
    if features is not None:
        nonempty = nonempty_bags(features, only_if_any_empty=True)
        if any(f in nonempty for f in feats):
            full = torch.ones(b, dtype=torch.bool, device=values.device)
            mask = torch.stack([nonempty.get(f, full) for f in feats], dim=1)
    labels = [f"table {tables[t]!r}, feature {f!r}" for t, f in zip(slot_table, feats)]
    slot_ids = single_id_bags(features, feats) if features is not None else None
    with torch.autocast(device_type=values.device.type, enabled=False):
        res = quantize_slots(quantizers, slot_table, z, mask, labels, slot_ids)
    if res is None:  # CPU: some row is non-finite or large; nothing has changed yet
        _raise_if_invalid(leaf, tables, slot_table, [keys[i] for i in slots], z, features)
        return None
    # per-slot views through one ``unbind`` (its backward is one ``stack``; indexing each slot
    # separately would give every slot's backward a zero-filled (B, S, d) gradient to add up)
    slot_views = res.quantized.unbind(1)
    _record_grouped(leaf, res, slot_views, tables, slot_table)
    if leaf._all_quantized_plain:
        if list(keys) == leaf._keys:  # the output is the gathered code vectors: no copy
            return KeyedTensor(keys=leaf._keys, length_per_key=leaf._out_dims, values=res.quantized.view(b, -1))
        # a sharded EBC orders its keys its own way: one reordering gather (one backward node)
        order = device_index(tuple(keys.index(k) for k in leaf._keys), values.device)
        return KeyedTensor(
            keys=leaf._keys, length_per_key=leaf._out_dims, values=res.quantized.index_select(1, order).view(b, -1)
        )
    quantized = dict(zip([keys[i] for i in slots], slot_views))
    by_key = pooled.to_dict()
    pieces: list[torch.Tensor] = []
    for key in leaf._keys:
        q = quantized.get(key)
        if q is None:
            pieces.append(by_key[key])
            continue
        if leaf._configs[leaf._key_tables[key]].output == "concat":
            pieces.append(by_key[key])
        pieces.append(q)
    return KeyedTensor(keys=leaf._keys, length_per_key=leaf._out_dims, values=torch.cat(pieces, dim=1))


def _raise_if_invalid(
    leaf: KeyedTensorQuantizer,
    tables: list[str],
    slot_table: list[int],
    slot_keys: list[str],
    z: torch.Tensor,
    features: KeyedJaggedTensor | None,
) -> None:
    """Raise the per-table path's error (naming table and feature) for the first table
    whose rows its quantizer rejects, before any quantizer state changes."""
    for t, table in enumerate(tables):
        quantizer = leaf.quantizers[table]
        parts = [
            FeatureRows(key, leaf._key_features[key], z[:, j])
            for j, (key, owner) in enumerate(zip(slot_keys, slot_table))
            if owner == t
        ]
        try:
            for part in parts:
                validate_input(part.rows, quantizer.dim)
        except ValueError as err:
            raise_with_context(table, parts, err, features)


def _record_grouped(
    leaf: KeyedTensorQuantizer,
    res: GroupedResult,
    slot_views: tuple[torch.Tensor, ...],
    tables: list[str],
    slot_table: list[int],
) -> None:
    """Per-table :class:`VQOutput` of a fast-path forward (slots of a table concatenated)."""
    for t, table in enumerate(tables):
        mine = [j for j, owner in enumerate(slot_table) if owner == t]
        if len(mine) == 1:
            quantized, codes = slot_views[mine[0]], res.codes[:, mine[0]]
        else:
            quantized = torch.cat([slot_views[j] for j in mine])
            codes = torch.cat([res.codes[:, j] for j in mine])
        q = leaf.quantizers[table]
        leaf._last_outputs[table] = VQOutput(
            quantized=quantized,
            codes=codes,
            loss=res.losses[t],
            perplexity=perplexity(res.counts[t]),
            usage=usage(res.counts[t]),
            dead_codes=q.dead_code_count(),
        )
