"""VQConfig: every quantizer option in one dataclass (the TorchRec-style config)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Mode = Literal["vector", "outer"]
Distance = Literal["l2", "cosine"]
Update = Literal["loss", "ema"]
Output = Literal["quantized", "concat"]
SearchPrecision = Literal["fp32", "bf16"]


@dataclass
class VQConfig:
    """Options of a :class:`~vq_torchrec.quantization.VectorQuantizer` (or residual VQ when
    ``num_levels > 1``) plus how a VQ embedding collection emits it.

    Quantizer options (keyword arguments of ``VectorQuantizer``):
        codebook_size: number of codewords ``K``.
        mode: ``"vector"`` (VQ-VAE) or ``"outer"`` (signed-root pairwise-product variant).
        distance: ``"l2"`` or ``"cosine"``.
        update: ``"loss"`` (codebook learned by gradient) or ``"ema"`` (VQ-VAE-2 EMA).
        commitment_weight: ``beta`` on the commitment term ``||z - sg[e]||^2``.
        decay, eps: EMA decay and Laplace smoothing epsilon (``update="ema"``).
        kmeans_init, kmeans_iters: k-means initialisation from the first batch.
        dead_code_threshold: a code whose EMA share of assignments falls under
            ``dead_code_threshold / codebook_size`` is dead (world-size independent).
        restart_every: check for dead codes every this many training steps (0 = never).
        rotation_trick: use the rotation trick instead of the straight-through estimator.
        chunk_size: rows per chunk for distance computation (bounds ``chunk * K`` memory).
        search_precision: ``"fp32"`` (exact nearest-code search) or ``"bf16"`` (opt-in,
            ``mode="vector"`` only: a bf16 GEMM picks a few candidates per row, which are
            re-scored exactly in fp32; see :mod:`vq_torchrec.quantization.fast_search`).
            On CPU with the C++ kernel (:mod:`vq_torchrec.quantization.native`) both run the
            certified search, which is exact and faster than either. Statistics, losses and
            k-means init stay fp32 either way.
        num_levels: ``> 1`` builds a ``ResidualVectorQuantizer`` with that many levels.

    Collection option:
        output: ``"quantized"`` (the quantized vector replaces the embedding) or
            ``"concat"`` (``[embedding, quantized]``, so the key's length doubles).
    """

    codebook_size: int = 256
    mode: Mode = "vector"
    distance: Distance = "l2"
    update: Update = "ema"
    commitment_weight: float = 0.25
    decay: float = 0.99
    eps: float = 1e-5
    kmeans_init: bool = True
    kmeans_iters: int = 10
    dead_code_threshold: float = 0.03
    restart_every: int = 100
    rotation_trick: bool = False
    chunk_size: int = 8192
    search_precision: SearchPrecision = "fp32"
    num_levels: int = 1
    output: Output = "quantized"

    def quantizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``VectorQuantizer`` / ``ResidualVectorQuantizer``."""
        kwargs = asdict(self)
        kwargs.pop("output")
        kwargs.pop("num_levels")
        return kwargs
