"""Quantizes the pooled embeddings of a KeyedTensor, table by table (an FX leaf module)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from vq_torchrec.modules.bags import nonempty_bags
from vq_torchrec.modules.grouped_forward import grouped_forward
from vq_torchrec.modules.nonfinite import FeatureRows, assert_finite_async, raise_with_context
from vq_torchrec.modules.table_quantizers import TableQuantizers
from vq_torchrec.modules.vq_tables import output_dim
from vq_torchrec.quantization.config import VQConfig


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
        fast = grouped_forward(self, pooled, features) if self.grouped else None
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
