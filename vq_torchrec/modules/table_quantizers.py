"""One quantizer per table, the state shared by the pooled and the sequence VQ leaves."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from vq_torchrec.quantization.config import VQConfig
from vq_torchrec.quantization.output import VQOutput


class TableQuantizers(nn.Module):
    """Holds ``quantizers[table]`` (built by ``vq_torchrec.quantization.build_quantizer``)
    and the :class:`VQOutput` of the last forward per table.

    The quantizers are dense and replicated. Their EMA statistics, k-means init and
    dead-code restarts are all-reduced by the quantizer itself over ``process_group``
    (default: the world), so codebooks stay identical on every rank.

    Args:
        table_dims: ``{table_name: embedding_dim}`` of the quantized tables.
        configs: ``{table_name: VQConfig}`` (same keys as ``table_dims``).
        process_group: group the quantizers synchronise over (``None`` = world).
        device: device of the quantizer buffers and parameters.
    """

    def __init__(
        self,
        table_dims: Mapping[str, int],
        configs: Mapping[str, VQConfig],
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        from vq_torchrec.quantization import build_quantizer

        self._configs: dict[str, VQConfig] = dict(configs)
        self.quantizers = nn.ModuleDict(
            {
                name: build_quantizer(dim, configs[name], process_group=process_group)
                for name, dim in table_dims.items()
            }
        )
        if device is not None and torch.device(device).type != "meta":
            self.quantizers.to(device)
        self._last_outputs: dict[str, VQOutput] = {}

    @property
    def configs(self) -> dict[str, VQConfig]:
        """``{table_name: VQConfig}`` of the quantized tables."""
        return self._configs

    def quantize_table(self, table: str, z: torch.Tensor) -> VQOutput:
        """Quantize ``z`` ``(N, dim)`` with ``table``'s quantizer and remember the output."""
        out = self.quantizers[table](z)
        self._last_outputs[table] = out
        return out

    @torch.no_grad()
    def encode_table(self, table: str, z: torch.Tensor) -> torch.Tensor:
        """Codes of ``z`` ``(N, dim)`` under ``table``'s codebook, without any state change.

        Returns:
            long ``(N,)`` (vector mode), ``(N, dim)`` (outer) or ``(N, num_levels)`` (residual).
        """
        return self.quantizers[table].encode(z)

    def aux_loss(self) -> torch.Tensor:
        """Sum of the auxiliary VQ losses of the last forward (fp32 scalar, 0 if none)."""
        losses = [out.loss for out in self._last_outputs.values()]
        if not losses:
            return torch.zeros((), dtype=torch.float32, device=self._device())
        return torch.stack([loss.float() for loss in losses]).sum()

    def last_outputs(self) -> dict[str, VQOutput]:
        """``{table_name: VQOutput}`` of the last forward (tables seen in it)."""
        return dict(self._last_outputs)

    def stats(self) -> dict[str, dict[str, float]]:
        """Per table ``{"perplexity", "usage", "dead_codes", "loss"}`` of the last forward.

        Reads the stats to host floats (a host sync; meant for logging).
        """
        return {
            table: {
                "perplexity": float(out.perplexity),
                "usage": float(out.usage),
                "dead_codes": float(out.dead_codes),
                "loss": float(out.loss.detach()),
            }
            for table, out in self._last_outputs.items()
        }

    def _device(self) -> torch.device:
        for tensor in self.quantizers.parameters():
            return tensor.device
        for tensor in self.quantizers.buffers():
            return tensor.device
        return torch.device("cpu")
