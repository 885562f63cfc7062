"""Unit tests of vq_torchrec.training: model factory, checkpoint atomicity, evaluation metrics
(single process and 2 gloo ranks), results/plot writers, data-root resolution."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_utils import run_multiprocess
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from vq_torchrec.quantization.config import VQConfig
from vq_torchrec.training.checkpoint import CheckpointError, CheckpointManager, TrainState
from vq_torchrec.training.data_pipeline import release_name, resolve_data_root
from vq_torchrec.training.dist_env import DistEnv, init_dist_env
from vq_torchrec.training.loop import evaluate, train_epoch
from vq_torchrec.training.model_factory import build_dlrm
from vq_torchrec.training.plotting import plot_run
from vq_torchrec.training.results import write_results
from vq_torchrec.training.sharding import build_plain_optimizer, shard_model

SIZES = {"user_id": 30, "item_id": 40, "genres": 6}


def _batches(n: int, batch: int = 16, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        genre_len = torch.randint(0, 3, (batch,), generator=g)  # includes empty bags
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=list(SIZES),
            values=torch.cat([
                torch.randint(0, SIZES["user_id"], (batch,), generator=g),
                torch.randint(0, SIZES["item_id"], (batch,), generator=g),
                torch.randint(0, SIZES["genres"], (int(genre_len.sum()),), generator=g),
            ]),
            lengths=torch.cat([torch.ones(2 * batch, dtype=torch.long), genre_len]),
        )
        out.append(Batch(dense_features=torch.randn(batch, 2, generator=g), sparse_features=kjt,
                         labels=torch.randint(0, 2, (batch,), generator=g).float()))
    return out


# ----------------------------------------------------------------------------- model factory

@pytest.mark.parametrize("arch", ["dlrm", "dcn"])
@pytest.mark.parametrize("output", [None, "quantized", "concat"])
def test_build_dlrm_forward_and_backward(arch: str, output: str | None) -> None:
    torch.manual_seed(0)
    vq = None if output is None else VQConfig(codebook_size=8, output=output)
    model = build_dlrm(SIZES, num_dense=2, embedding_dim=8, vq=vq, arch=arch)
    b = _batches(1)[0]
    logits = model(b.dense_features, b.sparse_features)
    assert logits.shape == (16, 1) and torch.isfinite(logits).all()
    logits.sum().backward()
    table = dict(model.named_parameters())
    weight = [p for n, p in table.items() if n.endswith("t_user_id.weight")]
    assert len(weight) == 1 and weight[0].grad is not None and weight[0].grad.abs().sum() > 0


def test_build_dlrm_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="sparse_feature_sizes is empty"):
        build_dlrm({}, num_dense=2)
    with pytest.raises(ValueError, match="'item_id'.*positive"):
        build_dlrm({"user_id": 3, "item_id": 0}, num_dense=2)
    with pytest.raises(ValueError, match="arch"):
        build_dlrm(SIZES, num_dense=2, arch="wide")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_dense"):
        build_dlrm(SIZES, num_dense=0)
    with pytest.raises(TypeError, match="vq must be"):
        build_dlrm(SIZES, num_dense=2, vq=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid VQ options"):
        build_dlrm(SIZES, num_dense=2, vq={"codebook_sizee": 3})


def test_plain_optimizer_choices() -> None:
    model = build_dlrm(SIZES, num_dense=2, embedding_dim=8)
    for kind in ("adagrad", "rowwise_adagrad", "sgd", "adam"):
        build_plain_optimizer(model, sparse_optimizer=kind)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sparse_optimizer must be one of"):
        build_plain_optimizer(model, sparse_optimizer="lamb")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="process group"):
        shard_model(model, DistEnv())


def test_train_epoch_learns_and_reports_nan() -> None:
    torch.manual_seed(0)
    model = build_dlrm(SIZES, num_dense=2, embedding_dim=8, vq=VQConfig(codebook_size=8))
    opt = build_plain_optimizer(model, sparse_lr=0.1, dense_lr=0.01)
    data = _batches(4) * 8  # memorisable
    state = TrainState()
    res = train_epoch(model, opt, data, DistEnv(), state, len(data), progress=False)
    assert state.global_step == len(data) == len(state.losses)
    assert np.mean(res.losses[-4:]) < np.mean(res.losses[:4])
    bad = _batches(1)[0]
    bad.dense_features[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="epoch 0 step"):
        train_epoch(model, opt, [bad], DistEnv(), TrainState(), 1, progress=False)


# ----------------------------------------------------------------------------- evaluation

class _FixedLogits(nn.Module):
    """Returns logits stored per batch (dense_features[:, 0]) so metrics can be checked."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return (dense[:, :1] * self.w).detach()


def _auc_bruteforce(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def _scored_batches(scores: np.ndarray, labels: np.ndarray, size: int) -> list[Batch]:
    kjt = lambda n: KeyedJaggedTensor.from_lengths_sync(  # noqa: E731
        keys=["user_id"], values=torch.zeros(n, dtype=torch.long), lengths=torch.ones(n, dtype=torch.long))
    out = []
    for i in range(0, len(scores), size):
        s = torch.tensor(scores[i:i + size], dtype=torch.float32)
        out.append(Batch(dense_features=s[:, None], sparse_features=kjt(len(s)),
                         labels=torch.tensor(labels[i:i + size], dtype=torch.float32)))
    return out


def _expected(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    p = 1 / (1 + np.exp(-scores.astype(np.float64)))
    logloss = float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
    return _auc_bruteforce(scores.astype(np.float32), labels), logloss


def test_evaluate_matches_bruteforce() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 301)
    scores = rng.normal(labels * 0.8, 1.0)
    batches = _scored_batches(scores, labels, 64)
    got = evaluate(_FixedLogits(), batches, DistEnv(), len(batches))
    auc, logloss = _expected(scores, labels)
    assert got["num_examples"] == 301
    assert got["auc"] == pytest.approx(auc, abs=1e-6)
    assert got["logloss"] == pytest.approx(logloss, rel=1e-6)


def _eval_rank(rank: int, world_size: int, scores: np.ndarray, labels: np.ndarray) -> dict:
    env = init_dist_env("cpu")
    assert env.distributed and env.world_size == world_size
    # uneven shards: rank 0 gets 3 batches, rank 1 gets 1 (padding path keeps collectives aligned)
    cut = 150
    mine = (scores[:cut], labels[:cut]) if rank == 0 else (scores[cut:], labels[cut:])
    batches = _scored_batches(*mine, size=50)
    return evaluate(_FixedLogits(), batches, env, len(batches))


def test_evaluate_two_ranks_covers_whole_set() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 190)
    scores = rng.normal(labels * 0.5, 1.0)
    results = run_multiprocess(_eval_rank, world_size=2, args=(scores, labels))
    auc, logloss = _expected(scores, labels)
    for r in results:
        assert r["num_examples"] == 190
        assert r["auc"] == pytest.approx(auc, abs=1e-6)
        assert r["logloss"] == pytest.approx(logloss, rel=1e-6)


# ----------------------------------------------------------------------------- checkpoints

def _model_and_opt(seed: int = 0):
    torch.manual_seed(seed)
    model = build_dlrm(SIZES, num_dense=2, embedding_dim=8, vq=VQConfig(codebook_size=8))
    return model, build_plain_optimizer(model)


def test_checkpoint_roundtrip_restores_everything(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    state = TrainState(data_seed=5)
    data = _batches(6)
    train_epoch(model, opt, data[:3], DistEnv(), state, 6, progress=False)
    ckpt = CheckpointManager(tmp_path / "ck", DistEnv())
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    ckpt.save(model, opt, state)
    expected_rng = (random.random(), np.random.rand(), torch.rand(1).item())
    train_epoch(model, opt, data[3:], DistEnv(), state, 6, progress=False)

    fresh, fresh_opt = _model_and_opt(seed=99)
    loaded = ckpt.load(fresh, fresh_opt)
    assert loaded is not None and loaded.global_step == 3 and loaded.data_seed == 5
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_rng
    ckpt.load(fresh, fresh_opt)  # RNG back at the checkpoint
    train_epoch(fresh, fresh_opt, data[3:], DistEnv(), loaded, 6, progress=False)
    assert loaded.losses == state.losses
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k


def test_checkpoint_publish_is_atomic(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    ckpt = CheckpointManager(tmp_path, DistEnv(), keep=1)
    assert ckpt.latest() is None and ckpt.load(model, opt) is None
    ckpt.save(model, opt, TrainState(global_step=1))
    # a crashed save: a half-written temp dir that never got published
    stale = tmp_path / ".tmp-step-000000002"
    (stale / "dcp").mkdir(parents=True)
    (stale / "dcp" / "__0_0.distcp").write_bytes(b"garbage")
    assert ckpt.latest() == tmp_path / "step-000000001"
    assert ckpt.load(model, opt).global_step == 1  # type: ignore[union-attr]
    ckpt.save(model, opt, TrainState(global_step=3))
    assert not stale.exists()  # cleaned by the next save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step-000000003"]  # pruned
    # a LATEST that names an incomplete checkpoint is an error, not a half load
    (tmp_path / "step-000000003" / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.latest()


def test_checkpoint_rejects_other_world_size(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    ckpt = CheckpointManager(tmp_path, DistEnv())
    path = ckpt.save(model, opt, TrainState(global_step=4))
    (path / "meta-rank0.pt").rename(path / "meta-rank1.pt")
    with pytest.raises(CheckpointError, match="different world size"):
        ckpt.load(model, opt)


# ----------------------------------------------------------------------------- outputs, data root

def test_results_and_plot(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'auc'"):
        write_results(tmp_path / "r.json", {"logloss": 0.5})
    path = write_results(tmp_path / "r.json", {"auc": 0.7, "logloss": float("nan"), "t": torch.ones(2)})
    assert json.loads(path.read_text()) == {"auc": 0.7, "logloss": None, "t": [1.0, 1.0]}
    history = [{"epoch": e, "val_auc": 0.6 + e / 10, "val_logloss": 0.6 - e / 10} for e in range(3)]
    for codebook in ({}, {"t_user_id": {"usage": 0.5, "perplexity": 12.0}}):
        png = plot_run(tmp_path / "p.png", [0.7, 0.6, 0.5], history, codebook)
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_resolve_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOVIELENS_ROOT", raising=False)
    assert resolve_data_root("ml-100k", None) is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_data_root("ml-100k", tmp_path / "nope")
    (tmp_path / "ml-100k").mkdir()
    monkeypatch.setenv("MOVIELENS_ROOT", str(tmp_path))
    assert resolve_data_root("ml-100k", None) == tmp_path / "ml-100k"
    with pytest.raises(FileNotFoundError, match="no folder 'ml-1m'"):
        resolve_data_root("ml-1m", None)
    assert release_name("ml-1m-notime") == "ml-1m" and release_name("ml-100k") == "ml-100k"
    assert math.isfinite(1.0)


def test_build_dlrm_vq_subset_of_features() -> None:
    torch.manual_seed(0)
    model = build_dlrm(SIZES, num_dense=2, embedding_dim=8, vq_features=["item_id"],
                       vq=VQConfig(codebook_size=8, output="quantized"))
    names = [n for n, _ in model.named_buffers()] + [n for n, _ in model.named_parameters()]
    quantized = {n.split("quantizers.")[1].split(".")[0] for n in names if "quantizers." in n}
    assert quantized == {"t_item_id"}
    b = _batches(1)[0]
    assert model(b.dense_features, b.sparse_features).shape == (16, 1)
    # concat on a subset: the quantized key is [e, q] (2D), the others are plain 2D tables
    model = build_dlrm(SIZES, num_dense=2, embedding_dim=8, vq_features=["item_id"],
                       vq=VQConfig(codebook_size=8, output="concat"))
    dims = {t.name: t.embedding_dim
            for t in model.sparse_arch.embedding_bag_collection.embedding_bag_configs()}
    assert set(dims.values()) == {16}
    assert model(b.dense_features, b.sparse_features).shape == (16, 1)
    with pytest.raises(ValueError, match="vq_features is empty"):
        build_dlrm(SIZES, num_dense=2, vq_features=[], vq=VQConfig(output="concat"))
    with pytest.raises(ValueError, match="not sparse features"):
        build_dlrm(SIZES, num_dense=2, vq_features=["movie"], vq=VQConfig(output="quantized"))
