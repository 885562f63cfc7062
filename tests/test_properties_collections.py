"""Property-based tests (hypothesis) of VQEmbeddingBagCollection / VQEmbeddingCollection.

Random tables (1-2, dims 1-4, 1-8 rows, fp32/fp16 storage, SUM/MEAN pooling, features shared
by tables), random VQ configs per table (or pass-through), random batches (B = 0..4, ragged
lengths 0..3 so empty bags are common, duplicate ids, per-id weights including 0 / 1e-30 /
1e10 / NaN / Inf), tables scaled by 0 / 1e-40 / 1e-30 / 1e10 / 1e20, training or eval. Property:
the output has the plain collection's keys, order and widths, is finite, keeps pass-through
keys bit-identical and empty bags at zero, gives finite gradients and stats -- or the call
raises a ``ValueError`` naming the quantized table and the feature whose rows were bad.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torchrec import EmbeddingBagConfig, EmbeddingConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import DataType, PoolingType

from vq_torchrec import VQConfig
from vq_torchrec.modules import VQEmbeddingBagCollection, VQEmbeddingCollection, vq_loss, vq_stats
from vq_torchrec.quantization.validation import MAX_ABS_INPUT

FEATURES = ["f0", "f1", "f2"]
TABLE_SCALES = [1.0, 1.0, 0.0, 1e-40, 1e-30, 1e10, 1e20]
WEIGHTS = st.one_of(
    st.floats(-3.0, 3.0, allow_nan=False, width=32),
    st.sampled_from([0.0, 1e-30, 1e10, float("nan"), float("inf")]),
)
PROPERTY_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)




def vq_configs(concat: bool | None = None) -> st.SearchStrategy[VQConfig]:
    """Any VQConfig (``output`` fixed when ``concat`` is given)."""
    output = st.sampled_from(["quantized", "concat"]) if concat is None else st.just("concat" if concat else "quantized")
    return st.builds(
        VQConfig,
        codebook_size=st.integers(1, 4),
        mode=st.sampled_from(["vector", "outer"]),
        distance=st.sampled_from(["l2", "cosine"]),
        update=st.sampled_from(["ema", "loss"]),
        rotation_trick=st.booleans(),
        kmeans_init=st.booleans(),
        kmeans_iters=st.integers(0, 2),
        restart_every=st.sampled_from([0, 1]),
        num_levels=st.integers(1, 2),
        output=output,
    )


@dataclass
class Case:
    tables: list[EmbeddingBagConfig] | list[EmbeddingConfig]
    vq: dict[str, VQConfig]
    scales: dict[str, float]
    features: list[str]
    lengths: list[int]  # (F * B,), feature-major
    ids: list[int]
    weights: list[float] | None
    training: bool

    @property
    def batch(self) -> int:
        return len(self.lengths) // len(self.features)

    def kjt(self) -> KeyedJaggedTensor:
        return KeyedJaggedTensor(
            keys=self.features,
            values=torch.tensor(self.ids, dtype=torch.long),
            lengths=torch.tensor(self.lengths, dtype=torch.long),
            weights=None if self.weights is None else torch.tensor(self.weights, dtype=torch.float32),
        )


@st.composite
def batches(draw: st.DrawFn, tables: list, weighted: bool) -> tuple[list[str], list[int], list[int], list[float] | None]:
    features = sorted({f for t in tables for f in t.feature_names})
    rows = {f: min(t.num_embeddings for t in tables if f in t.feature_names) for f in features}
    batch = draw(st.sampled_from([1, 2, 3, 4, 2, 3, 1, 4, 3, 0]))  # B = 0 about once in ten
    lengths = [draw(st.integers(0, 3)) for _ in range(len(features) * batch)]
    ids: list[int] = []
    for i, f in enumerate(features):
        n = sum(lengths[i * batch : (i + 1) * batch])
        ids += draw(st.lists(st.integers(0, rows[f] - 1), min_size=n, max_size=n))  # duplicates likely
    weights = draw(st.lists(WEIGHTS, min_size=len(ids), max_size=len(ids))) if weighted else None
    return features, lengths, ids, weights


@st.composite
def table_specs(draw: st.DrawFn, same_dim: bool, fp16: bool = True) -> list[tuple[str, int, int, list[str], DataType]]:
    n = draw(st.integers(1, 2))
    dim = draw(st.integers(1, 4))
    specs = []
    for i in range(n):
        feats = draw(st.lists(st.sampled_from(FEATURES), min_size=1, max_size=2, unique=True))
        specs.append(
            (
                f"t{i}",
                dim if same_dim else draw(st.integers(1, 4)),
                draw(st.integers(1, 8)),
                sorted(feats),
                draw(st.sampled_from([DataType.FP32, DataType.FP16] if fp16 else [DataType.FP32])),
            )
        )
    return specs


@st.composite
def bag_cases(draw: st.DrawFn) -> Case:
    weighted = draw(st.booleans())
    tables = [
        EmbeddingBagConfig(
            name=name, embedding_dim=dim, num_embeddings=rows, feature_names=feats, data_type=dtype,
            pooling=PoolingType.SUM if weighted else draw(st.sampled_from([PoolingType.SUM, PoolingType.MEAN])),
        )
        # unsharded TorchRec EBCs need per-id weights of the table's dtype (float32 KJT weights)
        for name, dim, rows, feats, dtype in draw(table_specs(same_dim=False, fp16=not weighted))
    ]
    vq = {t.name: draw(vq_configs()) for t in tables if draw(st.integers(0, 3)) > 0}
    features, lengths, ids, weights = draw(batches(tables, weighted))
    scales = {t.name: draw(st.sampled_from(TABLE_SCALES)) for t in tables}
    return Case(tables, vq, scales, features, lengths, ids, weights, draw(st.booleans()))


@st.composite
def sequence_cases(draw: st.DrawFn) -> Case:
    tables = [
        EmbeddingConfig(name=name, embedding_dim=dim, num_embeddings=rows, feature_names=feats, data_type=dtype)
        for name, dim, rows, feats, dtype in draw(table_specs(same_dim=True))
    ]
    concat = draw(st.booleans())  # an EC has one width: concat for every table or for none
    quantized = [t.name for t in tables if concat or draw(st.integers(0, 3)) > 0]
    vq = {name: draw(vq_configs(concat=concat)) for name in quantized}
    features, lengths, ids, _ = draw(batches(tables, weighted=False))
    scales = {t.name: draw(st.sampled_from(TABLE_SCALES)) for t in tables}
    return Case(tables, vq, scales, features, lengths, ids, None, draw(st.booleans()))


def scale_tables(weights: dict[str, torch.Tensor], scales: dict[str, float]) -> None:
    with torch.no_grad():
        for name, w in weights.items():
            w.copy_((w.double() * scales[name]).to(w.dtype))


def bad_rows(x: torch.Tensor) -> bool:
    """Would a quantizer reject these rows (NaN/Inf, or |x| beyond the accepted range)?"""
    if x.numel() == 0:
        return False
    return not bool(torch.isfinite(x).all()) or float(x.detach().double().abs().max()) > MAX_ABS_INPUT


def expected_rejections(key_rows: dict[str, torch.Tensor], key_tables: dict[str, str], vq: dict[str, VQConfig],
                        key_feature: dict[str, str]) -> dict[str, set[str]]:
    """``{quantized table: {features with rows it rejects}}``."""
    bad: dict[str, set[str]] = {}
    for key, rows in key_rows.items():
        table = key_tables[key]
        if table in vq and bad_rows(rows):
            bad.setdefault(table, set()).add(key_feature[key])
    return bad


def check_error(err: pytest.ExceptionInfo[ValueError], bad: dict[str, set[str]]) -> None:
    msg = str(err.value)
    tables = [t for t in bad if f"table {t!r}" in msg]
    assert tables, (msg, bad)
    assert any(f"feature {f!r}" in msg or f"{f!r}" in msg for f in bad[tables[0]]), (msg, bad)


def assert_grads_finite(module: torch.nn.Module) -> None:
    """Every float32 parameter's gradient is finite. float16 tables are left out: their dense
    gradients are float16 sums, and a legitimately large float32 gradient (cosine VQ of a
    nearly-zero residual scales like 1 / ||residual||) saturates / overflows there."""
    bad = [
        n for n, p in module.named_parameters()
        if p.dtype == torch.float32 and p.grad is not None and not bool(torch.isfinite(p.grad).all())
    ]
    assert bad == [], bad


@PROPERTY_SETTINGS
@given(case=bag_cases())
def test_vq_ebc_output_is_well_formed_and_finite_or_names_table_and_feature(case: Case) -> None:
    torch.manual_seed(0)
    weighted = case.weights is not None
    m = VQEmbeddingBagCollection(case.tables, case.vq, is_weighted=weighted)  # type: ignore[arg-type]
    m.train(case.training)
    scale_tables({n: b.weight for n, b in m.ebc.embedding_bags.items()}, case.scales)
    kjt = case.kjt()
    dims = m.output_dims()
    layout = m._layout
    if case.batch == 0:
        out = m(kjt)
        event("empty batch")
        assert out.keys() == list(dims) and out.values().shape == (0, sum(dims.values()))
        return
    if weighted and not bool(torch.isfinite(kjt.weights()).all()):
        event("ValueError naming the feature with NaN/Inf weights")
        bad_features = [f for f, jt in kjt.to_dict().items() if not bool(torch.isfinite(jt.weights()).all())]
        with pytest.raises(ValueError, match="per-id weights hold NaN or Inf") as err:
            m(kjt)
        assert all(f"feature {f!r}" in str(err.value) for f in bad_features), (str(err.value), bad_features)
        return
    plain = m.ebc(kjt).to_dict()  # what the quantizers will see, per key
    bad = expected_rejections(plain, layout.key_tables, case.vq, layout.key_features)
    if bad:
        event("ValueError naming table and feature")
        with pytest.raises(ValueError) as err:
            m(kjt)
        check_error(err, bad)
        return
    out = m(kjt)
    event(f"output (weighted={weighted}, quantized tables={len(case.vq)})")
    assert out.keys() == list(plain) == layout.keys
    assert out.length_per_key() == list(dims.values())
    assert out.values().shape == (case.batch, sum(dims.values()))
    by_key = out.to_dict()
    lengths = kjt.lengths().view(len(case.features), -1)
    for key, value in by_key.items():
        table, feature = layout.key_tables[key], layout.key_features[key]
        if table not in case.vq:  # pass-through: bit-identical (NaN weights stay plain TorchRec's business)
            torch.testing.assert_close(value, plain[key], rtol=0, atol=0, equal_nan=True)
            continue
        assert bool(torch.isfinite(value).all()), (key, value)
        d = plain[key].shape[1]
        q = value[:, d:] if case.vq[table].output == "concat" else value
        if case.vq[table].output == "concat":
            torch.testing.assert_close(value[:, :d], plain[key], rtol=0, atol=0)
        empty = lengths[case.features.index(feature)] == 0
        assert bool((q[empty] == 0).all()), (key, q)
    loss = vq_loss(m)
    assert loss.dtype == torch.float32 and bool(torch.isfinite(loss))
    passthrough = [k for k in by_key if layout.key_tables[k] not in case.vq]
    total = sum(by_key[k].float().sum() for k in by_key if k not in passthrough) + loss
    if total.requires_grad:
        total.backward()
        assert_grads_finite(m)
    for table, stats in vq_stats(m).items():
        assert all(v == v and abs(v) != float("inf") for v in stats.values()), (table, stats)
    m.eval()
    codes = m.codes(kjt)
    for key, c in codes.items():
        assert c.shape[0] == case.batch and c.dtype == torch.long
        empty = lengths[case.features.index(layout.key_features[key])] == 0
        assert bool((c[empty] == -1).all()) and bool((c[~empty] >= 0).all())


@PROPERTY_SETTINGS
@given(case=sequence_cases())
def test_vq_ec_output_is_well_formed_and_finite_or_names_table_and_feature(case: Case) -> None:
    torch.manual_seed(0)
    m = VQEmbeddingCollection(case.tables, case.vq)  # type: ignore[arg-type]
    m.train(case.training)
    scale_tables({n: e.weight for n, e in m.ec.embeddings.items()}, case.scales)
    kjt = case.kjt()
    dims = m.output_dims()
    layout = m._layout
    if case.batch == 0:
        event("empty batch")
        out = m(kjt)
        assert list(out) == list(dims) and all(out[k].values().shape == (0, d) for k, d in dims.items())
        return
    plain = {k: jt.values() for k, jt in m.ec(kjt).items()}
    bad = expected_rejections(plain, layout.key_tables, case.vq, layout.key_features)
    if bad:
        event("ValueError naming table and feature")
        with pytest.raises(ValueError) as err:
            m(kjt)
        check_error(err, bad)
        return
    event(f"output (quantized tables={len(case.vq)})")
    out = m(kjt)
    assert list(out) == layout.keys
    per_feature = kjt.to_dict()
    for key, jt in out.items():
        table, feature = layout.key_tables[key], layout.key_features[key]
        assert jt.values().shape == (per_feature[feature].values().numel(), dims[key])
        torch.testing.assert_close(jt.lengths(), per_feature[feature].lengths(), rtol=0, atol=0)
        if table not in case.vq:  # pass-through: bit-identical (Inf in a scaled fp16 table included)
            torch.testing.assert_close(jt.values(), plain[key], rtol=0, atol=0, equal_nan=True)
            continue
        assert bool(torch.isfinite(jt.values()).all()), (key, jt.values())
    loss = vq_loss(m)
    assert bool(torch.isfinite(loss))
    total = sum(out[k].values().float().sum() for k in out if layout.key_tables[k] in case.vq) + loss
    if total.requires_grad:
        total.backward()
        assert_grads_finite(m)


# --- regressions / explicit examples of the properties above ------------------------------------


@pytest.mark.parametrize("quantized", [True, False])
def test_nan_weight_names_feature_and_table_quantized_or_not(quantized: bool) -> None:
    """Found by the property above: a NaN weight of a pass-through table used to reach its
    pooled output and (NaN * 0) its table gradient silently."""
    tables = [
        EmbeddingBagConfig(name="t0", embedding_dim=2, num_embeddings=4, feature_names=["f0"]),
        EmbeddingBagConfig(name="t1", embedding_dim=2, num_embeddings=4, feature_names=["f1"]),
    ]
    vq = {"t1": VQConfig(codebook_size=2)} if quantized else {"t0": VQConfig(codebook_size=2)}
    m = VQEmbeddingBagCollection(tables, vq, is_weighted=True)
    kjt = KeyedJaggedTensor(
        keys=["f0", "f1"], values=torch.tensor([0, 1, 1, 3]), lengths=torch.tensor([2, 0, 1, 1]),
        weights=torch.tensor([1.0, 1.0, float("inf"), 1.0]),
    )
    with pytest.raises(ValueError, match=r"feature 'f1' \(tables \['t1'\]\): 1 of 2"):
        m(kjt)
    if quantized:
        unchecked = VQEmbeddingBagCollection(tables, vq, is_weighted=True, validate_inputs=False)
        with pytest.raises(ValueError, match=r"table 't1', feature 'f1': 1 of 2 rows.*weights hold 1 NaN/Inf"):
            unchecked(kjt)


def test_fp16_table_overflowing_its_sum_is_reported() -> None:
    """Three fp16 rows of 30000 sum to Inf in the pooled fp16 output."""
    tables = [EmbeddingBagConfig(name="t0", embedding_dim=2, num_embeddings=4, feature_names=["f0"],
                                 data_type=DataType.FP16)]
    m = VQEmbeddingBagCollection(tables, VQConfig(codebook_size=2))
    with torch.no_grad():
        m.ebc.embedding_bags["t0"].weight.fill_(30000.0)
    kjt = KeyedJaggedTensor(keys=["f0"], values=torch.tensor([0, 1, 2]), lengths=torch.tensor([3]))
    with pytest.raises(ValueError, match=r"table 't0', feature 'f0': 1 of 1 rows hold NaN or Inf"):
        m(kjt)
