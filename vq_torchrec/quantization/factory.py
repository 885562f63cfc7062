"""Build a quantizer from a :class:`VQConfig`."""

from __future__ import annotations

from typing import Union

from vq_torchrec.quantization.config import VQConfig
from vq_torchrec.quantization.distributed import ProcessGroup
from vq_torchrec.quantization.residual_quantizer import ResidualVectorQuantizer
from vq_torchrec.quantization.vector_quantizer import VectorQuantizer

Quantizer = Union[VectorQuantizer, ResidualVectorQuantizer]


def build_quantizer(dim: int, config: VQConfig, process_group: ProcessGroup = None) -> Quantizer:
    """``VectorQuantizer`` for ``config.num_levels == 1``, else ``ResidualVectorQuantizer``."""
    if not isinstance(config, VQConfig):
        raise TypeError(f"build_quantizer: expected a VQConfig, got {type(config).__name__}")
    kwargs = config.quantizer_kwargs()
    if config.num_levels > 1:
        return ResidualVectorQuantizer(dim, config.num_levels, process_group=process_group, **kwargs)
    if config.num_levels < 1:
        raise ValueError(f"build_quantizer: num_levels must be >= 1, got {config.num_levels}")
    return VectorQuantizer(dim, process_group=process_group, **kwargs)
