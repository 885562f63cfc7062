"""Quantizes the pooled embeddings of a KeyedTensor, table by table (an FX leaf module)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from vq_torchrec.modules.nonfinite import FeatureRows, assert_finite_async, raise_with_context
from vq_torchrec.modules.table_quantizers import TableQuantizers
from vq_torchrec.modules.vq_tables import output_dim
from vq_torchrec.quantization.config import VQConfig
from vq_torchrec.quantization.grouped import (
    GroupedResult,
    grouped_eligible,
    host_to_device,
    quantize_slots,
)
from vq_torchrec.quantization.output import VQOutput
from vq_torchrec.quantization.stats import perplexity, usage
from vq_torchrec.quantization.validation import validate_input


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


@functools.lru_cache(maxsize=64)
def _index_tensor(index: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Long tensor of ``index`` on ``device``, cached (no host-to-device copy per forward)."""
    return host_to_device(index, torch.long, device)


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


class KeyedTensorQuantizer(TableQuantizers):
    """Quantizes the quantized tables' keys of a pooled ``KeyedTensor`` ``(B, sum(D))``.

    The features of one table are quantized together as one ``(n_features * B, dim)`` batch
    by that table's quantizer (one quantizer per table, shared by its features). Keys are
    looked up by name, so a sharded EBC's key order does not matter; the output has the
    plain EBC's keys in the plain EBC's order. A key's length is ``D`` (``output="quantized"``)
    or ``2 * D`` (``output="concat"``: ``[embedding, quantized]``); pass-through keys are
    copied. Empty bags (zero vectors in a sum/mean EBC) stay exact zeros in the output.

    All data-dependent work (and the quantizers' collectives) happens in this module, which
    TorchRec's pipeline tracer treats as a leaf.

    Fast path: when every key has the same width ``d`` (as DLRM requires), the values are
    fp32 and every quantizer is a plain EMA/l2/straight-through ``VectorQuantizer`` that is
    already initialised, all quantized keys go through
    :func:`vq_torchrec.quantization.grouped.quantize_slots` at once on the ``(B, S, d)`` view
    of the pooled values (one search per key, every other step batched; with every key
    quantized and output ``"quantized"`` the output *is* the gathered code vectors, no
    concatenation). Otherwise, and for the k-means batch, each table's quantizer runs on its
    own. Set ``grouped = False`` on the module to force the per-table path.

    Args:
        keys: the plain EBC's output keys (embedding names), in order.
        key_dims: ``{key: D}`` of every key.
        key_features: ``{key: feature_name}`` (``"f@t"`` keys map to ``"f"``).
        key_tables: ``{key: table_name}`` of every key.
        table_dims: ``{table_name: D}`` of the quantized tables.
        configs: ``{table_name: VQConfig}`` of the quantized tables.
        process_group, device: see :class:`TableQuantizers`.
    """

    def __init__(
        self,
        keys: Sequence[str],
        key_dims: Mapping[str, int],
        key_features: Mapping[str, str],
        key_tables: Mapping[str, str],
        table_dims: Mapping[str, int],
        configs: Mapping[str, VQConfig],
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(table_dims, configs, process_group=process_group, device=device)
        self._keys: list[str] = list(keys)
        self._key_features: dict[str, str] = dict(key_features)
        self._table_keys: dict[str, list[str]] = {
            table: [k for k in self._keys if key_tables[k] == table] for table in configs
        }
        self._out_dims: list[int] = [
            output_dim(key_dims[k], configs.get(key_tables[k])) for k in self._keys
        ]
        self._key_tables: dict[str, str] = {k: key_tables[k] for k in self._keys if key_tables[k] in configs}
        widths = {key_dims[k] for k in self._keys}
        self._common_dim: int | None = widths.pop() if len(widths) == 1 else None
        self.grouped: bool = True
        self._all_quantized_plain = len(self._key_tables) == len(self._keys) and all(
            c.output == "quantized" for c in configs.values()
        )

    def output_dims(self) -> dict[str, int]:
        """``{key: width}`` of each output key (``2 * D`` for ``output="concat"`` tables)."""
        return dict(zip(self._keys, self._out_dims))

    def forward(
        self, pooled: KeyedTensor, features: KeyedJaggedTensor | None = None
    ) -> KeyedTensor:
        """Args:
            pooled: the EBC's output, values ``(B, sum(D))``, keys in any order.
            features: the EBC's input; used to keep empty bags at exact zero.

        Returns:
            ``KeyedTensor`` with the plain EBC's keys and order, values ``(B, sum(out_dims))``.
        """
        fast = self._grouped_forward(pooled, features)
        if fast is not None:
            return fast
        by_key = pooled.to_dict()
        missing = [k for k in self._keys if k not in by_key]
        if missing:
            raise ValueError(f"pooled embeddings lack keys {missing} (got {pooled.keys()})")
        nonempty = nonempty_bags(features, only_if_any_empty=True) if features is not None else {}
        out = dict(by_key)
        for table, keys in self._table_keys.items():
            if not keys:
                continue
            raw = [by_key[k] for k in keys]
            z = raw[0] if len(raw) == 1 else torch.cat(raw, dim=0)
            parts = [FeatureRows(k, self._key_features[k], r) for k, r in zip(keys, raw)]
            assert_finite_async(table, parts)
            try:
                quantized = self.quantize_table(table, z).quantized
            except ValueError as err:
                raise_with_context(table, parts, err, features)
            chunks = quantized.split([r.shape[0] for r in raw], dim=0)
            concat = self._configs[table].output == "concat"
            for key, emb, q in zip(keys, raw, chunks):
                mask = nonempty.get(self._key_features[key])
                if mask is not None:
                    q = q * mask.unsqueeze(1).to(q.dtype)
                out[key] = torch.cat([emb, q], dim=1) if concat else q
        return KeyedTensor(
            keys=self._keys,
            length_per_key=self._out_dims,
            values=torch.cat([out[k] for k in self._keys], dim=1),
        )

    def _grouped_forward(
        self, pooled: KeyedTensor, features: KeyedJaggedTensor | None
    ) -> KeyedTensor | None:
        """The fast path (see the class docstring), or ``None`` where it does not apply."""
        d = self._common_dim
        if not self.grouped:
            return None
        values = pooled.values()
        keys = pooled.keys()
        if d is None or values.dtype != torch.float32 or values.dim() != 2 or not self._key_tables:
            return None
        if sorted(keys) != sorted(self._keys) or any(n != d for n in pooled.length_per_key()):
            return None
        slots = [i for i, k in enumerate(keys) if k in self._key_tables]
        tables: list[str] = []
        slot_table: list[int] = []
        for i in slots:
            table = self._key_tables[keys[i]]
            if table not in tables:
                tables.append(table)
            slot_table.append(tables.index(table))
        quantizers = [self.quantizers[t] for t in tables]
        if not grouped_eligible(quantizers, d):
            return None
        b = values.shape[0]
        zv = values.view(b, len(keys), d)
        z = zv if len(slots) == len(keys) else zv.index_select(1, _index_tensor(tuple(slots), values.device))
        feats = [self._key_features[keys[i]] for i in slots]
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
            self._raise_if_invalid(tables, slot_table, [keys[i] for i in slots], z, features)
            return None
        self._record_grouped(res, tables, slot_table)
        if self._all_quantized_plain and list(keys) == self._keys:
            return KeyedTensor(keys=self._keys, length_per_key=self._out_dims, values=res.quantized.view(b, -1))
        position = {keys[i]: j for j, i in enumerate(slots)}
        by_key = pooled.to_dict()
        pieces: list[torch.Tensor] = []
        for key in self._keys:
            j = position.get(key)
            if j is None:
                pieces.append(by_key[key])
                continue
            if self._configs[self._key_tables[key]].output == "concat":
                pieces.append(by_key[key])
            pieces.append(res.quantized[:, j])
        return KeyedTensor(keys=self._keys, length_per_key=self._out_dims, values=torch.cat(pieces, dim=1))

    def _raise_if_invalid(
        self,
        tables: list[str],
        slot_table: list[int],
        slot_keys: list[str],
        z: torch.Tensor,
        features: KeyedJaggedTensor | None,
    ) -> None:
        """Raise the per-table path's error (naming table and feature) for the first table
        whose rows its quantizer rejects, before any quantizer state changes."""
        for t, table in enumerate(tables):
            quantizer = self.quantizers[table]
            parts = [
                FeatureRows(key, self._key_features[key], z[:, j])
                for j, (key, owner) in enumerate(zip(slot_keys, slot_table))
                if owner == t
            ]
            try:
                for part in parts:
                    validate_input(part.rows, quantizer.dim)
            except ValueError as err:
                raise_with_context(table, parts, err, features)

    def _record_grouped(self, res: GroupedResult, tables: list[str], slot_table: list[int]) -> None:
        """Per-table :class:`VQOutput` of a fast-path forward (slots of a table concatenated)."""
        for t, table in enumerate(tables):
            mine = [j for j, owner in enumerate(slot_table) if owner == t]
            if len(mine) == 1:
                quantized, codes = res.quantized[:, mine[0]], res.codes[:, mine[0]]
            else:
                quantized = torch.cat([res.quantized[:, j] for j in mine])
                codes = torch.cat([res.codes[:, j] for j in mine])
            q = self.quantizers[table]
            self._last_outputs[table] = VQOutput(
                quantized=quantized,
                codes=codes,
                loss=res.losses[t],
                perplexity=perplexity(res.counts[t]),
                usage=usage(res.counts[t]),
                dead_codes=q.dead_code_count(),
            )

    @torch.no_grad()
    def encode(
        self, pooled: KeyedTensor, features: KeyedJaggedTensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``{key: codes}`` of the quantized keys (no state change).

        Codes are long ``(B,)`` / ``(B, dim)`` (outer) / ``(B, num_levels)`` (residual);
        empty bags get ``-1``.
        """
        by_key = pooled.to_dict()
        nonempty = nonempty_bags(features) if features is not None else {}
        codes: dict[str, torch.Tensor] = {}
        for table, keys in self._table_keys.items():
            for key in keys:
                try:
                    c = self.encode_table(table, by_key[key])
                except ValueError as err:
                    part = FeatureRows(key, self._key_features[key], by_key[key])
                    raise_with_context(table, [part], err, features)
                mask = nonempty.get(self._key_features[key])
                if mask is not None:
                    shape = (-1,) + (1,) * (c.dim() - 1)
                    c = torch.where(mask.view(shape), c, torch.full_like(c, -1))
                codes[key] = c
        return codes
