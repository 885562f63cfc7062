"""Quantizer forward+backward time and peak memory: ours vs the seed's formulation vs
vector-quantize-pytorch, side by side in one run (CPU).

    .venv/bin/python benchmarks/bench_quantizer.py            # full grid (~10 min on 2 cores)
    .venv/bin/python benchmarks/bench_quantizer.py --quick    # smoke run

Implementations, all fp32, one training step = forward + ``backward`` of
``quantized.sum() + loss``:

* ``ours``: ``VectorQuantizer(mode="vector", update="ema")`` (k-means init, dead-code restarts);
* ``vqp``: ``vector_quantize_pytorch.VectorQuantize`` 1.32.0 with the same settings (EMA decay
  0.99, eps 1e-5, commitment 0.25, k-means init (2 iterations, in the untimed warm-up, both), straight-through estimator
  i.e. ``rotation_trick=False``, ``threshold_ema_dead_code = 0.03 * N / K`` = our share threshold
  in its count units; it checks for dead codes every step, ours every 100 steps);
* ``ours-outer``: ``VectorQuantizer(mode="outer", update="loss")`` (codebook by gradient);
* ``seed``: :class:`benchmarks.reference_seed_vq.SeedOuterVQ`, the seed's outer formulation
  (``(N, d, d)`` outer product, ``sqrt``, ``cdist``, one-hot), skipped when its estimated
  peak exceeds ``--max-seed-gib``.

Time: wall clock, implementations interleaved round by round after a warm-up step (which
runs the k-means init), best of ``--repeats`` rounds (1 round when the warm-up took over
8 s); ``--threads 1`` by default: on a shared 2-core machine OpenMP threads wait on each
other and small steps get 10-20x slower with 2 threads.
Peak memory: ``tracemalloc``/RSS cannot see torch's CPU allocations reliably (RSS keeps
freed pages and is monotonic), so one extra step per implementation runs under
``torch.profiler`` with ``profile_memory=True``; its allocator events (+bytes on allocation,
-bytes on free) are summed in time order and the maximum is the peak of memory allocated
during the step, on top of what was live before it (model, input).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.reference_seed_vq import SeedOuterVQ, seed_peak_bytes_estimate  # noqa: E402
from vq_torchrec.quantization import VectorQuantizer  # noqa: E402

GIB = 1024**3
# k-means runs once, in the warm-up step, which is not timed: 2 iterations keep the run short.
KMEANS_ITERS = 2
# a configuration whose warm-up took longer than this gets a single timed round
SLOW_WARMUP_S = 8.0


@dataclass
class Impl:
    name: str
    module: torch.nn.Module
    step: Callable[[torch.nn.Module, torch.Tensor], None]
    times: list[float] = field(default_factory=list)
    peak: int | None = None
    note: str = ""


def _step_ours(vq: torch.nn.Module, z: torch.Tensor) -> None:
    x = z.detach().requires_grad_(True)
    out = vq(x)
    (out.quantized.sum() + out.loss).backward()


def _step_vqp(vq: torch.nn.Module, z: torch.Tensor) -> None:
    x = z.detach().unsqueeze(0).requires_grad_(True)
    quantized, _, loss = vq(x)
    (quantized.sum() + loss.sum()).backward()


def _step_seed(vq: torch.nn.Module, z: torch.Tensor) -> None:
    x = z.detach().requires_grad_(True)
    quantized, loss, _, _ = vq(x)
    (quantized.sum() + loss).backward()


def build_impls(n: int, dim: int, k: int, max_seed_gib: float) -> tuple[list[Impl], list[str]]:
    from vector_quantize_pytorch import VectorQuantize

    impls = [
        Impl("ours", VectorQuantizer(dim, k, mode="vector", update="ema", kmeans_iters=KMEANS_ITERS), _step_ours),
        Impl(
            "vqp",
            VectorQuantize(
                dim=dim,
                codebook_size=k,
                decay=0.99,
                eps=1e-5,
                commitment_weight=0.25,
                kmeans_init=True,
                kmeans_iters=KMEANS_ITERS,
                threshold_ema_dead_code=0.03 * n / k,
                rotation_trick=False,
            ),
            _step_vqp,
        ),
        Impl(
            "ours-outer",
            VectorQuantizer(dim, k, mode="outer", update="loss", kmeans_iters=KMEANS_ITERS),
            _step_ours,
        ),
    ]
    skipped = []
    est = seed_peak_bytes_estimate(n, dim, k)
    if est <= max_seed_gib * GIB:
        impls.append(Impl("seed", SeedOuterVQ(dim, k), _step_seed, note=f"est {est / GIB:.2f} GiB"))
    else:
        skipped.append(f"seed skipped: estimated peak {est / GIB:.1f} GiB > cap {max_seed_gib} GiB")
    return impls, skipped


def peak_allocated(fn: Callable[[], None]) -> int:
    """Peak bytes allocated by torch's CPU allocator while ``fn`` runs (see module doc)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def nan_fraction_of_seed_rows(z: torch.Tensor) -> float:
    """Fraction of the seed's ``sqrt(z_i z_j)`` rows holding a NaN (their cdist row is all NaN)."""
    sample = z[:256]
    roots = torch.sqrt(torch.bmm(sample.unsqueeze(2), sample.unsqueeze(1)))
    return float(torch.isnan(roots).any(dim=2).float().mean())


def run_config(n: int, dim: int, k: int, repeats: int, max_seed_gib: float) -> dict[str, Any]:
    torch.manual_seed(0)
    z = torch.randn(n, dim)
    impls, skipped = build_impls(n, dim, k, max_seed_gib)
    t0 = time.perf_counter()
    for impl in impls:  # warm-up: k-means init, allocator, lazy imports
        impl.module.train()
        impl.step(impl.module, z)
    rounds = repeats if time.perf_counter() - t0 < SLOW_WARMUP_S else 1
    for _ in range(rounds):
        for impl in impls:
            t0 = time.perf_counter()
            impl.step(impl.module, z)
            impl.times.append(time.perf_counter() - t0)
    for impl in impls:
        gc.collect()
        impl.peak = peak_allocated(lambda impl=impl: impl.step(impl.module, z))
    outer = next(i for i in impls if i.name == "ours-outer")
    with torch.no_grad():
        outer_finite = bool(torch.isfinite(outer.module.eval()(z).quantized).all())
    row: dict[str, Any] = {"N": n, "dim": dim, "K": k, "rounds": rounds, "skipped": skipped, "impls": {}}
    for impl in impls:
        row["impls"][impl.name] = {
            "time_s": min(impl.times),
            "times_s": impl.times,
            "peak_bytes": impl.peak,
            "note": impl.note,
        }
    row["seed_estimate_bytes"] = seed_peak_bytes_estimate(n, dim, k)
    row["seed_nan_row_fraction"] = nan_fraction_of_seed_rows(z)
    row["ours_outer_finite"] = outer_finite
    del impls
    gc.collect()
    return row


def _fmt_t(x: float | None) -> str:
    return "—" if x is None else (f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s")


def _fmt_m(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x / GIB:.2f} GiB" if x >= GIB else f"{x / 2**20:.1f} MiB"


def to_markdown(rows: list[dict[str, Any]], command: str, meta: dict[str, Any]) -> str:
    lines = [
        "## Quantizer: forward+backward time and peak memory (CPU)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} thread(s), machine load ~{meta['load']}; "
        f"vector-quantize-pytorch {meta['vqp']}. Wall time best of {meta['repeats']} interleaved "
        "rounds after a warm-up step (1 round where the warm-up took over 8 s: see `rounds`); peak = max bytes allocated by torch's CPU allocator during one "
        "step (torch.profiler memory events), on top of model + input. No GPU was lent to this task: "
        "CPU figures only.",
        "",
        "| N | dim | K | rounds | ours | vqp | **vqp/ours time** | ours-outer | seed (outer) | seed/ours-outer time "
        "| ours mem | vqp mem | ours-outer mem | seed mem | **seed/ours-outer mem** |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    # the seed estimate vs its measured peak where it ran: skipped rows get est / max(that) as
    # a conservative lower bound of the seed's peak
    overshoot = max(
        (r["seed_estimate_bytes"] / r["impls"]["seed"]["peak_bytes"] for r in rows if "seed" in r["impls"]),
        default=1.0,
    )
    for r in rows:
        im = r["impls"]
        ours, vqp, outer = im["ours"], im["vqp"], im["ours-outer"]
        seed = im.get("seed")
        speed = vqp["time_s"] / ours["time_s"]
        if seed is not None:
            seed_t, seed_m = _fmt_t(seed["time_s"]), _fmt_m(seed["peak_bytes"])
            t_ratio = f"{seed['time_s'] / outer['time_s']:.1f}x"
            m_ratio = f"{seed['peak_bytes'] / outer['peak_bytes']:.1f}x"
        else:
            est = r["seed_estimate_bytes"]
            seed_t = "skipped"
            seed_m = f"skipped (est. {_fmt_m(est)})"
            t_ratio = "—"
            m_ratio = f"≥{est / overshoot / outer['peak_bytes']:.0f}x (est.)"
        lines.append(
            f"| {r['N']} | {r['dim']} | {r['K']} | {r['rounds']} | {_fmt_t(ours['time_s'])} | {_fmt_t(vqp['time_s'])} | "
            f"**{speed:.1f}x** | {_fmt_t(outer['time_s'])} | {seed_t} | {t_ratio} | "
            f"{_fmt_m(ours['peak_bytes'])} | {_fmt_m(vqp['peak_bytes'])} | {_fmt_m(outer['peak_bytes'])} | "
            f"{seed_m} | **{m_ratio}** |"
        )
    nan = max(r["seed_nan_row_fraction"] for r in rows)
    lines += [
        "",
        f"Skipped seed rows: its peak is estimated as 4 x (4 N d^2 + 3 N d K) bytes, which overshoots "
        f"the measured peak by up to {overshoot:.2f}x where the seed ran; the ratio shown is "
        f"estimate / {overshoot:.2f} / ours-outer's measured peak (an estimate, not a measurement).",
    ]
    finite = all(r["ours_outer_finite"] for r in rows)
    lines += [
        "",
        f"Seed formulation: up to {nan:.0%} of its `sqrt(z_i z_j)` rows contain NaN (so their `cdist` "
        f"rows are NaN) on Gaussian inputs; ours-outer output finite in every configuration: {finite}.",
    ]
    skipped = [f"N={r['N']} dim={r['dim']} K={r['K']}: {s}" for r in rows for s in r["skipped"]]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke grid")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (1: on a shared machine OpenMP threads wait on each other; see results)",
    )
    parser.add_argument("--max-seed-gib", type=float, default=4.0, help="skip the seed above this estimated peak")
    parser.add_argument("--output", default=None, help="write the markdown section here")
    parser.add_argument("--json", default=None, help="write raw numbers here")
    parser.add_argument("--render-json", default=None, help="only re-render the markdown of a saved --json run")
    args = parser.parse_args()
    if args.render_json:
        with open(args.render_json) as f:
            saved = json.load(f)
        md = to_markdown(saved["rows"], saved["meta"]["command"], saved["meta"])
        print(md)
        if args.output:
            with open(args.output, "w") as f:
                f.write(md)
        return
    torch.set_num_threads(args.threads)
    if args.quick:
        grid = [(1024, 16, 256), (1024, 64, 256)]
    else:
        grid = [(n, d, k) for n in (4096, 65536) for d in (16, 64) for k in (256, 4096)]
    try:
        from importlib.metadata import version

        import vector_quantize_pytorch  # noqa: F401

        vqp_version = version("vector-quantize-pytorch")
    except ImportError:
        sys.exit("vector-quantize-pytorch is missing: .venv/bin/pip install -r requirements/bench.txt")
    rows = []
    t_start = time.perf_counter()
    for n, d, k in grid:
        t0 = time.perf_counter()
        row = run_config(n, d, k, args.repeats, args.max_seed_gib)
        rows.append(row)
        im = row["impls"]
        print(
            f"N={n:6d} d={d:3d} K={k:5d} | "
            + " | ".join(f"{name} {_fmt_t(v['time_s'])} {_fmt_m(v['peak_bytes'])}" for name, v in im.items())
            + f" | vqp/ours {im['vqp']['time_s'] / im['ours']['time_s']:.2f}x"
            + (f" | seed/outer mem {im['seed']['peak_bytes'] / im['ours-outer']['peak_bytes']:.1f}x" if "seed" in im else "")
            + f" ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "vqp": vqp_version,
        "repeats": args.repeats,
        "load": f"{os.getloadavg()[0]:.1f}",
        "total_s": time.perf_counter() - t_start,
    }
    command = "cd /work/main && .venv/bin/python " + " ".join(["benchmarks/bench_quantizer.py", *sys.argv[1:]])
    meta["command"] = command
    md = to_markdown(rows, command, meta)
    print(md)
    if args.output:
        with open(args.output, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"total {meta['total_s']:.0f} s")


if __name__ == "__main__":
    main()
