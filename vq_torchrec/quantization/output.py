"""The value every quantizer returns."""

from __future__ import annotations

from typing import NamedTuple

import torch


class VQOutput(NamedTuple):
    """Result of a quantizer forward pass (unpacks like vector-quantize-pytorch:
    ``quantized, codes, loss, *stats = vq(z)``).

    Attributes:
        quantized: ``(N, dim)``, same dtype as the input; straight-through (or rotation
            trick) gradients flow to ``z``.
        codes: long. ``(N,)`` for ``mode="vector"``, ``(N, dim)`` for ``mode="outer"``,
            ``(N, num_levels)`` for residual VQ.
        loss: fp32 scalar, the auxiliary VQ loss (codebook + ``beta`` * commitment), already
            summed over residual levels. Add it to the task loss.
        perplexity: fp32 scalar, ``exp(entropy)`` of the code histogram of this batch.
        usage: fp32 scalar, fraction of codes used in this batch.
        dead_codes: long scalar, number of codes the dead-code tracker considers dead.
    All stats are tensors: reading them (``.item()``) is the caller's host sync, not ours.
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor
    dead_codes: torch.Tensor
