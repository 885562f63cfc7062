"""VQ embedding collections (drop-ins for TorchRec's EBC / EC) and model-level helpers."""

from vq_torchrec.modules.input_validation import KJTValidator
from vq_torchrec.modules.jagged_quantizer import JaggedQuantizer
from vq_torchrec.modules.keyed_tensor_quantizer import KeyedTensorQuantizer
from vq_torchrec.modules.model_utils import swap_in_vq, vq_loss, vq_output_dims, vq_stats
from vq_torchrec.modules.table_quantizers import TableQuantizers
from vq_torchrec.modules.vq_embedding_bag_collection import VQEmbeddingBagCollection
from vq_torchrec.modules.vq_embedding_collection import VQEmbeddingCollection

__all__ = [
    "JaggedQuantizer",
    "KJTValidator",
    "KeyedTensorQuantizer",
    "TableQuantizers",
    "VQEmbeddingBagCollection",
    "VQEmbeddingCollection",
    "swap_in_vq",
    "vq_loss",
    "vq_output_dims",
    "vq_stats",
]
