"""VQEmbeddingBagCollection: a TorchRec EmbeddingBagCollection whose pooled outputs are
vector-quantized per table."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch.fx._symbolic_trace import is_fx_tracing
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    EmbeddingBagCollectionInterface,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from vq_torchrec.modules.collection_layout import CollectionLayout, output_configs
from vq_torchrec.modules.input_validation import KJTValidator
from vq_torchrec.modules.keyed_tensor_quantizer import KeyedTensorQuantizer
from vq_torchrec.modules.vq_tables import resolve_vq_configs
from vq_torchrec.quantization.config import VQConfig


class VQEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """Drop-in for ``torchrec.EmbeddingBagCollection`` with vector-quantized outputs.

    Composition: child ``ebc`` is a real ``EmbeddingBagCollection`` (so
    ``DistributedModelParallel`` shards it with TorchRec's own sharders and fused
    optimizers), child ``quantize`` a :class:`KeyedTensorQuantizer` (one quantizer per
    quantized table, dense and replicated), child ``input_check`` a :class:`KJTValidator`.

    ``forward(KeyedJaggedTensor) -> KeyedTensor``: values ``(B, sum(out_dims))`` with the
    plain EBC's keys and order. Per quantized key the pooled ``(B, D)`` embedding is
    replaced by its quantized vector (``output="quantized"``, width ``D``) or by
    ``[embedding, quantized]`` (``output="concat"``, width ``2 * D``); tables not in ``vq``
    pass through. Gradients reach the table rows through the quantizer's straight-through
    estimator (or rotation trick). The auxiliary loss and codebook stats of the last forward
    are read with :func:`vq_torchrec.modules.vq_loss` / :func:`vq_torchrec.modules.vq_stats`.

    :meth:`embedding_bag_configs` reports the *output* widths (``2 * D`` for concat tables)
    so ``torchrec.models.dlrm.DLRM`` sizes its layers right; the storage configs are
    ``self.ebc.embedding_bag_configs()``.

    Args:
        tables: the tables, as for ``EmbeddingBagCollection``.
        vq: one ``VQConfig`` (all tables) or ``{table_name: VQConfig}``.
        device: device of the tables and quantizers.
        process_group: group the quantizers synchronise over (default: world).
        is_weighted: weighted features (per-id weights), as for ``EmbeddingBagCollection``.
        validate_inputs: check keys, id dtype and id range each forward (one host sync).
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        vq: Mapping[str, VQConfig] | VQConfig,
        device: torch.device | str | None = None,
        process_group: dist.ProcessGroup | None = None,
        is_weighted: bool = False,
        validate_inputs: bool = True,
    ) -> None:
        super().__init__()
        device = torch.device(device) if isinstance(device, str) else device
        ebc = EmbeddingBagCollection(tables=tables, is_weighted=is_weighted, device=device)
        self._setup(ebc, vq, process_group, validate_inputs)

    @classmethod
    def from_ebc(
        cls,
        ebc: EmbeddingBagCollection,
        vq: Mapping[str, VQConfig] | VQConfig,
        process_group: dist.ProcessGroup | None = None,
        validate_inputs: bool = True,
    ) -> VQEmbeddingBagCollection:
        """Wrap an existing ``EmbeddingBagCollection`` (its parameters are kept, not copied)."""
        if not isinstance(ebc, EmbeddingBagCollection):
            raise TypeError(f"expected an EmbeddingBagCollection, got {type(ebc).__name__}")
        self = cls.__new__(cls)
        EmbeddingBagCollectionInterface.__init__(self)
        self._setup(ebc, vq, process_group, validate_inputs)
        return self

    def _setup(
        self,
        ebc: EmbeddingBagCollection,
        vq: Mapping[str, VQConfig] | VQConfig,
        process_group: dist.ProcessGroup | None,
        validate_inputs: bool,
    ) -> None:
        tables = ebc.embedding_bag_configs()
        configs = resolve_vq_configs([t.name for t in tables], vq)
        layout = CollectionLayout.from_configs(tables)
        self._layout = layout
        self._vq_configs = configs
        self._output_configs = output_configs(tables, configs)
        self._validate_inputs = validate_inputs
        self._is_weighted = ebc.is_weighted()  # the sharded EBC does not expose it
        self.input_check = KJTValidator(
            layout.feature_rows,
            is_weighted=self._is_weighted,
            feature_tables={
                f: [layout.key_tables[k] for k in layout.keys if layout.key_features[k] == f]
                for f in layout.feature_rows
            },
        )
        self.ebc = ebc
        self.quantize = KeyedTensorQuantizer(
            keys=layout.keys,
            key_dims=layout.key_dims,
            key_features=layout.key_features,
            key_tables=layout.key_tables,
            table_dims={t.name: t.embedding_dim for t in tables if t.name in configs},
            configs=configs,
            process_group=process_group,
            device=ebc.device,
        )

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """``features`` (``F`` keys, batch ``B``) -> ``KeyedTensor`` ``(B, sum(out_dims))``."""
        if self._validate_inputs:
            self.input_check(features)
        if not is_fx_tracing() and features.stride() == 0:
            return self._empty_output()  # TorchRec's EBC cannot look up a batch of 0
        pooled = self.ebc(features)
        return self.quantize(pooled, features)

    def _empty_output(self) -> KeyedTensor:
        dims = self.output_dims()
        return KeyedTensor(
            keys=list(dims),
            length_per_key=list(dims.values()),
            values=torch.zeros(0, sum(dims.values()), device=self.device),
        )

    # --- what EmbeddingBagCollection consumers (DLRM's SparseArch, planners) read ----------
    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """Table configs with ``embedding_dim`` = the output width of each table's keys."""
        return self._output_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        """Compute device (also once ``ebc`` is sharded, where it has no ``device``)."""
        device = getattr(self.ebc, "device", None) or getattr(self.ebc, "_device", None)
        if isinstance(device, torch.device) and device.type != "meta":
            return device
        for tensor in self.quantize.buffers():
            return tensor.device
        return torch.device(device) if device is not None else torch.device("cpu")

    # --- VQ specifics ------------------------------------------------------------------------
    @property
    def vq_configs(self) -> dict[str, VQConfig]:
        """``{table_name: VQConfig}`` of the quantized tables."""
        return dict(self._vq_configs)

    def output_dims(self) -> dict[str, int]:
        """``{key: width}`` of every output key, in output order."""
        return self.quantize.output_dims()

    @torch.no_grad()
    def codes(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Codes (semantic IDs) of the pooled embeddings of ``features``, per quantized key.

        Returns ``{key: long (B,) | (B, dim) | (B, num_levels)}``; ``-1`` for empty bags.
        No state change (quantizers are only encoded). Under sharding this is a collective.
        """
        if self._validate_inputs:
            self.input_check(features)
        return self.quantize.encode(self.ebc(features), features)

    @torch.no_grad()
    def export_codes(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """Codes of rows ``ids`` ``(n,)`` of quantized ``table`` (no state change).

        Looks the rows up through ``self.ebc`` (one id per bag), so it works for a sharded
        ``ebc`` as well; then it is a collective and every rank must call it with the same
        ``n``. Returns long ``(n,)`` / ``(n, dim)`` / ``(n, num_levels)``.
        """
        if table not in self._vq_configs:
            raise ValueError(
                f"table {table!r} is not quantized (quantized tables: {list(self._vq_configs)})"
            )
        key = self._layout.table_keys[table][0]
        # ``to_dict()`` also waits for a sharded EBC's awaitable output
        pooled = self.ebc(self._single_id_kjt(key, ids)).to_dict()
        return self.quantize.encode_table(table, pooled[key])

    def _single_id_kjt(self, key: str, ids: torch.Tensor) -> KeyedJaggedTensor:
        """KJT with batch ``n``: feature of ``key`` gets one id per bag, others none."""
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"ids must be an int32/int64 tensor, got {getattr(ids, 'dtype', ids)}")
        ids = ids.reshape(-1).to(device=self.device, dtype=torch.int64)
        feature = self._layout.key_features[key]
        features = list(self._layout.feature_rows)
        n = ids.numel()
        lengths = torch.zeros(len(features), n, dtype=torch.int64, device=ids.device)
        lengths[features.index(feature)] = 1
        kjt = KeyedJaggedTensor(
            keys=features,
            values=ids,
            lengths=lengths.view(-1),
            weights=torch.ones(n, device=ids.device) if self.is_weighted() else None,
        )
        self.input_check(kjt)
        return kjt
