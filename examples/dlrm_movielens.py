#!/usr/bin/env python3
"""Train a TorchRec DLRM (optionally with the VQ layer) on MovieLens.

Single process::

    python examples/dlrm_movielens.py --dataset ml-100k --epochs 5 --vq --output runs/ml100k

Sharded with DistributedModelParallel (gloo on CPU, nccl on GPU)::

    torchrun --nproc_per_node=2 examples/dlrm_movielens.py --dataset ml-100k --output runs/ml100k

Data: ``--data-root DIR`` (a release's folder), else ``$MOVIELENS_ROOT/<dataset>``, else the
download cache. Writes ``results.json`` (final test ``auc``/``logloss`` at the best validation
epoch, per-epoch history, codebook stats), ``training.png`` and ``checkpoints/`` into
``--output``; ``--resume`` continues from the newest checkpoint there.
"""

from __future__ import annotations

import argparse
import sys

from vq_torchrec.training.trainer import TrainConfig, run_training


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive layer sizes, got {text!r}")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated feature names, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=d.dataset, help="MovieLens release (ml-100k, ml-1m, ...)")
    p.add_argument("--data-root", default=None, help="folder holding the release's files")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--vq", action=argparse.BooleanOptionalAction, default=d.vq,
                   help="quantize every embedding table with VQEmbeddingBagCollection")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--output", default=d.output, help="results.json, training.png, checkpoints/")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--embedding-dim", type=int, default=d.embedding_dim)
    p.add_argument("--codebook-size", type=int, default=d.codebook_size)
    p.add_argument("--vq-output", choices=["quantized", "concat"], default=d.vq_output,
                   help="quantized vector alone, or [embedding, quantized]")
    p.add_argument("--vq-update", choices=["ema", "loss"], default=d.vq_update)
    p.add_argument("--vq-features", type=_name_list, default=None,
                   help="quantize only these features' tables, e.g. user_id,item_id (default: all)")
    p.add_argument("--commitment-weight", type=float, default=d.commitment_weight)
    p.add_argument("--lr", type=float, default=d.lr, help="dense (Adam) learning rate")
    p.add_argument("--sparse-lr", type=float, default=d.sparse_lr, help="embedding-table learning rate")
    p.add_argument("--sparse-optimizer", choices=["adagrad", "rowwise_adagrad", "sgd", "adam"],
                   default=d.sparse_optimizer, help="fused table optimizer (adam: GPU only)")
    p.add_argument("--sparse-weight-decay", type=float, default=d.sparse_weight_decay,
                   help="L2 weight decay of the tables (single process; 3e-5 in the ML-1M quality run)")
    p.add_argument("--dense-weight-decay", type=float, default=d.dense_weight_decay)
    p.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"], default=d.lr_schedule)
    p.add_argument("--lr-min-factor", type=float, default=d.lr_min_factor)
    p.add_argument("--split", choices=["random", "temporal"], default=d.split)
    p.add_argument("--threshold", type=float, default=d.threshold, help="rating >= threshold is positive")
    p.add_argument("--drop-neutral", action="store_true", help="drop rating-3 rows (RecBole protocol)")
    p.add_argument("--arch", choices=["dlrm", "dcn"], default=d.arch)
    p.add_argument("--dense-arch", type=_int_list, default=d.dense_arch, help="bottom MLP hidden sizes, e.g. 64")
    p.add_argument("--over-arch", type=_int_list, default=d.over_arch, help="top MLP hidden sizes, e.g. 128,64")
    p.add_argument("--sharding-type", default=None,
                   choices=["table_wise", "column_wise", "table_column_wise", "row_wise", "data_parallel"],
                   help="under torchrun: force this sharding type for every table (default: planner)")
    p.add_argument("--checkpoint-every-steps", type=int, default=d.checkpoint_every_steps,
                   help="also checkpoint every N steps (0: only at the end of each epoch)")
    p.add_argument("--log-every-steps", type=int, default=d.log_every_steps)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--no-download", action="store_true", help="never download; fail if data is missing")
    a = p.parse_args(argv)
    return TrainConfig(
        dataset=a.dataset, data_root=a.data_root, epochs=a.epochs, vq=a.vq, seed=a.seed,
        output=a.output, resume=a.resume, batch_size=a.batch_size,
        eval_batch_size=a.eval_batch_size, embedding_dim=a.embedding_dim,
        codebook_size=a.codebook_size, vq_output=a.vq_output, vq_update=a.vq_update,
        commitment_weight=a.commitment_weight, vq_features=a.vq_features, lr=a.lr, sparse_lr=a.sparse_lr,
        sparse_optimizer=a.sparse_optimizer, sparse_weight_decay=a.sparse_weight_decay,
        dense_weight_decay=a.dense_weight_decay, lr_schedule=a.lr_schedule, lr_min_factor=a.lr_min_factor,
        split=a.split, threshold=a.threshold,
        drop_neutral=a.drop_neutral, arch=a.arch, dense_arch=a.dense_arch, over_arch=a.over_arch,
        sharding_type=a.sharding_type, checkpoint_every_steps=a.checkpoint_every_steps, log_every_steps=a.log_every_steps,
        device=a.device, progress=not a.no_progress, download=not a.no_download,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        run_training(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
