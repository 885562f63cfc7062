"""VQ collections under DistributedModelParallel: 2 gloo ranks (fork), CPU.

Each test is one spawned job looping over sharding types, so the whole file stays ~30 s.

Equivalence with a single-process reference (same seed, global batch = both ranks' local
batches): each rank's loss is ``mean BCE(local) + vq_loss(local)``; the dense part (DDP),
and (TorchRec's gradient division) sharded tables get the mean of the ranks' gradients,
i.e. the gradient of ``mean BCE(global) + vq_loss(global)`` (equal local batches), which is
what the reference minimises with the same optimizers; data-parallel tables get a further
``1 / W`` in TorchRec (measured), so the reference divides their SGD rate by ``W``. The
quantizers see the global batch through their all-reduced EMA statistics.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_multiprocess
from torch import nn
from torchrec import EmbeddingBagConfig, EmbeddingConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRM
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import JaggedTensor

from vq_torchrec import VQConfig
from vq_torchrec.distributed import load_checkpoint, save_checkpoint, shard_model, warm_start_rows
from vq_torchrec.modules import VQEmbeddingBagCollection, VQEmbeddingCollection, vq_loss

pytestmark = pytest.mark.slow

WORLD = 2
LOCAL_B = 4
DIM = 8
DENSE_LR = 0.05
STEPS = 3
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, float]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.1}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.1, "eps": 1e-8}),
    "rowwise_adagrad": (RowWiseAdagrad, {"lr": 0.1, "eps": 1e-8}),
}
# Row-wise Adagrad keeps one accumulator per row *of each column shard*, so under column-wise
# sharding it differs from the unsharded optimizer by design: it is tested table-wise.
EBC_CASES = [
    ("table_wise", "rowwise_adagrad"),
    ("column_wise", "adagrad"),
    ("table_column_wise", "sgd"),
    ("data_parallel", "sgd"),
]
EC_CASES = [("table_wise", "adagrad"), ("row_wise", "rowwise_adagrad"), ("column_wise", "sgd")]


def vq_cfg(**kw: Any) -> VQConfig:
    base: dict[str, Any] = {"codebook_size": 4, "kmeans_init": False, "restart_every": 0, "decay": 0.9}
    base.update(kw)
    return VQConfig(**base)


# --- models and data ------------------------------------------------------------------------


def dlrm_model(seed: int, vq: VQConfig | None = None) -> DLRM:
    """DLRM over t0, t1 (quantized) and t2 (pass-through), dim 8."""
    torch.manual_seed(seed)
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=30 + 10 * i, feature_names=[f"f{i}"])
        for i in range(3)
    ]
    cfg = vq or vq_cfg()
    vqm = VQEmbeddingBagCollection(tables, {"t0": cfg, "t1": cfg})
    return DLRM(embedding_bag_collection=vqm, dense_in_features=4, dense_arch_layer_sizes=[DIM], over_arch_layer_sizes=[8, 1])


class SeqModel(nn.Module):
    """VQEmbeddingCollection -> per-bag sum of the (quantized) rows -> linear."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        tables = [
            EmbeddingConfig(name=f"s{i}", embedding_dim=DIM, num_embeddings=30 + 10 * i, feature_names=[f"f{i}"])
            for i in range(3)
        ]
        self.vqec = VQEmbeddingCollection(tables, {"s0": vq_cfg(), "s1": vq_cfg()})
        self.head = nn.Linear(3 * DIM, 1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        out: dict[str, JaggedTensor] = self.vqec(kjt)
        pooled = [out[k].to_padded_dense(3).sum(dim=1) for k in ("f0", "f1", "f2")]
        return self.head(torch.cat(pooled, dim=1))


def make_data(n_batches: int, seed: int = 1) -> list[tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]]:
    """Global batches (B = WORLD * LOCAL_B) with 0-3 ids per bag (some empty bags)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    b = WORLD * LOCAL_B
    for _ in range(n_batches):
        lengths = torch.randint(0, 4, (3, b), generator=g)
        values = torch.cat([torch.randint(0, 30, (int(lengths[i].sum()),), generator=g) for i in range(3)])
        kjt = KeyedJaggedTensor(keys=["f0", "f1", "f2"], values=values, lengths=lengths.view(-1))
        out.append((torch.randn(b, 4, generator=g), kjt, torch.randint(0, 2, (b,), generator=g).float()))
    return out


def local_part(batch: tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
    dense, kjt, label = batch
    rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    jts = kjt.to_dict()
    parts = [JaggedTensor(values=jts[k].values()[jts[k].offsets()[rows.start]: jts[k].offsets()[rows.stop]], lengths=jts[k].lengths()[rows]) for k in kjt.keys()]
    local = KeyedJaggedTensor(
        keys=kjt.keys(),
        values=torch.cat([p.values() for p in parts]),
        lengths=torch.cat([p.lengths() for p in parts]),
    )
    return dense[rows], local, label[rows]


def forward(model: nn.Module, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
    return model(kjt).squeeze(1) if isinstance(model, SeqModel) or _is_seq(model) else model(dense, kjt).squeeze(1)


def _is_seq(model: nn.Module) -> bool:
    return any(isinstance(m, SeqModel) for m in model.modules())


def codebooks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".quantizers." in k and k.endswith(".embed")}


def train(model: nn.Module, dense_params: list[nn.Parameter], batches: list[Any], scale: float, dense_lr: float) -> None:
    """SGD on the dense part; loss = BCE + VQ aux loss. For sequence models the aux loss is
    left out: it is a mean over each rank's (unequal) number of looked-up rows, so the ranks'
    mean is not the global mean (the straight-through path is still exercised)."""
    opt = torch.optim.SGD(dense_params, lr=dense_lr)
    bce = nn.BCEWithLogitsLoss()
    seq = _is_seq(model)
    for dense, kjt, label in batches:
        opt.zero_grad()
        loss = bce(forward(model, dense, kjt), label)
        if not seq:
            loss = loss + vq_loss(model)
        loss = scale * loss
        loss.backward()
        opt.step()


def emb_module(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, (VQEmbeddingBagCollection, VQEmbeddingCollection)))


def tables_of(vq: nn.Module) -> nn.Module:
    return vq.ebc if isinstance(vq, VQEmbeddingBagCollection) else vq.ec


def reference(kind: str, sharding: str, opt: str) -> dict[str, Any]:
    """Single-process reference run (no torch.distributed)."""
    model = dlrm_model(0) if kind == "ebc" else SeqModel(0)
    cls, kw = OPTIMIZERS[opt]
    kw = dict(kw)
    if sharding == "data_parallel":
        kw["lr"] /= WORLD
    apply_optimizer_in_backward(cls, tables_of(emb_module(model)).parameters(), kw)
    dense = [p for _, p in in_backward_optimizer_filter(model.named_parameters())]
    data = make_data(STEPS + 1)
    train(model, dense, data[:STEPS], scale=1.0, dense_lr=DENSE_LR)
    model.eval()
    with torch.no_grad():
        preds = forward(model, data[-1][0], data[-1][1])
    return {"preds": preds, "codebooks": codebooks(model)}


# --- rank bodies ---------------------------------------------------------------------------------


def _gather(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _sharded_run(rank: int, kind: str, sharding: str, opt: str) -> dict[str, Any]:
    model = dlrm_model(0) if kind == "ebc" else SeqModel(0)
    cls, kw = OPTIMIZERS[opt]
    apply_optimizer_in_backward(cls, tables_of(emb_module(model)).parameters(), dict(kw))
    dmp = shard_model(model, sharding, min_partition=DIM // WORLD)
    dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
    data = make_data(STEPS + 1)
    train(dmp, dense, [local_part(b, rank) for b in data[:STEPS]], scale=1.0, dense_lr=DENSE_LR)
    dmp.eval()
    with torch.no_grad():
        d, k, _ = local_part(data[-1], rank)
        preds = _gather(forward(dmp, d, k))
    books = codebooks(dmp)
    return {"preds": preds, "codebooks": books, "plan": str(dmp.plan)}


def _training_job(rank: int, world: int, kind: str, cases: list[tuple[str, str]]) -> dict[str, Any]:
    out = {f"{s}/{o}": _sharded_run(rank, kind, s, o) for s, o in cases}
    if kind == "ebc":  # k-means init + dead-code restarts every step: still identical on both ranks
        model = dlrm_model(1, vq_cfg(kmeans_init=True, restart_every=1, codebook_size=8))
        apply_optimizer_in_backward(torch.optim.SGD, emb_module(model).ebc.parameters(), {"lr": 0.1})
        dmp = shard_model(model, "table_wise")
        data = make_data(STEPS, seed=rank + 5)  # different data per rank
        train(dmp, [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())],
              [local_part(b, rank) for b in data], scale=1.0, dense_lr=DENSE_LR)
        out["kmeans_restart"] = {"codebooks": codebooks(dmp)}
    return out


def _assert_same_across_ranks(results: list[dict[str, Any]], case: str) -> None:
    a, b = results[0][case]["codebooks"], results[1][case]["codebooks"]
    assert a.keys() == b.keys() and len(a) == 2
    for key in a:
        assert torch.equal(a[key], b[key]), f"{case}: codebook {key} differs across ranks"


def _assert_matches_reference(results: list[dict[str, Any]], kind: str, cases: list[tuple[str, str]]) -> None:
    for sharding, opt in cases:
        case = f"{sharding}/{opt}"
        ref = reference(kind, sharding, opt)
        _assert_same_across_ranks(results, case)
        for rank in range(WORLD):
            got = results[rank][case]
            torch.testing.assert_close(got["preds"], ref["preds"], atol=1e-4, rtol=1e-4, msg=lambda m, c=case: f"{c}: {m}")
            for key, book in ref["codebooks"].items():
                torch.testing.assert_close(got["codebooks"][key], book, atol=1e-5, rtol=1e-5, msg=lambda m, c=case: f"{c}: {m}")
        assert sharding in results[0][case]["plan"]


def test_sharded_ebc_training_matches_reference_for_every_cpu_sharding_type() -> None:
    results = run_multiprocess(_training_job, WORLD, ("ebc", EBC_CASES))
    _assert_matches_reference(results, "ebc", EBC_CASES)
    _assert_same_across_ranks(results, "kmeans_restart")


def test_sharded_ec_training_matches_reference_for_every_cpu_sharding_type() -> None:
    results = run_multiprocess(_training_job, WORLD, ("ec", EC_CASES))
    _assert_matches_reference(results, "ec", EC_CASES)


# --- checkpoints, warm start, pipeline -----------------------------------------------------------


def _lookup_rows(vq: nn.Module, table: str, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of ``table`` read through the (sharded) lookup: one id per bag."""
    feature = "f" + table[1:]
    keys = ["f0", "f1", "f2"]
    lengths = torch.zeros(3, ids.numel(), dtype=torch.long)
    lengths[keys.index(feature)] = 1
    kjt = KeyedJaggedTensor(keys=keys, values=ids, lengths=lengths.view(-1))
    with torch.no_grad():
        if isinstance(vq, VQEmbeddingBagCollection):
            return vq.ebc(kjt)[feature].detach()
        return vq.ec(kjt)[feature].values().detach()


def _warm_start_case(rank: int, kind: str, sharding: str) -> dict[str, Any]:
    model = dlrm_model(3) if kind == "ebc" else SeqModel(3)
    table = "t1" if kind == "ebc" else "s1"
    apply_optimizer_in_backward(torch.optim.SGD, tables_of(emb_module(model)).parameters(), {"lr": 0.5})
    dmp = shard_model(model, sharding, min_partition=DIM // WORLD)
    ids = torch.tensor([0, 7, 21, 39])  # spans both row shards (40 rows)
    rows = torch.arange(4 * DIM, dtype=torch.float32).view(4, DIM) / 10.0
    written = warm_start_rows(dmp, table, ids, rows)
    vq = emb_module(dmp)
    looked_up = _lookup_rows(vq, table, ids)
    # the fused optimizer updates the written rows (same storage): one step moves them
    data = make_data(1, seed=9)
    d, k, y = local_part(data[0], rank)
    k = KeyedJaggedTensor(keys=k.keys(), values=torch.full_like(k.values(), 7), lengths=k.lengths())
    loss = nn.functional.binary_cross_entropy_with_logits(forward(dmp, d, k), y)
    loss.backward()
    moved = _lookup_rows(vq, table, torch.tensor([7]))
    return {"written": written, "looked_up": looked_up, "rows": rows, "moved": moved}


def _checkpoint_pipeline_job(rank: int, world: int, ckpt: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    data = make_data(STEPS + 1)
    # train table-wise, save
    model = dlrm_model(0)
    apply_optimizer_in_backward(torch.optim.SGD, emb_module(model).ebc.parameters(), {"lr": 0.1})
    tw = shard_model(model, "table_wise")
    train(tw, [p for _, p in in_backward_optimizer_filter(tw.named_parameters())],
          [local_part(b, rank) for b in data[:STEPS]], scale=1.0, dense_lr=DENSE_LR)
    save_checkpoint(tw, ckpt)
    out["dmp_keys"] = list(tw.state_dict())
    out["codes"] = emb_module(tw).export_codes("t0", torch.arange(30))  # collective lookup
    tw.eval()
    d, k, _ = local_part(data[-1], rank)
    with torch.no_grad():
        out["tw_preds"] = _gather(forward(tw, d, k))
    # load into a differently seeded column-wise model
    cw = shard_model(dlrm_model(42), "column_wise", min_partition=DIM // WORLD)
    cw.eval()
    with torch.no_grad():
        out["cw_before"] = _gather(forward(cw, d, k))
    load_checkpoint(cw, ckpt)
    with torch.no_grad():
        out["cw_preds"] = _gather(forward(cw, d, k))
    out["cw_books"] = codebooks(cw)
    out["tw_books"] = codebooks(tw)
    # warm start: EBC table-wise and column-wise, EC row-wise
    out["warm"] = {f"{kind}/{s}": _warm_start_case(rank, kind, s) for kind, s in [("ebc", "table_wise"), ("ebc", "column_wise"), ("ec", "row_wise")]}
    # TrainPipelineSparseDist vs the same steps without the pipeline
    out["pipeline"] = _pipeline_case(rank)
    return out


class DLRMTrainVQ(nn.Module):
    """``Batch -> (loss, (loss, logits, labels))`` with the VQ aux loss inside (the pipeline
    runs backward itself)."""

    def __init__(self, dlrm: DLRM) -> None:
        super().__init__()
        self.model = dlrm
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits = self.model(batch.dense_features, batch.sparse_features).squeeze(-1)
        loss = self.loss_fn(logits, batch.labels) + vq_loss(self.model)
        return loss, (loss.detach(), logits.detach(), batch.labels.detach())


def _pipeline_case(rank: int) -> dict[str, Any]:
    data = make_data(STEPS + 1, seed=11)
    local = [Batch(*local_part(b, rank)) for b in data]
    results = {}
    for use_pipeline in (True, False):
        model = DLRMTrainVQ(dlrm_model(0))
        apply_optimizer_in_backward(torch.optim.SGD, emb_module(model).ebc.parameters(), {"lr": 0.1})
        dmp = shard_model(model, "table_wise")
        opt = torch.optim.SGD([p for _, p in in_backward_optimizer_filter(dmp.named_parameters())], lr=DENSE_LR)
        losses = []
        if use_pipeline:
            pipe = TrainPipelineSparseDist(dmp, opt, torch.device("cpu"))
            it = iter(local[:STEPS])
            for _ in range(STEPS):
                losses.append(pipe.progress(it)[0].detach())
            results["pipelined_modules"] = len(pipe._pipelined_modules)
            dmp = pipe.detach()  # original forwards back, for the eager evaluation below
        else:
            for b in local[:STEPS]:
                opt.zero_grad()
                loss, _ = dmp(b)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
        dmp.eval()
        with torch.no_grad():
            logits = dmp(local[-1])[1][1]
        results["pipe" if use_pipeline else "eager"] = {"losses": torch.stack(losses), "logits": logits, "books": codebooks(dmp)}
    return results


def test_checkpoint_reshard_warm_start_and_train_pipeline(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ckpt")
    results = run_multiprocess(_checkpoint_pipeline_job, WORLD, (ckpt,), timeout_s=180)
    r0, r1 = results
    # 2 ranks table-wise -> 2 ranks column-wise (different seed before loading)
    assert not torch.allclose(r0["cw_before"], r0["tw_preds"])
    torch.testing.assert_close(r0["cw_preds"], r0["tw_preds"], atol=1e-6, rtol=1e-6)
    for key, book in r0["tw_books"].items():
        assert torch.equal(r0["cw_books"][key], book) and torch.equal(r1["cw_books"][key], book)
    # 2 ranks -> 1 process, unsharded
    single = dlrm_model(7)
    load_checkpoint(single, ckpt)
    single.eval()
    d, k, _ = make_data(STEPS + 1)[-1]
    with torch.no_grad():
        torch.testing.assert_close(forward(single, d, k), r0["tw_preds"], atol=1e-6, rtol=1e-6)
    assert list(single.state_dict()) == list(dlrm_model(0).state_dict())
    assert sorted(r0["dmp_keys"]) == sorted(single.state_dict())  # DMP keys = unsharded keys
    codes = emb_module(single).export_codes("t0", torch.arange(30))
    assert torch.equal(r0["codes"], codes) and torch.equal(r1["codes"], codes)
    vq_single = emb_module(single)
    rows = vq_single.ebc.embedding_bags["t0"].weight[:30].detach()
    assert torch.equal(codes, vq_single.quantize.quantizers["t0"].encode(rows))
    # warm start
    for case in r0["warm"]:
        w0, w1 = r0["warm"][case], r1["warm"][case]
        assert w0["written"] + w1["written"] >= 4, case
        for w in (w0, w1):
            torch.testing.assert_close(w["looked_up"], w["rows"], rtol=0, atol=0, msg=lambda m, c=case: f"{c}: {m}")
            assert not torch.allclose(w["moved"], w["rows"][1:2]), f"{case}: fused optimizer did not update the row"
    assert r0["warm"]["ebc/column_wise"]["written"] == 4 and r1["warm"]["ebc/column_wise"]["written"] == 4
    # pipeline: pipelined the sharded EBC, same losses / logits / codebooks as eager
    for r in results:
        p = r["pipeline"]
        assert p["pipelined_modules"] >= 1
        torch.testing.assert_close(p["pipe"]["losses"], p["eager"]["losses"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(p["pipe"]["logits"], p["eager"]["logits"], atol=1e-5, rtol=1e-5)
        for key in p["eager"]["books"]:
            torch.testing.assert_close(p["pipe"]["books"][key], p["eager"]["books"][key], atol=1e-6, rtol=1e-6)
    assert copy.deepcopy(r0["pipeline"]["pipe"]["books"]).keys() == r1["pipeline"]["pipe"]["books"].keys()
