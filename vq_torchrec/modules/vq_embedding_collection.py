"""VQEmbeddingCollection: a TorchRec EmbeddingCollection whose looked-up rows are
vector-quantized per table."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch.fx._symbolic_trace import is_fx_tracing
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import (
    EmbeddingCollection,
    EmbeddingCollectionInterface,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from vq_torchrec.modules.collection_layout import CollectionLayout, output_configs
from vq_torchrec.modules.input_validation import KJTValidator
from vq_torchrec.modules.jagged_quantizer import JaggedQuantizer
from vq_torchrec.modules.vq_tables import output_dim, resolve_vq_configs
from vq_torchrec.quantization.config import VQConfig


class VQEmbeddingCollection(EmbeddingCollectionInterface):
    """Drop-in for ``torchrec.EmbeddingCollection`` (sequence features) with every looked-up
    row of the quantized tables vector-quantized.

    Children: ``ec`` (a real ``EmbeddingCollection``, sharded by TorchRec under
    ``DistributedModelParallel``), ``quantize`` (:class:`JaggedQuantizer`), ``input_check``
    (:class:`KJTValidator`).

    ``forward(KeyedJaggedTensor) -> Dict[str, JaggedTensor]``: the plain EC's keys and order;
    values ``(total_ids, D)`` (``output="quantized"``) or ``(total_ids, 2 * D)``
    (``output="concat"``) for quantized tables, untouched for the others.

    Args:
        tables: as for ``EmbeddingCollection`` (all tables share one ``embedding_dim``).
        vq: one ``VQConfig`` (all tables) or ``{table_name: VQConfig}``.
        device, need_indices: as for ``EmbeddingCollection``.
        process_group: group the quantizers synchronise over (default: world).
        validate_inputs: check keys, id dtype and id range each forward (one host sync).
    """

    def __init__(
        self,
        tables: list[EmbeddingConfig],
        vq: Mapping[str, VQConfig] | VQConfig,
        device: torch.device | str | None = None,
        process_group: dist.ProcessGroup | None = None,
        need_indices: bool = False,
        validate_inputs: bool = True,
    ) -> None:
        super().__init__()
        device = torch.device(device) if isinstance(device, str) else device
        ec = EmbeddingCollection(tables=tables, device=device, need_indices=need_indices)
        self._setup(ec, vq, process_group, validate_inputs)

    @classmethod
    def from_ec(
        cls,
        ec: EmbeddingCollection,
        vq: Mapping[str, VQConfig] | VQConfig,
        process_group: dist.ProcessGroup | None = None,
        validate_inputs: bool = True,
    ) -> VQEmbeddingCollection:
        """Wrap an existing ``EmbeddingCollection`` (its parameters are kept, not copied)."""
        if not isinstance(ec, EmbeddingCollection):
            raise TypeError(f"expected an EmbeddingCollection, got {type(ec).__name__}")
        self = cls.__new__(cls)
        EmbeddingCollectionInterface.__init__(self)
        self._setup(ec, vq, process_group, validate_inputs)
        return self

    def _setup(
        self,
        ec: EmbeddingCollection,
        vq: Mapping[str, VQConfig] | VQConfig,
        process_group: dist.ProcessGroup | None,
        validate_inputs: bool,
    ) -> None:
        tables = ec.embedding_configs()
        configs = resolve_vq_configs([t.name for t in tables], vq)
        concat = {cfg.output == "concat" for cfg in configs.values()}
        if len(concat) > 1 or (concat == {True} and len(configs) < len(tables)):
            raise ValueError(
                "an EmbeddingCollection has one embedding_dim: use output='concat' for all "
                "tables or for none"
            )
        layout = CollectionLayout.from_configs(tables)
        self._layout = layout
        self._vq_configs = configs
        self._output_configs = output_configs(tables, configs)
        self._validate_inputs = validate_inputs
        # kept here: the sharded EC does not expose them
        self._need_indices = ec.need_indices()
        self._storage_dim = ec.embedding_dim()
        self._first_table = tables[0].name
        self._names_by_table = ec.embedding_names_by_table()
        self.input_check = KJTValidator(layout.feature_rows)
        self.ec = ec
        self.quantize = JaggedQuantizer(
            keys=layout.keys,
            key_tables=layout.key_tables,
            table_dims={t.name: t.embedding_dim for t in tables if t.name in configs},
            configs=configs,
            process_group=process_group,
            device=ec.device,
        )

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        """``features`` -> ``{key: JaggedTensor}`` with values ``(total_ids, out_dim)``."""
        if self._validate_inputs:
            self.input_check(features)
        if not is_fx_tracing() and features.stride() == 0:
            empty = torch.zeros(0, dtype=torch.long, device=self.device)
            return {  # TorchRec's EC cannot look up a batch of 0
                k: JaggedTensor(values=torch.zeros(0, d, device=self.device), lengths=empty)
                for k, d in self.output_dims().items()
            }
        return self.quantize(self.ec(features))

    # --- EmbeddingCollectionInterface ------------------------------------------------------
    def embedding_configs(self) -> list[EmbeddingConfig]:
        """Table configs with ``embedding_dim`` = the output width of each table's keys."""
        return self._output_configs

    def need_indices(self) -> bool:
        return self._need_indices

    def embedding_dim(self) -> int:
        """Output width (``2 * D`` when every table uses ``output="concat"``)."""
        return output_dim(self._storage_dim, self._vq_configs.get(self._first_table))

    def embedding_names_by_table(self) -> list[list[str]]:
        return self._names_by_table

    @property
    def device(self) -> torch.device:
        """Compute device (also once ``ec`` is sharded, where it has no ``device``)."""
        device = getattr(self.ec, "device", None) or getattr(self.ec, "_device", None)
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
        return {
            k: output_dim(self._layout.key_dims[k], self._vq_configs.get(self._layout.key_tables[k]))
            for k in self._layout.keys
        }

    @torch.no_grad()
    def codes(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        """``{key: JaggedTensor}`` of the code of every looked-up id of the quantized keys
        (values long ``(total_ids,)`` / ``(total_ids, dim)`` / ``(total_ids, num_levels)``)."""
        if self._validate_inputs:
            self.input_check(features)
        return self.quantize.encode(self.ec(features))

    @torch.no_grad()
    def export_codes(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """Codes of rows ``ids`` ``(n,)`` of quantized ``table`` (no state change; a
        collective when ``ec`` is sharded: every rank calls it with the same ``n``)."""
        if table not in self._vq_configs:
            raise ValueError(
                f"table {table!r} is not quantized (quantized tables: {list(self._vq_configs)})"
            )
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"ids must be an int32/int64 tensor, got {getattr(ids, 'dtype', ids)}")
        key = self._layout.table_keys[table][0]
        feature = self._layout.key_features[key]
        features = list(self._layout.feature_rows)
        ids = ids.reshape(-1).to(device=self.device, dtype=torch.int64)
        n = ids.numel()
        lengths = torch.zeros(len(features), n, dtype=torch.int64, device=ids.device)
        lengths[features.index(feature)] = 1
        kjt = KeyedJaggedTensor(keys=features, values=ids, lengths=lengths.view(-1))
        self.input_check(kjt)
        rows = dict(self.ec(kjt).items())[key].values()  # items(): waits when sharded
        return self.quantize.encode_table(table, rows)
