"""``results.json``: final metrics, per-epoch history and codebook statistics of a run."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn


def codebook_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per-table codebook statistics (perplexity, usage, dead codes) as plain floats.

    Empty for a model without VQ modules.
    """
    try:
        from vq_torchrec.modules import vq_stats
    except ImportError:  # pragma: no cover
        return {}
    try:
        raw = vq_stats(model)
    except ValueError:
        return {}
    return {str(table): _to_floats(stats) for table, stats in raw.items()}


def _to_floats(stats: Any) -> dict[str, float]:
    if isinstance(stats, Mapping):
        items = stats.items()
    elif hasattr(stats, "_asdict"):
        items = stats._asdict().items()
    elif hasattr(stats, "__dict__"):
        items = vars(stats).items()
    else:
        raise TypeError(f"unsupported codebook stats type {type(stats).__name__}")
    out: dict[str, float] = {}
    for k, v in items:
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                continue
            v = v.item()
        if isinstance(v, (int, float)):
            out[str(k)] = float(v)
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_results(path: str | os.PathLike[str], results: Mapping[str, Any]) -> Path:
    """Write ``results`` as indented JSON atomically (temp file + ``os.replace``)."""
    for key in ("auc", "logloss"):
        if key not in results:
            raise ValueError(f"results must contain {key!r}; got keys {sorted(results)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(_jsonable(results), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path
