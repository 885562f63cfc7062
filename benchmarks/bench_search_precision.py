"""Nearest-code searches side by side: time per call and exactness.

Three searches over the same rows and codebook:

* ``torch fp32``: the fp32 GEMM + ``max`` (``nearest_codes`` with the C++ kernel switched off);
* ``torch bf16``: bf16 candidates + fp32 re-score in torch ops (``nearest_codes_bf16``, same);
* ``certified``: the C++ kernel (``vq_torchrec/quantization/csrc/certified_search.cpp``), bf16
  candidates with a proven error bound + fp32 re-score; what ``nearest_codes`` runs on CPU.

At the DLRM goal shape (8192 rows, dim 128, K 1024) by default. Codebooks: ``random``
(Gaussian codes, Gaussian rows) and ``kmeans`` (a ``VectorQuantizer`` k-means init, 5
iterations, on DLRM-like uniform rows) and ``offset`` (rows and codes ``5 + 0.1 N(0, 1)``: a
common offset 50x their spread). ``optimal`` = share of rows whose code is the best one
in float64 up to fp32 rounding of the score (``4 (d + 2) 2^-24`` times its scale), the
yardstick for all three; ``= fp32`` = share of rows with the torch fp32 search's code;
``worst excess`` = the largest relative excess of a chosen code's float64 distance over the
best code's (0 = every row got a float64-best code).
Times: median process CPU time of ``--reps`` calls; speed-ups are torch fp32 / the search.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_search_precision.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from vq_torchrec.quantization import native
from vq_torchrec.quantization.distances import l2_normalize, nearest_codes
from vq_torchrec.quantization.fast_search import nearest_codes_bf16
from vq_torchrec.quantization.vector_quantizer import VectorQuantizer


def cpu_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3


def optimal_share(x: torch.Tensor, book: torch.Tensor, codes: torch.Tensor, distance: str) -> float:
    """Share of rows whose code's float64 score is the best up to fp32 rounding."""
    x64, b64 = x.double(), book.double()
    s = x64 @ b64.t()
    if distance == "l2":
        s = 2 * s - b64.pow(2).sum(1)
    scale = 2 * x64.norm(dim=1) * b64.norm(dim=1).max() + b64.pow(2).sum(1).max()
    tol = 4 * (x.shape[1] + 2) * 2.0**-24 * scale
    gap = s.max(dim=1).values - s.gather(1, codes.view(-1, 1)).squeeze(1)
    return (gap <= tol).double().mean().item()


def worst_excess(x: torch.Tensor, book: torch.Tensor, codes: torch.Tensor, distance: str) -> float:
    """Largest relative excess of the chosen code's float64 distance over the best one
    (``||x - c||^2 / min - 1`` for l2, ``(1 - x.c) / (1 - max x.c) - 1`` for cosine)."""
    x64, b64 = x.double(), book.double()
    if distance == "l2":
        dist = torch.cdist(x64, b64).pow(2)
    else:
        dist = 1 - x64 @ b64.t()
    best = dist.min(dim=1).values
    chosen = dist.gather(1, codes.view(-1, 1)).squeeze(1)
    return ((chosen - best) / best.clamp_min(1e-300)).max().item()


def data(kind: str, distance: str, rows: int, dim: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(rows, dim)
    if kind == "random":
        book = torch.randn(k, dim)
        if distance == "cosine":
            x, book = l2_normalize(x), l2_normalize(book)
        return x, book
    if kind == "offset":  # a large common offset: the unshifted fp32 scores lose digits
        x, book = 5 + 0.1 * torch.randn(rows, dim), 5 + 0.1 * torch.randn(k, dim)
        return (l2_normalize(x), l2_normalize(book)) if distance == "cosine" else (x, book)
    x = (torch.rand(rows, dim) - 0.5) * 0.1  # DLRM-like uniform table init
    vq = VectorQuantizer(dim, k, distance=distance, kmeans_iters=5, restart_every=0)
    vq(x)
    return (l2_normalize(x) if distance == "cosine" else x), vq.codebook


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--chunk-size", type=int, default=8192)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit("the C++ kernel is not built on this machine: nothing to compare")
    print(f"rows={args.rows} dim={args.dim} K={args.k} chunk_size={args.chunk_size} threads={args.threads}")
    print(
        "| codebook | distance | torch fp32 ms | torch bf16 ms | certified ms | certified speed-up "
        "| candidates / row | optimal: torch fp32 / torch bf16 / certified | certified = fp32 "
        "| worst excess distance: torch fp32 / torch bf16 / certified |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---|")
    cs = args.chunk_size
    for kind in ("random", "kmeans", "offset"):
        for distance in ("l2", "cosine"):
            t32, t16, tc, cands = [], [], [], []
            opt: dict[str, list[float]] = {"fp32": [], "bf16": [], "cert": []}
            excess: dict[str, list[float]] = {"fp32": [], "bf16": [], "cert": []}
            same = []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                x, book = data(kind, distance, args.rows, args.dim, args.k)
                with native.disabled():
                    ref = nearest_codes(x, book, distance, cs)
                    fast = nearest_codes_bf16(x, book, distance, cs)
                    t32.append(cpu_ms(lambda x=x, b=book, d=distance: nearest_codes(x, b, d, cs), args.reps))
                    t16.append(cpu_ms(lambda x=x, b=book, d=distance: nearest_codes_bf16(x, b, d, cs), args.reps))
                cert, _, stats = native.certified_search(x, book, distance, cs)
                tc.append(cpu_ms(lambda x=x, b=book, d=distance: native.certified_search(x, b, d, cs), args.reps))
                cands.append(stats[0].item() / args.rows)
                for name, codes in (("fp32", ref), ("bf16", fast), ("cert", cert)):
                    opt[name].append(optimal_share(x, book, codes, distance))
                    excess[name].append(worst_excess(x, book, codes, distance))
                same.append((cert == ref).double().mean().item())
            a, b, c = statistics.median(t32), statistics.median(t16), statistics.median(tc)
            shares = " / ".join(f"{100 * statistics.mean(opt[n]):.3f} %" for n in ("fp32", "bf16", "cert"))
            print(
                f"| {kind} | {distance} | {a:.1f} | {b:.1f} | {c:.1f} | {a / c:.2f}x | "
                f"{statistics.mean(cands):.2f} | {shares} | {100 * statistics.mean(same):.3f} % | "
                + " / ".join(f"{max(excess[n]):.1e}" for n in ("fp32", "bf16", "cert"))
                + " |",
                flush=True,
            )


if __name__ == "__main__":
    main()
