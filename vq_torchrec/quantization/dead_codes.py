"""Dead-code tracking and restart.

A code is dead when its EMA share of the (global) assignments is below
``dead_code_threshold / codebook_size``: a ratio, so it does not depend on the world size or
the batch size. Restarted codes take rank 0's random rows of the current batch (broadcast,
so every rank replaces the same codes with the same vectors) and their statistics are reset
to twice the threshold share, giving them a grace period before they can be retired again.
"""

from __future__ import annotations

import torch


def dead_mask(usage_ema: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(K,)`` bool: codes whose share of ``usage_ema`` is under ``threshold / K``.
    All ``False`` while nothing has been counted."""
    k = usage_ema.shape[0]
    return usage_ema < (threshold / k) * usage_ema.sum()


def reset_share(stat: torch.Tensor, threshold: float, floor: float = 0.0) -> torch.Tensor:
    """0-d value ``2 * threshold / K * stat.sum()`` (at least ``floor``) for a restarted code."""
    k = stat.shape[0]
    return ((2.0 * threshold / k) * stat.sum()).clamp_min(floor)
