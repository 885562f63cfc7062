"""ResidualVectorQuantizer: ``num_levels`` quantizers, each coding what the previous left.

Level ``l`` quantizes the residual ``r_l = z - sum_{j<l} q_j`` (``q_j`` detached), so the codes
``(N, num_levels)`` form a coarse-to-fine semantic ID. The output is ``sum_l q_l`` with one
straight-through (or rotation-trick) estimator against ``z`` for the whole stack, so
``d quantized / d z = I``. The loss is the sum of the levels' losses (each level's commitment
term pulls ``z`` towards its partial reconstruction).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vq_torchrec.quantization.distributed import ProcessGroup
from vq_torchrec.quantization.output import VQOutput
from vq_torchrec.quantization.rotation import rotation_trick, straight_through
from vq_torchrec.quantization.stats import perplexity, usage
from vq_torchrec.quantization.validation import validate_input
from vq_torchrec.quantization.vector_quantizer import VectorQuantizer


class ResidualVectorQuantizer(nn.Module):
    """Residual VQ over ``(N, dim)`` (or ``(*, dim)``) inputs.

    Args:
        dim: vector size.
        num_levels: number of residual levels (>= 1).
        codebook_size: codes per level.
        process_group: as for :class:`VectorQuantizer`.
        **kwargs: every other :class:`VectorQuantizer` keyword (mode, distance, update, ...).

    Output: ``codes`` ``(N, num_levels)`` (``(N, num_levels, dim)`` for ``mode="outer"``);
    ``loss`` summed over levels; ``perplexity`` and ``usage`` averaged over levels;
    ``dead_codes`` summed over levels. Per-level values: :meth:`level_stats`.
    """

    def __init__(
        self,
        dim: int,
        num_levels: int,
        codebook_size: int = 256,
        *,
        process_group: ProcessGroup = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(num_levels, bool) or not isinstance(num_levels, int):
            raise TypeError(f"ResidualVectorQuantizer: num_levels must be an int, got {type(num_levels).__name__}")
        if num_levels < 1:
            raise ValueError(f"ResidualVectorQuantizer: num_levels must be >= 1, got {num_levels}")
        self.rotation_trick = bool(kwargs.get("rotation_trick", False))
        self.levels = nn.ModuleList(
            VectorQuantizer(dim, codebook_size, process_group=process_group, **kwargs) for _ in range(num_levels)
        )
        self.dim = dim
        self.num_levels = num_levels
        self.codebook_size = codebook_size
        self.mode = self.levels[0].mode
        self._last_counts: list[torch.Tensor] = []

    @property
    def codebook(self) -> torch.Tensor:
        """``(num_levels, K, dim)`` fp32 codebooks, detached."""
        return torch.stack([level.codebook for level in self.levels])

    def forward(self, z: torch.Tensor) -> VQOutput:
        validate_input(z, self.dim, who="ResidualVectorQuantizer")
        lead = z.shape[:-1]
        with torch.autocast(device_type=z.device.type, enabled=False):
            z2 = z.reshape(-1, self.dim)
            z32 = z2.float()
            residual = z32
            total = torch.zeros_like(z32)
            codes, losses, counts = [], [], []
            for level in self.levels:
                res = level.quantize_fp32(residual)
                total = total + res.q
                residual = residual - res.q
                codes.append(res.codes)
                losses.append(res.loss)
                counts.append(res.counts)
            if self.rotation_trick:
                quantized = rotation_trick(z32, total, z.dtype)
            else:
                quantized = straight_through(z32, total, z.dtype)
        self._last_counts = [c.detach() for c in counts]
        stacked = torch.stack(codes, dim=1)
        return VQOutput(
            quantized=quantized.reshape(z.shape),
            codes=stacked.reshape(*lead, *stacked.shape[1:]),
            loss=torch.stack(losses).sum(),
            perplexity=torch.stack([perplexity(c) for c in counts]).mean(),
            usage=torch.stack([usage(c) for c in counts]).mean(),
            dead_codes=torch.stack([level.dead_code_count() for level in self.levels]).sum(),
        )

    def level_stats(self) -> list[dict[str, torch.Tensor]]:
        """Per-level ``perplexity``/``usage`` of the last forward and ``dead_codes`` now."""
        return [
            {"perplexity": perplexity(c), "usage": usage(c), "dead_codes": level.dead_code_count()}
            for c, level in zip(self._last_counts, self.levels)
        ]

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """``(N, num_levels)`` codes (outer: ``(N, num_levels, dim)``); no grad, no state change."""
        validate_input(z, self.dim, who="ResidualVectorQuantizer")
        lead = z.shape[:-1]
        with torch.autocast(device_type=z.device.type, enabled=False):
            residual = z.reshape(-1, self.dim).float()
            codes = []
            for level in self.levels:
                rows, _ = level._rows(residual)
                book = level.codebook
                c = level.assign(rows, book)
                residual = residual - level._decode_rows(residual, book, c)
                codes.append(c)
        stacked = torch.stack(codes, dim=1)
        return stacked.reshape(*lead, *stacked.shape[1:])

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``(*, dim)`` sum of the levels' code vectors for ``(*, num_levels)`` vector-mode codes."""
        if codes.shape[-1] != self.num_levels:
            raise ValueError(
                f"ResidualVectorQuantizer.decode: expected codes of shape (N, {self.num_levels}), got {tuple(codes.shape)}"
            )
        return sum(level.decode(codes[..., i]) for i, level in enumerate(self.levels))

    def refresh_from_buffers(self) -> None:
        for level in self.levels:
            level.refresh_from_buffers()
