"""PNG summary of a run: training loss curve, validation AUC per epoch, codebook usage per table."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out: list[float] = []
    acc = 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_run(
    path: str | os.PathLike[str],
    losses: Sequence[float],
    history: Sequence[Mapping[str, Any]],
    codebook: Mapping[str, Mapping[str, float]] | None = None,
    title: str = "",
) -> Path:
    """Write a 3-panel PNG: loss per step (raw + moving average), val AUC / log-loss per epoch,
    codebook usage and perplexity/K per table (panel says "no VQ" for a plain model)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))

    ax = axes[0]
    if losses:
        steps = list(range(1, len(losses) + 1))
        ax.plot(steps, losses, alpha=0.3, lw=0.8, label="step loss")
        ax.plot(steps, _smooth(list(losses), max(1, len(losses) // 50)), lw=1.5, label="moving avg")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (BCE + VQ)")
    ax.set_title("training loss")

    ax = axes[1]
    epochs = [int(h["epoch"]) + 1 for h in history]
    aucs = [h.get("val_auc") for h in history]
    if epochs:
        ax.plot(epochs, aucs, "o-", color="C0", label="val AUC")
        ax.set_ylabel("val AUC", color="C0")
        ax2 = ax.twinx()
        ax2.plot(epochs, [h.get("val_logloss") for h in history], "s--", color="C3", label="val log-loss")
        ax2.set_ylabel("val log-loss", color="C3")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("validation")

    ax = axes[2]
    if codebook:
        names = list(codebook)
        usage = [codebook[n].get("usage", float("nan")) for n in names]
        ax.bar(range(len(names)), usage, color="C2")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("codebook usage (fraction of codes used)")
        for i, n in enumerate(names):
            ppl = codebook[n].get("perplexity")
            if ppl is not None:
                ax.text(i, min(usage[i], 1.0) + 0.02, f"ppl {ppl:.0f}", ha="center", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no VQ layer (plain embeddings)", ha="center", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title("codebook usage per table")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
