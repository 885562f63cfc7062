"""Quantizes every looked-up row of a ``Dict[str, JaggedTensor]``, table by table
(an FX leaf module)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import JaggedTensor

from vq_torchrec.modules.nonfinite import (
    FeatureRows,
    assert_finite_async,
    feature_of,
    raise_with_context,
)
from vq_torchrec.modules.table_quantizers import TableQuantizers
from vq_torchrec.quantization.config import VQConfig


class JaggedQuantizer(TableQuantizers):
    """Quantizes the rows ``(total_ids, D)`` of the quantized tables' keys of an
    ``EmbeddingCollection`` output; the features of one table go through its quantizer as
    one batch. Output: the plain EC's keys and order, each ``JaggedTensor`` with the same
    lengths (and weights / indices) and values ``(total_ids, D)`` (``"quantized"``) or
    ``(total_ids, 2 * D)`` (``"concat"``: ``[embedding, quantized]``).

    Args:
        keys: the plain EC's output keys (embedding names), in order.
        key_tables: ``{key: table_name}`` of every key.
        table_dims, configs, process_group, device: see :class:`TableQuantizers`.
    """

    def __init__(
        self,
        keys: Sequence[str],
        key_tables: Mapping[str, str],
        table_dims: Mapping[str, int],
        configs: Mapping[str, VQConfig],
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(table_dims, configs, process_group=process_group, device=device)
        self._keys: list[str] = list(keys)
        self._table_keys: dict[str, list[str]] = {
            table: [k for k in self._keys if key_tables[k] == table] for table in configs
        }

    def forward(self, embeddings: dict[str, JaggedTensor]) -> dict[str, JaggedTensor]:
        """``{key: JaggedTensor (total_ids, D)}`` (any key order) -> the quantized dict."""
        # a sharded EC hands over a LazyAwaitable of the dict: ``items()`` waits for it
        embeddings = dict(embeddings.items())
        missing = [k for k in self._keys if k not in embeddings]
        if missing:
            raise ValueError(f"embeddings lack keys {missing} (got {list(embeddings)})")
        out = dict(embeddings)
        for table, keys in self._table_keys.items():
            if not keys:
                continue
            raw = [embeddings[k].values() for k in keys]
            z = raw[0] if len(raw) == 1 else torch.cat(raw, dim=0)
            parts = [FeatureRows(k, feature_of(k, table), r) for k, r in zip(keys, raw)]
            assert_finite_async(table, parts)
            try:
                quantized = self.quantize_table(table, z).quantized
            except ValueError as err:
                raise_with_context(table, parts, err)
            chunks = quantized.split([r.shape[0] for r in raw], dim=0)
            concat = self._configs[table].output == "concat"
            for key, emb, q in zip(keys, raw, chunks):
                jt = embeddings[key]
                out[key] = JaggedTensor(
                    values=torch.cat([emb, q], dim=1) if concat else q,
                    lengths=jt.lengths(),
                    weights=jt.weights_or_none(),
                )
        return {k: out[k] for k in self._keys}

    @torch.no_grad()
    def encode(self, embeddings: dict[str, JaggedTensor]) -> dict[str, JaggedTensor]:
        """``{key: JaggedTensor}`` of codes per looked-up id (values long ``(total_ids, ...)``)."""
        embeddings = dict(embeddings.items())
        codes: dict[str, JaggedTensor] = {}
        for table, keys in self._table_keys.items():
            for key in keys:
                jt = embeddings[key]
                try:
                    values = self.encode_table(table, jt.values())
                except ValueError as err:
                    part = FeatureRows(key, feature_of(key, table), jt.values())
                    raise_with_context(table, [part], err)
                codes[key] = JaggedTensor(values=values, lengths=jt.lengths())
        return codes
