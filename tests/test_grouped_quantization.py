"""The grouped fast path of VQEmbeddingBagCollection (vq_torchrec.quantization.grouped) gives
what the per-table path gives: outputs, codes, losses, codebook state and gradients."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from dist_utils import run_multiprocess
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor

import vq_torchrec.modules.grouped_forward as ktq
from vq_torchrec import VQConfig
from vq_torchrec.modules import VQEmbeddingBagCollection, vq_loss, vq_stats
from vq_torchrec.quantization import VectorQuantizer, native
from vq_torchrec.quantization.grouped import grouped_eligible, quantize_slots

DIM = 8
K = 6


def tables() -> list[EmbeddingBagConfig]:
    """t1 serves f1 and f2 (two slots, one quantizer); t2 serves f3; t3 serves f4."""
    return [
        EmbeddingBagConfig(name="t1", embedding_dim=DIM, num_embeddings=40, feature_names=["f1", "f2"]),
        EmbeddingBagConfig(name="t2", embedding_dim=DIM, num_embeddings=30, feature_names=["f3"]),
        EmbeddingBagConfig(name="t3", embedding_dim=DIM, num_embeddings=30, feature_names=["f4"]),
    ]


def kjt(batch: int, seed: int, empty_every: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 4, (4, batch), generator=g)
    if empty_every:
        lengths[:, ::empty_every] = 0
    values = torch.randint(0, 30, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor(keys=["f1", "f2", "f3", "f4"], values=values, lengths=lengths.view(-1))


def pair(vq: dict[str, VQConfig] | VQConfig) -> tuple[VQEmbeddingBagCollection, VQEmbeddingBagCollection]:
    """Two identical collections; the second is forced onto the per-table path."""
    torch.manual_seed(0)
    fast = VQEmbeddingBagCollection.from_ebc(EmbeddingBagCollection(tables=tables()), vq)
    slow = copy.deepcopy(fast)
    slow.quantize.grouped = False
    return fast, slow


def cfg(**kw: object) -> VQConfig:
    base: dict[str, object] = {"codebook_size": K, "kmeans_iters": 3, "restart_every": 3, "decay": 0.9}
    base.update(kw)
    return VQConfig(**base)  # type: ignore[arg-type]


class _Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.calls += 1
        return quantize_slots(*args, **kwargs)  # type: ignore[arg-type]


def train_both(
    vq: dict[str, VQConfig] | VQConfig, steps: int, monkeypatch: pytest.MonkeyPatch, empty_every: int = 0
) -> tuple[VQEmbeddingBagCollection, VQEmbeddingBagCollection, int]:
    fast, slow = pair(vq)
    counter = _Counter()
    monkeypatch.setattr(ktq, "quantize_slots", counter)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (fast, slow)]
    for step in range(steps):
        batch = kjt(16, seed=step, empty_every=empty_every)
        outs = []
        for model, opt in zip((fast, slow), opts):
            opt.zero_grad()
            torch.manual_seed(1000 + step)  # k-means and restarts draw from the global RNG
            out = model(batch)
            target = torch.linspace(-1, 1, out.values().shape[1])
            loss = ((out.values() - target) ** 2).mean() + vq_loss(model)
            loss.backward()
            opt.step()
            outs.append(out)
        torch.testing.assert_close(outs[0].values(), outs[1].values(), rtol=1e-5, atol=1e-6)
        assert outs[0].keys() == outs[1].keys()
        nonempty = (batch.lengths().view(4, -1) > 0).unbind(0)
        rows = {"t1": torch.cat(nonempty[:2]), "t2": nonempty[2], "t3": nonempty[3]}
        for (table, a), (_, b) in zip(fast.quantize.last_outputs().items(), slow.quantize.last_outputs().items()):
            assert torch.equal(a.codes, b.codes), (step, table)
            torch.testing.assert_close(a.loss, b.loss, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(a.perplexity, b.perplexity)
            # the fast path's per-table output already holds the empty-bag zeros
            keep = rows[table]
            torch.testing.assert_close(a.quantized[keep], b.quantized[keep], rtol=1e-5, atol=1e-6)
            if step > 0:  # step 0 is the k-means batch, on the per-table path
                assert torch.count_nonzero(a.quantized[~keep]) == 0
    return fast, slow, counter.calls


def assert_same_state(fast: VQEmbeddingBagCollection, slow: VQEmbeddingBagCollection) -> None:
    a, b = fast.state_dict(), slow.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_grouped_path_matches_per_table_path_in_training(monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow, calls = train_both(cfg(), steps=7, monkeypatch=monkeypatch)
    assert calls == 6  # every step after the k-means batch took the fast path
    assert_same_state(fast, slow)  # table rows (so gradients), codebooks, EMA stats, restarts
    assert int(fast.quantize.quantizers["t1"].step) == 7


def test_grouped_path_with_bf16_search_and_empty_bags(monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow, calls = train_both(cfg(search_precision="bf16"), steps=5, monkeypatch=monkeypatch, empty_every=3)
    assert calls == 4
    assert_same_state(fast, slow)
    out = fast.eval()(kjt(9, seed=99, empty_every=3)).values()
    assert torch.count_nonzero(out[::3]) == 0  # empty bags stay exact zeros


def test_grouped_path_with_passthrough_and_concat_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    # t1 concat ([embedding, quantized]), t2 passes through, t3 quantized
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=tables())
    fast = VQEmbeddingBagCollection.from_ebc(ebc, {"t1": cfg(output="concat"), "t3": cfg()})
    slow = copy.deepcopy(fast)
    slow.quantize.grouped = False
    counter = _Counter()
    monkeypatch.setattr(ktq, "quantize_slots", counter)
    for step in range(4):
        batch = kjt(12, seed=step)
        torch.manual_seed(step)
        a = fast(batch)
        torch.manual_seed(step)
        b = slow(batch)
        assert a.length_per_key() == b.length_per_key() == [2 * DIM, 2 * DIM, DIM, DIM]
        torch.testing.assert_close(a.values(), b.values(), rtol=1e-5, atol=1e-6)
        raw = fast.ebc(batch).to_dict()
        torch.testing.assert_close(a.to_dict()["f3"], raw["f3"], rtol=0, atol=0)  # pass-through
        torch.testing.assert_close(a.to_dict()["f1"][:, :DIM], raw["f1"], rtol=0, atol=0)  # concat: raw half
    assert counter.calls == 3
    assert_same_state(fast, slow)


def test_eval_mode_changes_no_state_and_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow, _ = train_both(cfg(), steps=2, monkeypatch=monkeypatch)
    fast.eval()
    slow.eval()
    before = copy.deepcopy(fast.state_dict())
    batch = kjt(10, seed=42)
    torch.testing.assert_close(fast(batch).values(), slow(batch).values(), rtol=1e-5, atol=1e-6)
    for key, value in fast.state_dict().items():
        assert torch.equal(value, before[key]), key
    stats = vq_stats(fast)
    assert set(stats) == {"t1", "t2", "t3"}
    assert all(1.0 <= s["perplexity"] <= K for s in stats.values())


def test_nan_on_the_fast_path_names_table_and_feature() -> None:
    fast, _ = pair(cfg())
    fast(kjt(8, seed=0))  # k-means batch: afterwards the fast path applies
    with torch.no_grad():
        fast.ebc.embedding_bags["t2"].weight[:] = float("nan")
    before = copy.deepcopy(fast.quantize.state_dict())
    with pytest.raises(ValueError, match="table 't2', feature 'f3'"):
        fast(kjt(8, seed=1))
    for key, value in fast.quantize.state_dict().items():
        assert torch.equal(value, before[key]), key  # the failed step changed nothing


@pytest.mark.parametrize("kernels", ["cpp", "torch"])
def test_commitment_gradient_of_quantize_slots(kernels: str) -> None:
    """d loss / d z of the grouped node equals autograd through the explicit formula, with the
    C++ one-pass backward and with the torch one."""
    with native.disabled() if kernels == "torch" else contextlib.nullcontext():
        _check_commitment_gradient()


def _check_commitment_gradient() -> None:
    torch.manual_seed(0)
    qs = [VectorQuantizer(4, 5, kmeans_iters=2, restart_every=0) for _ in range(2)]
    z0 = torch.randn(6, 3, 4)
    for t, q in enumerate(qs):  # initialise through the per-table path
        q(z0[:, t])
    for q in qs:
        q.eval()
    assert grouped_eligible(qs, 4)
    slot_table = [0, 1, 1]
    z = z0.clone().requires_grad_()
    res = quantize_slots(qs, slot_table, z)
    assert res is not None
    w = torch.randn(6, 3, 4)
    ((res.quantized * w).sum() + 3.0 * res.losses[0] + 2.0 * res.losses[1]).backward()
    # reference: straight-through + beta * mean((z - sg[e])^2) per table
    zr = z0.clone().requires_grad_()
    e = torch.stack([qs[t].codebook[res.codes[:, s]] for s, t in enumerate(slot_table)], dim=1)
    ste = zr + (e - zr).detach()
    loss0 = 0.25 * ((zr[:, 0] - e[:, 0]) ** 2).mean()
    loss1 = 0.25 * ((zr[:, 1:] - e[:, 1:]) ** 2).mean()
    ((ste * w).sum() + 3.0 * loss0 + 2.0 * loss1).backward()
    torch.testing.assert_close(res.losses[0], loss0, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(res.losses[1], loss1, rtol=1e-4, atol=1e-7)
    assert z.grad is not None and zr.grad is not None
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-5, atol=1e-6)


def test_not_eligible_before_init_or_for_other_configs() -> None:
    q = VectorQuantizer(4, 5)
    assert not grouped_eligible([q], 4)  # not initialised yet
    q(torch.randn(10, 4))
    assert grouped_eligible([q], 4)
    assert not grouped_eligible([q], 5)  # other dim
    other = VectorQuantizer(4, 5, distance="cosine")
    other(torch.randn(10, 4))
    assert not grouped_eligible([q, other], 4)
    lossq = VectorQuantizer(4, 5, update="loss")
    lossq(torch.randn(10, 4))
    assert not grouped_eligible([lossq], 4)


def single_id_kjt(batch: int, seed: int) -> KeyedJaggedTensor:
    """One id per bag for every feature, drawn from 5 ids, so rows repeat."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 5, (4 * batch,), generator=g)
    return KeyedJaggedTensor(keys=["f1", "f2", "f3", "f4"], values=values, lengths=torch.ones(4 * batch, dtype=torch.long))


@pytest.mark.parametrize("kernels", ["cpp", "torch"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_single_id_bags_search_distinct_rows_only(monkeypatch: pytest.MonkeyPatch, precision: str, kernels: str) -> None:
    """Distinct rows are searched in place by the C++ search and gathered for the torch ones."""
    with native.disabled() if kernels == "torch" else contextlib.nullcontext():
        _check_single_id_bags(monkeypatch, precision)


def _check_single_id_bags(monkeypatch: pytest.MonkeyPatch, precision: str) -> None:
    import vq_torchrec.quantization.grouped as grouped

    searched: list[int] = []

    def spy_on(name: str) -> None:
        real = getattr(grouped, name)

        def spy(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            rows = kwargs.get("rows")
            searched.append(x.shape[0] if rows is None else rows.numel())  # type: ignore[union-attr]
            return real(x, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(grouped, name, spy)

    # the grouped path calls the search of the table's precision
    spy_on("nearest_codes")
    spy_on("nearest_codes_bf16")
    fast, slow = pair(cfg(search_precision=precision))
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (fast, slow)]
    for step in range(4):
        batch = single_id_kjt(32, seed=step)
        outs = []
        for model, opt in zip((fast, slow), opts):
            opt.zero_grad()
            torch.manual_seed(step)
            out = model(batch)
            (out.values().pow(2).mean() + vq_loss(model)).backward()
            opt.step()
            outs.append(out.values())
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
        for table in ("t1", "t2", "t3"):
            a, b = fast.quantize.last_outputs()[table], slow.quantize.last_outputs()[table]
            assert torch.equal(a.codes, b.codes)
            torch.testing.assert_close(a.loss, b.loss, rtol=1e-4, atol=1e-7)
    assert_same_state(fast, slow)
    fast_calls = searched[-12:]  # 3 fast steps x 4 slots, after the k-means step
    assert fast_calls and max(fast_calls) <= 5  # at most the 5 distinct ids, not 32 rows


def _two_rank_body(rank: int, world_size: int, grouped: bool) -> dict[str, torch.Tensor]:
    """Replicated VQ collection, each rank its own batches, restarts every 2 steps."""
    torch.manual_seed(0)
    model = VQEmbeddingBagCollection.from_ebc(EmbeddingBagCollection(tables=tables()), cfg(restart_every=2))
    model.quantize.grouped = grouped
    for step in range(5):
        torch.manual_seed(100 + step)  # the same draws on every rank (shared_sample broadcasts rank 0's)
        model(kjt(8, seed=10 * step + rank))
    return {k: v.clone() for k, v in model.quantize.state_dict().items()}


def test_two_ranks_grouped_matches_per_table_and_stays_identical() -> None:
    fast = run_multiprocess(_two_rank_body, world_size=2, args=(True,))
    slow = run_multiprocess(_two_rank_body, world_size=2, args=(False,))
    for key in fast[0]:
        assert torch.equal(fast[0][key], fast[1][key]), key  # bit-identical across ranks
        torch.testing.assert_close(fast[0][key], slow[0][key], rtol=1e-5, atol=1e-6, msg=key)
    assert int(fast[0]["quantizers.t1.step"]) == 5


def test_reordered_keys_as_from_a_sharded_ebc() -> None:
    """A sharded EBC may order its keys differently: same output (in the plain EBC's order)
    and the same gradient to the pooled values."""
    fast, _ = pair(cfg())
    batch = kjt(8, seed=0)
    fast(batch)  # k-means batch
    fast.eval()
    pooled = fast.ebc(batch)
    keys, parts = pooled.keys(), pooled.to_dict()
    order = [2, 0, 3, 1]
    values = torch.cat([parts[keys[i]] for i in order], dim=1).detach().requires_grad_()
    shuffled = KeyedTensor(keys=[keys[i] for i in order], length_per_key=[DIM] * 4, values=values)
    straight = pooled.values().detach().requires_grad_()
    in_order = KeyedTensor(keys=keys, length_per_key=[DIM] * 4, values=straight)
    a, b = fast.quantize(shuffled, batch), fast.quantize(in_order, batch)
    assert a.keys() == b.keys() == keys
    torch.testing.assert_close(a.values(), b.values(), rtol=0, atol=0)
    w = torch.randn_like(a.values())
    (a.values() * w).sum().backward()
    (b.values() * w).sum().backward()
    assert values.grad is not None and straight.grad is not None
    expected = torch.cat([straight.grad.split(DIM, dim=1)[i] for i in order], dim=1)
    torch.testing.assert_close(values.grad, expected)
