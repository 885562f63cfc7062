"""Item cold start on MovieLens: the CVAR protocol with the base, cvar and vq warm-ups.

For each (feature set, seed) the DeepFM backbone is pre-trained once on the old items and shared
(copied) by every method. Prints mean +- std over seeds of the four test AUCs (cold, after
warm-a, warm-b, warm-c) and writes JSON
``{method: {features: {"auc_mean": [4], "auc_std": [4], "auc_per_seed": [[4], ...]}}}`` plus a
``"_meta"`` entry (split sizes, settings, vq variant chosen on validation per seed, test AUCs of
every vq variant for information, number of new items sharing a code with an old item).

Example::

    python benchmarks/coldstart_movielens.py --dataset ml-1m \\
        --data-root /work/shared/data/movielens/ml-1m-u2999 --seeds 0 1 2 3 4 \\
        --methods base cvar vq --features cvar clean --output coldstart_ml-1m-u2999.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from vq_torchrec.coldstart.features import FEATURE_SETS, ColdStartFeatures
from vq_torchrec.coldstart.protocol import PROTOCOL_DEFAULTS, split_cold_start
from vq_torchrec.coldstart.runner import METHODS, RunConfig, pretrain_backbone, run_method
from vq_torchrec.datasets import load_movielens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-1m", choices=sorted(PROTOCOL_DEFAULTS))
    p.add_argument("--data-root", default=None, help="folder with the MovieLens files")
    p.add_argument("--download", action="store_true", help="allow load_movielens to download")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--features", nargs="+", default=list(FEATURE_SETS), choices=FEATURE_SETS)
    p.add_argument("--n-threshold", type=int, default=None, help="N (default per dataset)")
    p.add_argument("--k", type=int, default=None, help="K (default per dataset)")
    p.add_argument("--backbone", default="deepfm", choices=["deepfm", "dlrm"])
    p.add_argument("--vq-variants", nargs="+", default=None, help="vq variants to select from")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--output", type=Path, default=None, help="JSON file to write")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="instead of running: merge result JSONs of the same dataset (e.g. one run "
                        "per feature set) into --output")
    return p.parse_args(argv)


def merge_results(paths: list[Path]) -> dict:
    """Union of result files (methods x feature sets); ``_meta.vq`` entries are merged too."""
    out: dict = {}
    for path in paths:
        part = json.loads(path.read_text())
        for method, by_fs in part.items():
            if method == "_meta":
                meta = out.setdefault("_meta", {k: v for k, v in by_fs.items() if k != "vq"})
                if meta.get("dataset") != by_fs.get("dataset") or meta.get("seeds") != by_fs.get("seeds"):
                    raise ValueError(f"{path}: dataset/seeds differ from the other files")
                meta.setdefault("vq", {}).update(by_fs.get("vq", {}))
                continue
            for fs, res in by_fs.items():
                if fs in out.setdefault(method, {}):
                    raise ValueError(f"{path}: {method}/{fs} is in two files")
                out[method][fs] = res
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.merge:
        if args.output is None:
            raise ValueError("--merge needs --output")
        merged = merge_results(args.merge)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(merged, indent=1))
        print(f"wrote {args.output}")
        return merged
    torch.set_num_threads(args.threads)
    n_default, k_default = PROTOCOL_DEFAULTS[args.dataset]
    n_thr, k = args.n_threshold or n_default, args.k or k_default
    data = load_movielens(args.dataset, root=args.data_root, download=args.download)
    split = split_cold_start(data.ratings, n_thr, k)
    cfg = RunConfig()
    cfg.backbone.kind = args.backbone
    if args.vq_variants:
        cfg.vq_variants = tuple(args.vq_variants)
    print(f"{args.dataset} N={n_thr} K={k}: {split.summary()}", flush=True)
    per_seed: dict[str, dict[str, list[list[float]]]] = {m: {f: [] for f in args.features} for m in args.methods}
    vq_info: dict[str, list[dict]] = {f: [] for f in args.features}
    for fs in args.features:
        feats = ColdStartFeatures(split, data.users, data.items, fs, all_ratings=data.ratings)
        for seed in args.seeds:
            t0 = time.time()
            backbone = pretrain_backbone(feats, cfg, seed)
            for method in args.methods:
                t1 = time.time()
                res = run_method(feats, method, seed, cfg, pretrained=backbone)
                per_seed[method][fs].append(res.aucs)
                if method == "vq":
                    vq_info[fs].append({"seed": seed, **res.info})
                extra = f" variant={res.info['variant']}" if method == "vq" else ""
                print(f"  {fs:5s} seed={seed} {method:4s} "
                      + " / ".join(f"{a:.4f}" for a in res.aucs)
                      + f"{extra} ({time.time() - t1:.0f}s)", flush=True)
            print(f"  {fs} seed={seed} done in {time.time() - t0:.0f}s", flush=True)
    out: dict = {}
    for method in args.methods:
        out[method] = {}
        for fs in args.features:
            arr = np.array(per_seed[method][fs])
            out[method][fs] = {
                "auc_mean": arr.mean(0).round(5).tolist(),
                "auc_std": arr.std(0, ddof=1).round(5).tolist() if len(arr) > 1 else [0.0] * 4,
                "auc_per_seed": arr.round(5).tolist(),
            }
    out["_meta"] = {
        "dataset": args.dataset, "data_root": args.data_root, "n_threshold": n_thr, "k": k,
        "seeds": args.seeds, "split": split.summary(), "backbone": args.backbone,
        "vq": vq_info,
    }
    print("\nmethod features   cold            warm-a          warm-b          warm-c")
    for method in args.methods:
        for fs in args.features:
            r = out[method][fs]
            print(f"{method:6s} {fs:8s} " + "  ".join(
                f"{m:.4f}±{s:.4f}" for m, s in zip(r["auc_mean"], r["auc_std"])))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.output}")
    return out


if __name__ == "__main__":
    main()
