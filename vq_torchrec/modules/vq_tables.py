"""Resolve the ``vq`` argument of the VQ collections into one :class:`VQConfig` per table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vq_torchrec.quantization.config import VQConfig


def resolve_vq_configs(
    table_names: Sequence[str],
    vq: Mapping[str, VQConfig] | VQConfig | None,
) -> dict[str, VQConfig]:
    """Map each quantized table name to its :class:`VQConfig`.

    Args:
        table_names: names of the tables of the collection, in config order.
        vq: one ``VQConfig`` (every table is quantized), a ``{table_name: VQConfig}`` dict
            (only those tables are quantized, the others pass through), or ``None`` (none).

    Returns:
        ``{table_name: VQConfig}`` in the collection's table order.

    Raises:
        ValueError: a table named in ``vq`` is not in the collection.
        TypeError: ``vq`` (or one of its values) is not a ``VQConfig``.
    """
    if vq is None:
        return {}
    if isinstance(vq, VQConfig):
        return {name: vq for name in table_names}
    if not isinstance(vq, Mapping):
        raise TypeError(
            f"vq must be a VQConfig or a dict[str, VQConfig], got {type(vq).__name__}"
        )
    unknown = [name for name in vq if name not in table_names]
    if unknown:
        raise ValueError(
            f"vq names tables {unknown} that are not in the collection "
            f"(its tables: {list(table_names)})"
        )
    for name, cfg in vq.items():
        if not isinstance(cfg, VQConfig):
            raise TypeError(f"vq[{name!r}] must be a VQConfig, got {type(cfg).__name__}")
    return {name: vq[name] for name in table_names if name in vq}


def output_dim(embedding_dim: int, cfg: VQConfig | None) -> int:
    """Width of one key's output: ``embedding_dim``, doubled for ``output="concat"``."""
    if cfg is not None and cfg.output == "concat":
        return 2 * embedding_dim
    return embedding_dim
