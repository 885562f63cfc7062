"""vq_torchrec: vector-quantization layers over TorchRec embedding tables."""

from vq_torchrec.quantization.config import VQConfig
from vq_torchrec.quantization.output import VQOutput

__all__ = ["VQConfig", "VQOutput"]
