"""Learning-rate decay (vq_torchrec.training.lr_schedule) and the optimizers' weight decay:
factor curves, which param groups are decayed (plain and DMP-fused optimizers), the trainer's
per-epoch lr record, and that weight decay really shrinks the weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from dist_utils import run_multiprocess
from test_example_data import write_tiny_ml100k

from vq_torchrec.quantization.config import VQConfig
from vq_torchrec.training.dist_env import init_dist_env
from vq_torchrec.training.lr_schedule import LRSchedule, lr_factor
from vq_torchrec.training.model_factory import build_dlrm
from vq_torchrec.training.sharding import build_plain_optimizer, shard_model
from vq_torchrec.training.trainer import TrainConfig, run_training

SIZES = {"user_id": 30, "item_id": 40, "genres": 6}


def _group_lrs(opt: torch.optim.Optimizer | object) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for key, sub in opt.optimizers:  # type: ignore[attr-defined]
        out[key] = [g["lr"] for g in sub.param_groups]
    return out


def test_lr_factor_curves() -> None:
    total = 100
    for kind in ("cosine", "linear"):
        f = [lr_factor(kind, s, total, min_factor=0.1) for s in range(total + 1)]
        assert f[0] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
        assert all(a >= b for a, b in zip(f, f[1:])), kind  # never increases
        assert lr_factor(kind, 10 * total, total, 0.1) == pytest.approx(0.1)  # clamped after the end
    assert lr_factor("cosine", 50, 100, 0.0) == pytest.approx(0.5)
    assert lr_factor("cosine", 25, 100, 0.0) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert lr_factor("linear", 25, 100, 0.2) == pytest.approx(1 - 0.8 * 0.25)
    assert lr_factor("constant", 99, 100, 0.0) == 1.0
    for kwargs, match in [
        (dict(kind="step", step=0, total_steps=10), "lr schedule must be one of"),
        (dict(kind="cosine", step=0, total_steps=0), "total_steps must be positive"),
        (dict(kind="cosine", step=-1, total_steps=10), "step must be >= 0"),
        (dict(kind="cosine", step=0, total_steps=10, min_factor=1.5), "min_factor"),
    ]:
        with pytest.raises(ValueError, match=match):
            lr_factor(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("decay_tables", [True, False])
def test_schedule_sets_dense_and_table_lrs(decay_tables: bool) -> None:
    model = build_dlrm(SIZES, num_dense=2, embedding_dim=8, vq=VQConfig(codebook_size=8))
    opt = build_plain_optimizer(model, sparse_lr=0.05, dense_lr=1e-3)
    sched = LRSchedule(opt, "cosine", total_steps=10, dense_lr=1e-3, sparse_lr=0.05,
                       min_factor=0.0, decay_tables=decay_tables)
    sched.set_step(5)  # half way: factor 0.5
    lrs = _group_lrs(opt)
    assert lrs["dense"] == [pytest.approx(0.5e-3)]
    assert lrs["sparse"] == [pytest.approx(0.025 if decay_tables else 0.05)]
    assert sched.current_lrs() == {"sparse": pytest.approx(lrs["sparse"][0]),
                                   "dense": pytest.approx(0.5e-3)}
    # the base lrs come from the options, not from the (already decayed) optimizer state
    sched.set_step(0)
    assert _group_lrs(opt) == {"sparse": [pytest.approx(0.05)], "dense": [pytest.approx(1e-3)]}
    with pytest.raises(ValueError, match="lr schedule must be one of"):
        LRSchedule(opt, "exp", 10, 1e-3, 0.05)


def test_weight_decay_shrinks_only_what_it_is_given() -> None:
    torch.manual_seed(0)
    for sparse_wd, dense_wd in [(0.0, 0.0), (0.1, 0.0), (0.0, 0.1)]:
        model = build_dlrm(SIZES, num_dense=2, embedding_dim=8)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = build_plain_optimizer(model, sparse_lr=1e-3, dense_lr=1e-3,
                                    sparse_weight_decay=sparse_wd, dense_weight_decay=dense_wd)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)  # no task gradient: only weight decay can move weights
        opt.step()
        for n, p in model.named_parameters():
            table = ".embedding_bags." in n
            wd = sparse_wd if table else dense_wd
            if wd == 0.0 or before[n].abs().sum() == 0:
                assert torch.equal(p.detach(), before[n]), n
            else:
                assert p.detach().norm() < before[n].norm(), n
    with pytest.raises(ValueError, match="sparse_weight_decay must be >= 0"):
        build_plain_optimizer(build_dlrm(SIZES, 2, embedding_dim=8), sparse_weight_decay=-1.0)


def test_trainer_records_decayed_lrs(tmp_path: Path) -> None:
    data = write_tiny_ml100k(tmp_path / "ml-100k")
    cfg = TrainConfig(data_root=str(data), output=str(tmp_path / "run"), epochs=2, batch_size=128,
                      embedding_dim=8, vq=False, dense_arch=(8,), over_arch=(8,), lr=1e-3,
                      sparse_lr=0.05, lr_schedule="linear", lr_min_factor=0.2,
                      lr_decay_tables=False, dense_weight_decay=1e-4, progress=False,
                      download=False)
    res = run_training(cfg)
    steps = res["steps_per_epoch"]
    lrs = [h["lr"] for h in res["history"]]
    # after epoch 1 of 2 the linear factor is 1 - 0.8 * 1/2; after epoch 2 it is min_factor
    assert lrs[0]["dense"] == pytest.approx(1e-3 * lr_factor("linear", steps, 2 * steps, 0.2))
    assert lrs[1]["dense"] == pytest.approx(1e-3 * 0.2)
    assert lrs[0]["sparse"] == lrs[1]["sparse"] == pytest.approx(0.05)
    for bad, match in [(dict(lr_schedule="step"), "lr_schedule must be one of"),
                       (dict(lr_min_factor=2.0), "lr_min_factor"),
                       (dict(sparse_weight_decay=-0.1), "sparse_weight_decay must be >= 0")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad).validate()  # type: ignore[arg-type]


def _fused_schedule_body(rank: int, world_size: int) -> dict[str, float]:
    env = init_dist_env("cpu")
    torch.manual_seed(0)
    model = build_dlrm(SIZES, num_dense=2, embedding_dim=8, device="meta")
    dmp, opt = shard_model(model, env, sparse_lr=0.05, dense_lr=1e-3, batch_size_per_rank=8,
                           dense_weight_decay=1e-4)
    sched = LRSchedule(opt, "cosine", total_steps=4, dense_lr=1e-3, sparse_lr=0.05)
    sched.set_step(2)
    opt.step()  # the fused optimizers push param_groups' lr into their kernels on step()
    fused_lrs = [g["lr"] for g in dmp.fused_optimizer.param_groups]
    dense_wd = [g["weight_decay"] for _, o in opt.optimizers[1:] for g in o.param_groups]
    return {"sparse": sched.current_lrs()["sparse"], "dense": sched.current_lrs()["dense"],
            "fused_min": min(fused_lrs), "fused_max": max(fused_lrs), "dense_wd": min(dense_wd)}


def test_schedule_reaches_fused_sharded_table_optimizer() -> None:
    for r in run_multiprocess(_fused_schedule_body, world_size=2):
        assert r["sparse"] == pytest.approx(0.025) and r["dense"] == pytest.approx(0.5e-3)
        assert r["fused_min"] == r["fused_max"] == pytest.approx(0.025)
        assert r["dense_wd"] == pytest.approx(1e-4)
