#!/usr/bin/env python3
"""Quality benchmark: plain DLRM vs DLRM + VQ on MovieLens (test AUC / log-loss, mean ± std).

Protocol (RecBole's ml-1m CTR setting): all ratings, rating-3 rows dropped, 4-5 positive,
1-2 negative, seeded random 8:1:1 split. Each seed re-draws the split and the initialisation;
plain and VQ share the split of a seed. The epoch is selected on validation AUC and the test
metrics of that epoch are reported. Anchor: RecBole DeepFM test AUC 0.8997 / log-loss 0.315 on
ML-1M.

    MOVIELENS_ROOT=/path/to/movielens python benchmarks/quality_movielens.py

writes ``benchmarks/results/quality.json`` and ``benchmarks/results/quality.md`` (the section that
goes into ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from vq_torchrec.training.dist_env import DistEnv
from vq_torchrec.training.trainer import TrainConfig, load_data, run_training

ANCHOR = {"model": "RecBole DeepFM", "auc": 0.8997, "logloss": 0.315}


def _base_config(args: argparse.Namespace, dataset: str) -> TrainConfig:
    return TrainConfig(
        dataset=dataset,
        data_root=None,
        epochs=args.epochs_ml1m if dataset.startswith("ml-1m") else args.epochs_ml100k,
        batch_size=args.batch_size if dataset.startswith("ml-1m") else args.batch_size_ml100k,
        eval_batch_size=8192,
        embedding_dim=args.embedding_dim,
        codebook_size=args.codebook_size,
        vq_output=args.vq_output,
        vq_features=tuple(args.vq_features) if args.vq_features else None,
        commitment_weight=args.commitment_weight,
        arch=args.arch,
        dense_arch=tuple(args.dense_arch),
        over_arch=tuple(args.over_arch),
        lr=args.lr,
        sparse_lr=args.sparse_lr,
        lr_schedule=args.lr_schedule,
        lr_min_factor=args.lr_min_factor,
        lr_decay_tables=not args.no_decay_tables,
        dense_weight_decay=args.dense_weight_decay,
        sparse_weight_decay=args.sparse_weight_decay,
        drop_neutral=True,
        threshold=4.0,
        split="random",
        progress=False,
        download=False,
    )


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not os.environ.get("MOVIELENS_ROOT"):
        raise SystemExit("set MOVIELENS_ROOT to the folder holding one folder per release")
    results: dict[str, Any] = {"anchor_ml1m": ANCHOR, "runs": [], "summary": {}}
    import torch

    torch.set_num_threads(args.threads)
    env = DistEnv()
    for dataset in args.datasets:
        base = _base_config(args, dataset)
        for seed in args.seeds:
            cfg_seed = replace(base, seed=seed)
            t0 = time.time()
            data = load_data(cfg_seed)
            load_s = time.time() - t0
            for variant in args.variants:
                cfg = replace(cfg_seed, vq=(variant == "vq"))
                with tempfile.TemporaryDirectory(prefix="vq_quality_") as tmp:
                    cfg.output = tmp
                    t1 = time.time()
                    r = run_training(cfg, env=env, data=data)
                    train_s = time.time() - t1
                row = {
                    "dataset": dataset, "variant": variant, "seed": seed,
                    "test_auc": r["auc"], "test_logloss": r["logloss"],
                    "val_auc": r["val_auc"], "val_logloss": r["val_logloss"],
                    "best_epoch": r["best_epoch"], "epochs": cfg.epochs,
                    "history": [{k: h[k] for k in ("epoch", "train_loss", "val_auc", "val_logloss",
                                                   "test_auc", "test_logloss")}
                                for h in r["history"]],
                    "codebook": r["codebook"], "sizes": r["sizes"],
                    "train_seconds": train_s, "load_seconds": load_s,
                }
                results["runs"].append(row)
                print(f"[quality] {dataset} {variant} seed {seed}: test AUC {r['auc']:.4f} "
                      f"log-loss {r['logloss']:.4f} (val AUC {r['val_auc']:.4f}, epoch "
                      f"{r['best_epoch']}) {train_s:.0f}s", flush=True)
                _write(args, results)  # keep partial results if interrupted
        for variant in args.variants:
            rows = [x for x in results["runs"] if x["dataset"] == dataset and x["variant"] == variant]
            results["summary"][f"{dataset}/{variant}"] = {
                "test_auc": _summary([x["test_auc"] for x in rows]),
                "test_logloss": _summary([x["test_logloss"] for x in rows]),
                "val_auc": _summary([x["val_auc"] for x in rows]),
            }
    _write(args, results)
    return results


def _fmt(s: dict[str, float]) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


def _sizes(sizes: list[int]) -> str:
    return "-".join(str(x) for x in sizes)


def _vq_tables(cfg: dict[str, Any]) -> str:
    feats = cfg.get("vq_features")
    if not feats:
        return "every table"
    extra = (" (the other tables plain, 2 x dim wide so every key has the concat width)"
             if cfg["vq_output"] == "concat" else "")
    return "the " + ", ".join(f"`{f}`" for f in feats) + " tables only" + extra


def _regularisation(cfg: dict[str, Any]) -> str:
    """The lr-schedule / weight-decay part of the protocol line (empty for the defaults)."""
    parts = []
    if cfg.get("lr_schedule", "constant") != "constant":
        which = "dense lr only" if cfg.get("no_decay_tables") else "dense and table lr"
        parts.append(f"{cfg['lr_schedule']} decay of the {which} to "
                     f"{cfg.get('lr_min_factor', 0.0)} x over the run")
    if cfg.get("dense_weight_decay"):
        parts.append(f"dense weight decay {cfg['dense_weight_decay']}")
    if cfg.get("sparse_weight_decay"):
        parts.append(f"table weight decay {cfg['sparse_weight_decay']}")
    return (", " + ", ".join(parts)) if parts else ""


def _markdown(args: argparse.Namespace, results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [
        "## Quality: plain DLRM vs DLRM + VQ on MovieLens",
        "",
        "Command:",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"Protocol: all ratings, rating 3 dropped, rating >= 4 positive, seeded random 8:1:1 split "
        f"(RecBole ml-1m CTR protocol); seeds {cfg['seeds']} (each seed re-draws split and init, "
        f"plain and VQ share it); epoch selected on validation AUC, test metrics of that epoch "
        f"reported; mean ± sample std over seeds. ML-1M = `$MOVIELENS_ROOT/ml-1m-notime` "
        f"(all 1,000,209 ratings). Model: torchrec {cfg.get('arch', 'dlrm').upper()}, dim "
        f"{cfg['embedding_dim']}, bottom MLP {_sizes(cfg.get('dense_arch', [64]))}, top MLP "
        f"{_sizes(cfg.get('over_arch', [128, 64]))}, batch {cfg['batch_size']} (ML-1M) / {cfg['batch_size_ml100k']} "
        f"(ml-100k), Adam lr {cfg['lr']} (dense) + Adagrad lr "
        f"{cfg['sparse_lr']} (tables){_regularisation(cfg)}; VQ: `VQEmbeddingBagCollection` on "
        f"{_vq_tables(cfg)}, K={cfg['codebook_size']}, output={cfg['vq_output']!r}, "
        f"commitment weight {cfg.get('commitment_weight', 0.25)}, EMA codebooks, k-means init. "
        f"CPU, single process.",
        "",
        "| dataset | model | test AUC | test log-loss | val AUC | epochs (best) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, s in results["summary"].items():
        dataset, variant = key.split("/")
        rows = [x for x in results["runs"] if x["dataset"] == dataset and x["variant"] == variant]
        best = ",".join(str(x["best_epoch"] + 1) for x in rows)
        arch = "DLRM_DCN" if cfg.get("arch") == "dcn" else "DLRM"
        name = f"{arch} + VQ" if variant == "vq" else f"{arch} (plain)"
        lines.append(f"| {dataset} | {name} | {_fmt(s['test_auc'])} | {_fmt(s['test_logloss'])} "
                     f"| {_fmt(s['val_auc'])} | {rows[0]['epochs']} ({best}) |")
    a = results["anchor_ml1m"]
    lines += ["", f"Anchor (ML-1M, same protocol): {a['model']} test AUC {a['auc']} / "
              f"log-loss {a['logloss']}.", ""]
    for dataset in {k.split("/")[0] for k in results["summary"]}:
        plain = results["summary"].get(f"{dataset}/plain")
        vq = results["summary"].get(f"{dataset}/vq")
        if not (plain and vq):
            continue
        d = vq["test_auc"]["mean"] - plain["test_auc"]["mean"]
        ok = d >= -plain["test_auc"]["std"]
        lines.append(f"- {dataset}: VQ - plain test AUC = {d:+.4f} (plain std "
                     f"{plain['test_auc']['std']:.4f}): "
                     f"{'within' if ok else 'NOT within'} one std"
                     + (f"; goal AUC >= 0.90: {'met' if vq['test_auc']['mean'] >= 0.90 else 'NOT met'}"
                        f" ({vq['test_auc']['mean']:.4f})" if dataset.startswith("ml-1m") else ""))
    lines.append("")
    per_run = ["| dataset | model | seed | test AUC | test log-loss | val AUC | best epoch | train s |",
               "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in results["runs"]:
        per_run.append(f"| {x['dataset']} | {x['variant']} | {x['seed']} | {x['test_auc']:.4f} | "
                       f"{x['test_logloss']:.4f} | {x['val_auc']:.4f} | {x['best_epoch'] + 1} | "
                       f"{x['train_seconds']:.0f} |")
    lines += ["Per run:", ""] + per_run + [""]
    if args.notes and Path(args.notes).exists():
        lines += [Path(args.notes).read_text().rstrip(), ""]
    return "\n".join(lines)


def _write(args: argparse.Namespace, results: dict[str, Any]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results["command"] = "MOVIELENS_ROOT=" + os.environ.get("MOVIELENS_ROOT", "") + " " + " ".join(
        shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv])
    results["config"] = {k: v for k, v in vars(args).items()}
    (out / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    if results["summary"]:
        (out / "quality.md").write_text(_markdown(args, results))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["ml-1m-notime", "ml-100k"])
    p.add_argument("--variants", nargs="+", choices=["plain", "vq"], default=["plain", "vq"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs-ml1m", type=int, default=2)
    p.add_argument("--epochs-ml100k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=2048, help="ML-1M batch size")
    p.add_argument("--batch-size-ml100k", type=int, default=512)
    p.add_argument("--embedding-dim", type=int, default=32)
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--vq-output", choices=["quantized", "concat"], default="concat")
    p.add_argument("--vq-features", nargs="+", default=None,
                   help="quantize only these features' tables (default: every table)")
    p.add_argument("--commitment-weight", type=float, default=0.25)
    p.add_argument("--arch", choices=["dlrm", "dcn"], default="dlrm")
    p.add_argument("--dense-arch", nargs="+", type=int, default=[64], help="bottom MLP hidden sizes")
    p.add_argument("--over-arch", nargs="+", type=int, default=[128, 64], help="top MLP hidden sizes")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sparse-lr", type=float, default=0.05)
    p.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"], default="constant",
                   help="per-step decay of the dense and table learning rates over the run")
    p.add_argument("--lr-min-factor", type=float, default=0.0,
                   help="the decayed lr at the last step, as a fraction of the base lr")
    p.add_argument("--no-decay-tables", action="store_true",
                   help="decay only the dense lr; the tables keep --sparse-lr")
    p.add_argument("--dense-weight-decay", type=float, default=0.0, help="Adam weight decay (MLPs)")
    p.add_argument("--sparse-weight-decay", type=float, default=0.0, help="Adagrad weight decay (tables)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--notes", default=None, help="markdown file appended to quality.md (tuning log)")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite quality.md from an existing quality.json (e.g. with new --notes)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="combine the runs of several quality.json files (e.g. one per dataset, "
                        "run as separate processes) into --out")
    args = p.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        merged = {"anchor_ml1m": ANCHOR, "runs": [r for x in parts for r in x["runs"]],
                  "summary": {k: v for x in parts for k, v in x["summary"].items()},
                  "command": "\n".join(x["command"] for x in parts), "config": parts[0]["config"]}
        for x in parts[1:]:
            for k, v in x["config"].items():
                if k not in ("datasets", "out", "epochs_ml1m", "epochs_ml100k") and merged["config"].get(k) != v:
                    raise SystemExit(f"cannot merge: option {k} differs ({merged['config'].get(k)} vs {v})")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quality.json").write_text(json.dumps(merged, indent=2) + "\n")
        (out / "quality.md").write_text(_markdown(args, merged))
        return 0
    if args.render_only:
        results = json.loads((Path(args.out) / "quality.json").read_text())
        (Path(args.out) / "quality.md").write_text(_markdown(args, results))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
