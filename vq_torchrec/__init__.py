"""vq_torchrec: vector-quantization layers over TorchRec embedding tables.

The main entry points, re-exported here:

- :class:`VQConfig`: every quantizer option (one dataclass).
- :class:`VectorQuantizer` / :class:`ResidualVectorQuantizer`: the quantizers
  (``quantized, codes, loss, *stats = vq(z)``).
- :class:`VQEmbeddingBagCollection` / :class:`VQEmbeddingCollection`: drop-ins for TorchRec's
  ``EmbeddingBagCollection`` / ``EmbeddingCollection``.
- :func:`vq_loss`, :func:`vq_stats`, :func:`swap_in_vq`: model-level helpers.
"""

from vq_torchrec.modules import (
    VQEmbeddingBagCollection,
    VQEmbeddingCollection,
    swap_in_vq,
    vq_loss,
    vq_output_dims,
    vq_stats,
)
from vq_torchrec.quantization import ResidualVectorQuantizer, VectorQuantizer, build_quantizer
from vq_torchrec.quantization.config import VQConfig
from vq_torchrec.quantization.output import VQOutput

__all__ = [
    "ResidualVectorQuantizer",
    "VQConfig",
    "VQEmbeddingBagCollection",
    "VQEmbeddingCollection",
    "VQOutput",
    "VectorQuantizer",
    "build_quantizer",
    "swap_in_vq",
    "vq_loss",
    "vq_output_dims",
    "vq_stats",
]
