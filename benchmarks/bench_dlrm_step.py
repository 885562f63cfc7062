"""One DLRM train step (forward, backward, optimizer) with a plain EmbeddingBagCollection vs
VQEmbeddingBagCollection over the same tables, side by side in one run.

Both models are wrapped in TorchRec's DistributedModelParallel (table-wise, fused
row-wise Adagrad for the tables, SGD for the dense part), as in production: on one process
that is a 1-rank gloo group; under ``torchrun`` every rank gets its own batch and the script
prints throughput (examples/s over all ranks).

Single process (grid; ``--quick`` for a small smoke grid)::

    .venv/bin/python benchmarks/bench_dlrm_step.py [--quick] [--profile]

Two ranks (gloo, CPU)::

    .venv/bin/torchrun --standalone --nproc_per_node 2 benchmarks/bench_dlrm_step.py \
        --tables 26 --dims 128 --batches 8192 --ks 1024

GPU (nccl, one process per GPU)::

    torchrun --standalone --nproc_per_node 1 benchmarks/bench_dlrm_step.py --device cuda ...

Timing: ``--warmup`` steps (k-means init happens there), then ``--steps`` steps alternating
plain / VQ; the median step time of each is reported with the ratio VQ / plain, both as wall
time and as process CPU time (all threads; steadier than wall time on a shared machine).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.models.dlrm import DLRM
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from vq_torchrec import VQConfig
from vq_torchrec.distributed import shard_model
from vq_torchrec.modules import VQEmbeddingBagCollection, vq_loss
from vq_torchrec.quantization import native

DENSE_IN = 13
DENSE_ARCH = [512, 256]  # + [dim]   (MLPerf DLRM)
OVER_ARCH = [1024, 1024, 512, 256, 1]


@dataclass
class Case:
    tables: int
    dim: int
    batch: int
    k: int


def build(
    case: Case,
    rows: int,
    vq: bool,
    device: torch.device,
    seed: int,
    unsharded: bool = False,
    chunk_size: int = 0,
    search_precision: str = "fp32",
) -> nn.Module:
    """DLRM over ``case.tables`` tables wrapped in DMP (fused row-wise Adagrad tables), or
    with ``unsharded`` a plain module on ``device`` (tables trained by the dense optimizer)."""
    torch.manual_seed(seed)
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=case.dim, num_embeddings=rows, feature_names=[f"f{i}"])
        for i in range(case.tables)
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=device if unsharded else torch.device("meta"))
    collection: nn.Module = ebc
    if vq:
        cfg = VQConfig(codebook_size=case.k, update="ema", kmeans_init=True, kmeans_iters=5, restart_every=100)
        if chunk_size:
            cfg.chunk_size = chunk_size
        cfg.search_precision = search_precision  # type: ignore[assignment]
        collection = VQEmbeddingBagCollection.from_ebc(ebc, cfg)
        collection.quantize.to(device)
    model = DLRM(
        embedding_bag_collection=collection,  # type: ignore[arg-type]
        dense_in_features=DENSE_IN,
        dense_arch_layer_sizes=DENSE_ARCH + [case.dim],
        over_arch_layer_sizes=OVER_ARCH,
        dense_device=device,
    )
    if unsharded:
        return model
    apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.01})
    return shard_model(model, "table_wise", device=device, batch_size=case.batch)


def make_batches(case: Case, rows: int, n: int, device: torch.device, seed: int) -> list[tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]]:
    """``n`` batches: dense ``(B, 13)``, one uniform id per feature, random labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, rows, (case.tables * case.batch,), generator=g)
        kjt = KeyedJaggedTensor(
            keys=[f"f{i}" for i in range(case.tables)],
            values=ids,
            lengths=torch.ones(case.tables * case.batch, dtype=torch.int64),
        ).to(device)
        dense = torch.randn(case.batch, DENSE_IN, generator=g).to(device)
        label = torch.randint(0, 2, (case.batch,), generator=g).float().to(device)
        out.append((dense, kjt, label))
    return out


class Trainer:
    def __init__(self, model: nn.Module, with_vq: bool, torch_search: bool = False) -> None:
        self.model = model
        self.with_vq = with_vq
        # search with the pure-torch code instead of the C++ certified kernel
        self.torch_search = torch_search
        self.opt: torch.optim.Optimizer
        if isinstance(model, DistributedModelParallel):
            dense = KeyedOptimizerWrapper(
                dict(in_backward_optimizer_filter(model.named_parameters())),
                lambda params: torch.optim.SGD(params, lr=0.01),
            )
            self.opt = CombinedOptimizer([model.fused_optimizer, dense])
        else:
            self.opt = torch.optim.SGD(model.parameters(), lr=0.01)
        self.loss_fn = nn.BCEWithLogitsLoss()

    def step(self, batch: tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]) -> None:
        with native.disabled() if self.torch_search else contextlib.nullcontext():
            self._step(batch)

    def _step(self, batch: tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]) -> None:
        dense, kjt, label = batch
        self.opt.zero_grad()
        logits = self.model(dense, kjt).squeeze(1)
        loss = self.loss_fn(logits, label)
        if self.with_vq:
            loss = loss + vq_loss(self.model)
        loss.backward()
        self.opt.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_case(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    plain = Trainer(build(case, args.rows, False, device, seed=0, unsharded=args.unsharded), with_vq=False)
    vqt = Trainer(
        build(case, args.rows, True, device, seed=0, unsharded=args.unsharded, chunk_size=args.chunk_size,
              search_precision=args.search_precision),
        with_vq=True,
    )
    trainers = [("plain", plain), ("vq", vqt)]
    if args.per_table:  # the same VQ model with the grouped fast path switched off
        per_table = build(case, args.rows, True, device, seed=0, unsharded=args.unsharded,
                          chunk_size=args.chunk_size, search_precision=args.search_precision)
        for m in per_table.modules():
            if isinstance(m, VQEmbeddingBagCollection):
                m.quantize.grouped = False
        trainers.append(("per_table", Trainer(per_table, with_vq=True)))
    if args.torch_search:  # the same VQ model searching with torch ops instead of the C++ kernel
        twin = build(case, args.rows, True, device, seed=0, unsharded=args.unsharded,
                     chunk_size=args.chunk_size, search_precision=args.search_precision)
        trainers.append(("torch_search", Trainer(twin, with_vq=True, torch_search=True)))
    rank = dist.get_rank()
    batches = make_batches(case, args.rows, 4, device, seed=100 + rank)
    times: dict[str, list[float]] = {name: [] for name, _ in trainers}
    cpu: dict[str, list[float]] = {name: [] for name, _ in trainers}
    for i in range(args.warmup):
        for _, trainer in trainers:
            trainer.step(batches[i % len(batches)])
    for i in range(args.steps):
        for name, trainer in trainers:
            batch = batches[i % len(batches)]
            sync(device)
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            trainer.step(batch)
            sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    # the slowest rank sets the pace
    names = [name for name, _ in trainers]
    med = torch.tensor(
        [statistics.median(times[n]) for n in names] + [statistics.median(cpu[n]) for n in names],
        dtype=torch.float64,
    )
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    result = {f"{n}_s": float(med[i]) for i, n in enumerate(names)}
    result.update({f"{n}_cpu": float(med[len(names) + i]) for i, n in enumerate(names)})
    if args.profile:
        result["profile"] = profile_step(vqt, batches[0], device)  # type: ignore[assignment]
    del plain, vqt, trainers
    return result


def profile_step(trainer: Trainer, batch: tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor], device: torch.device) -> str:
    """Top ops (self time) of one VQ step, plus the VQ leaf's share of it."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    leaf_time: list[float] = []
    leaf = next(m for m in trainer.model.modules() if isinstance(m, VQEmbeddingBagCollection)).quantize

    def pre(_m: nn.Module, _a: object) -> None:
        sync(device)
        leaf_time.append(-time.perf_counter())

    def post(_m: nn.Module, _a: object, _o: object) -> None:
        sync(device)
        leaf_time[-1] += time.perf_counter()

    h1, h2 = leaf.register_forward_pre_hook(pre), leaf.register_forward_hook(post)
    sync(device)
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        trainer.step(batch)
        sync(device)
    total = time.perf_counter() - t0
    h1.remove()
    h2.remove()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60)
    return (
        f"VQ step under the profiler: {total * 1e3:.0f} ms, of which the quantizer leaf's "
        f"forward (all tables, incl. distances, EMA, all-reduce) {leaf_time[0] * 1e3:.0f} ms\n{table}"
    )


def init_dist(device: torch.device) -> None:
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small grid (8 tables, dim 64, batch 2048, K 256)")
    p.add_argument("--tables", type=int, nargs="+", default=[8, 26])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batches", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--ks", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--rows", type=int, default=20_000, help="rows per table")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: default)")
    p.add_argument("--profile", action="store_true", help="profile one VQ step of each case")
    p.add_argument("--markdown", default="", help="append the table to this file")
    p.add_argument("--chunk-size", type=int, default=0, help="VQConfig.chunk_size (0: its default)")
    p.add_argument(
        "--search-precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="VQConfig.search_precision: exact fp32 nearest-code search or bf16 candidates + fp32 re-score",
    )
    p.add_argument(
        "--per-table",
        action="store_true",
        help="also time the VQ model with the grouped fast path off (one quantizer call per table)",
    )
    p.add_argument(
        "--torch-search",
        action="store_true",
        help="also time the VQ model searching with torch ops instead of the C++ certified kernel",
    )
    p.add_argument(
        "--unsharded",
        action="store_true",
        help="no DMP: plain modules, tables trained by dense SGD (for GPUs without fbgemm-gpu)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.tables, args.dims, args.batches, args.ks = [8], [64], [2048], [256]
        args.rows, args.steps, args.warmup = 5_000, 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    init_dist(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    lines = [
        f"device={device.type} world_size={world} threads/rank={torch.get_num_threads()} "
        f"rows/table={args.rows} steps={args.steps} (median) warmup={args.warmup} "
        f"{'unsharded, dense SGD' if args.unsharded else 'DMP table-wise, fused row-wise Adagrad'} "
        f"VQ chunk_size={args.chunk_size or VQConfig().chunk_size} search_precision={args.search_precision} "
        f"C++ certified search={'on' if native.available() else 'off'}",
        "",
        "| tables | dim | batch/rank | K | plain ms | VQ ms | VQ / plain | plain ex/s | VQ ex/s "
        "| plain CPU-s | VQ CPU-s | CPU-time ratio |"
        + (" per-table VQ CPU-s | per-table / plain |" if args.per_table else "")
        + (" torch-search VQ CPU-s | torch-search / plain |" if args.torch_search else ""),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        + ("---:|---:|" if args.per_table else "")
        + ("---:|---:|" if args.torch_search else ""),
    ]
    if rank == 0:
        print("\n".join(lines), flush=True)
    for t, d, b, k in itertools.product(args.tables, args.dims, args.batches, args.ks):
        case = Case(t, d, b, k)
        r = time_case(case, args, device)
        line = (
            f"| {t} | {d} | {b} | {k} | {r['plain_s'] * 1e3:.0f} | {r['vq_s'] * 1e3:.0f} | "
            f"{r['vq_s'] / r['plain_s']:.2f}x | {world * b / r['plain_s']:.0f} | {world * b / r['vq_s']:.0f} | "
            f"{r['plain_cpu']:.2f} | {r['vq_cpu']:.2f} | {r['vq_cpu'] / r['plain_cpu']:.2f}x |"
        )
        if args.per_table:
            line += f" {r['per_table_cpu']:.2f} | {r['per_table_cpu'] / r['plain_cpu']:.2f}x |"
        if args.torch_search:
            line += f" {r['torch_search_cpu']:.2f} | {r['torch_search_cpu'] / r['plain_cpu']:.2f}x |"
        lines.append(line)
        if rank == 0:
            print(line, flush=True)
            if args.profile:
                print(r["profile"], flush=True)
    if rank == 0 and args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n".join(lines) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
