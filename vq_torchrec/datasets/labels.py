"""Binary labels from explicit ratings."""

from __future__ import annotations

import numpy as np
import pandas as pd


def binarize(
    ratings: pd.DataFrame,
    threshold: float = 4.0,
    drop_neutral: bool = False,
    neutral: float = 3.0,
) -> pd.DataFrame:
    """Add a ``label`` column (float32): 1.0 where ``rating >= threshold``, else 0.0.

    Args:
        ratings: a ratings DataFrame with a ``rating`` column.
        threshold: smallest positive rating (default 4: ratings 4-5 positive).
        drop_neutral: drop rows whose rating equals ``neutral`` first, as RecBole's ml-1m CTR
            protocol does (drop 3s, 4-5 positive, 1-2 negative).
        neutral: the rating dropped by ``drop_neutral``.

    Returns:
        A new DataFrame (the input is not modified); the index is kept.
    """
    if "rating" not in ratings.columns:
        raise ValueError(f"binarize needs a 'rating' column; columns are {list(ratings.columns)}")
    out = ratings[ratings["rating"] != neutral] if drop_neutral else ratings
    out = out.copy()
    out["label"] = (out["rating"].to_numpy() >= threshold).astype(np.float32)
    return out
