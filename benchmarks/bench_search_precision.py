"""Nearest-code search, ``search_precision="fp32"`` vs ``"bf16"``: time per call and code agreement.

At the DLRM goal shape (8192 rows, dim 128, K 1024) by default. Codebooks: ``random``
(Gaussian codes, Gaussian rows) and ``kmeans`` (a ``VectorQuantizer`` k-means init, 5
iterations, on the rows, as in the DLRM benchmark). Agreement = share of rows whose code
equals the exact fp32 search's; ``max excess`` = largest extra squared distance of a
disagreeing row relative to ``||x||^2``. Times: median process CPU time of ``--reps`` calls.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_search_precision.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from vq_torchrec.quantization.distances import l2_normalize, nearest_codes
from vq_torchrec.quantization.fast_search import nearest_codes_bf16
from vq_torchrec.quantization.vector_quantizer import VectorQuantizer


def cpu_ms(fn: Callable[[], torch.Tensor], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3


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
    print(f"rows={args.rows} dim={args.dim} K={args.k} chunk_size={args.chunk_size} threads={args.threads}")
    print("| codebook | distance | fp32 ms | bf16 ms | speed-up | agreement (mean ± std over seeds) | max excess |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for kind in ("random", "kmeans"):
        for distance in ("l2", "cosine"):
            t32, t16, agree, excess = [], [], [], []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                x = torch.randn(args.rows, args.dim)
                if kind == "random":
                    book = torch.randn(args.k, args.dim)
                    if distance == "cosine":
                        x, book = l2_normalize(x), l2_normalize(book)
                else:
                    x = (torch.rand(args.rows, args.dim) - 0.5) * 0.1  # DLRM-like uniform table init
                    vq = VectorQuantizer(args.dim, args.k, distance=distance, kmeans_iters=5, restart_every=0)
                    vq(x)
                    book = vq.codebook
                    if distance == "cosine":
                        x = l2_normalize(x)
                ref = nearest_codes(x, book, distance, args.chunk_size)
                fast = nearest_codes_bf16(x, book, distance, args.chunk_size)
                agree.append((fast == ref).double().mean().item())
                worse = (x - book[fast]).pow(2).sum(1) - (x - book[ref]).pow(2).sum(1)
                excess.append((worse / x.pow(2).sum(1).clamp_min(1e-30)).max().item())
                t32.append(cpu_ms(lambda x=x, b=book, d=distance: nearest_codes(x, b, d, args.chunk_size), args.reps))
                t16.append(cpu_ms(lambda x=x, b=book, d=distance: nearest_codes_bf16(x, b, d, args.chunk_size), args.reps))
            a, b = statistics.median(t32), statistics.median(t16)
            sd = statistics.stdev(agree) if len(agree) > 1 else 0.0
            print(
                f"| {kind} | {distance} | {a:.1f} | {b:.1f} | {a / b:.2f}x | "
                f"{100 * statistics.mean(agree):.3f} % ± {100 * sd:.3f} | {max(excess):.2g} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
