"""Vector quantizers (VQ-VAE style) with EMA/gradient codebooks, outer mode and residual VQ."""

from vq_torchrec.quantization.config import VQConfig
from vq_torchrec.quantization.factory import Quantizer, build_quantizer
from vq_torchrec.quantization.output import VQOutput
from vq_torchrec.quantization.residual_quantizer import ResidualVectorQuantizer
from vq_torchrec.quantization.vector_quantizer import VectorQuantizer

__all__ = [
    "Quantizer",
    "ResidualVectorQuantizer",
    "VQConfig",
    "VQOutput",
    "VectorQuantizer",
    "build_quantizer",
]
