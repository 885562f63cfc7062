"""Unsharded VQEmbeddingBagCollection / VQEmbeddingCollection: layout, drop-in, gradients,
swap-in, codes, aux loss / stats, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
)
from torchrec.models.dlrm import DLRM, DLRM_DCN

from vq_torchrec import VQConfig
from vq_torchrec.modules import (
    VQEmbeddingBagCollection,
    VQEmbeddingCollection,
    swap_in_vq,
    vq_loss,
    vq_output_dims,
    vq_stats,
)

DIM = 8
K = 4


def bag_tables(dim: int = DIM) -> list[EmbeddingBagConfig]:
    """t1 serves f1 and f2 (shared quantizer); t2 serves f3; t3 serves f1 too (f1@t1, f1@t3)."""
    return [
        EmbeddingBagConfig(name="t1", embedding_dim=dim, num_embeddings=20, feature_names=["f1", "f2"]),
        EmbeddingBagConfig(name="t2", embedding_dim=dim, num_embeddings=30, feature_names=["f3"]),
        EmbeddingBagConfig(name="t3", embedding_dim=dim, num_embeddings=25, feature_names=["f1"]),
    ]


def vq_cfg(**kw: object) -> VQConfig:
    base: dict[str, object] = {"codebook_size": K, "kmeans_init": False, "restart_every": 0}
    base.update(kw)
    return VQConfig(**base)  # type: ignore[arg-type]


def make_kjt(batch: int = 6, seed: int = 0, max_len: int = 3, empty_every: int = 0) -> KeyedJaggedTensor:
    """Random KJT over f1, f2, f3 with ids < 20; every ``empty_every``-th bag is empty."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (3, batch), generator=g)
    if empty_every:
        lengths[:, ::empty_every] = 0
    values = torch.randint(0, 20, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor(keys=["f1", "f2", "f3"], values=values, lengths=lengths.view(-1))


def paired(vq: dict[str, VQConfig] | VQConfig) -> tuple[EmbeddingBagCollection, VQEmbeddingBagCollection]:
    torch.manual_seed(0)
    plain = EmbeddingBagCollection(tables=bag_tables())
    return plain, VQEmbeddingBagCollection.from_ebc(copy.deepcopy(plain), vq)


# --- layout ---------------------------------------------------------------------------------


def test_keys_order_shapes_match_plain_ebc_and_passthrough_is_exact() -> None:
    plain, vqm = paired({"t1": vq_cfg()})
    kjt = make_kjt()
    ref, out = plain(kjt), vqm(kjt)
    assert out.keys() == ref.keys() == ["f1@t1", "f2", "f3", "f1@t3"]
    assert out.length_per_key() == ref.length_per_key() == [DIM] * 4
    assert out.values().shape == ref.values().shape == (6, 4 * DIM)
    r, o = ref.to_dict(), out.to_dict()
    for key in ("f3", "f1@t3"):  # pass-through tables
        torch.testing.assert_close(o[key], r[key], rtol=0, atol=0)
    for key in ("f1@t1", "f2"):  # quantized: rows are codewords, not the raw embeddings
        assert not torch.allclose(o[key], r[key])
    quantized_rows = torch.cat([o["f1@t1"], o["f2"]]).detach()
    assert torch.unique(quantized_rows, dim=0).shape[0] <= K


def test_shared_quantizer_per_table_matches_direct_quantizer_in_eval() -> None:
    plain, vqm = paired({"t1": vq_cfg(), "t2": vq_cfg()})
    vqm.eval()
    kjt = make_kjt(seed=3)
    r, o = plain(kjt).to_dict(), vqm(kjt).to_dict()
    quantizer = vqm.quantize.quantizers["t1"]
    direct = quantizer(torch.cat([r["f1@t1"], r["f2"]])).quantized
    torch.testing.assert_close(torch.cat([o["f1@t1"], o["f2"]]), direct)
    assert set(vqm.quantize.quantizers) == {"t1", "t2"}


def test_single_config_quantizes_all_tables_and_unknown_table_is_rejected() -> None:
    vqm = VQEmbeddingBagCollection(bag_tables(), vq_cfg())
    assert set(vqm.vq_configs) == {"t1", "t2", "t3"}
    with pytest.raises(ValueError, match="nope"):
        VQEmbeddingBagCollection(bag_tables(), {"nope": vq_cfg()})
    with pytest.raises(TypeError, match="VQConfig"):
        VQEmbeddingBagCollection(bag_tables(), {"t1": {"codebook_size": 4}})  # type: ignore[dict-item]


def test_concat_output_doubles_key_length_and_keeps_raw_half() -> None:
    plain, vqm = paired({"t1": vq_cfg(output="concat")})
    kjt = make_kjt()
    r, out = plain(kjt).to_dict(), vqm(kjt)
    assert out.length_per_key() == [2 * DIM, 2 * DIM, DIM, DIM]
    assert vqm.output_dims() == {"f1@t1": 2 * DIM, "f2": 2 * DIM, "f3": DIM, "f1@t3": DIM}
    assert vq_output_dims(vqm) == vqm.output_dims()
    o = out.to_dict()
    torch.testing.assert_close(o["f2"][:, :DIM], r["f2"], rtol=0, atol=0)
    assert not torch.allclose(o["f2"][:, DIM:], r["f2"])
    dims = {c.name: c.embedding_dim for c in vqm.embedding_bag_configs()}
    assert dims == {"t1": 2 * DIM, "t2": DIM, "t3": DIM}
    assert [c.embedding_dim for c in vqm.ebc.embedding_bag_configs()] == [DIM] * 3


def test_state_dict_keys_are_ebc_keys_plus_quantizer_buffers() -> None:
    plain, vqm = paired({"t1": vq_cfg()})
    keys = list(vqm.state_dict())
    ebc_keys = [k for k in keys if k.startswith("ebc.")]
    assert ebc_keys == [f"ebc.{k}" for k in plain.state_dict()]
    assert all(k.startswith(("ebc.embedding_bags.", "quantize.quantizers.t1.")) for k in keys)
    assert any(k.startswith("quantize.quantizers.t1.") for k in keys)
    other = VQEmbeddingBagCollection(bag_tables(), {"t1": vq_cfg()})
    other.load_state_dict(vqm.state_dict())
    kjt = make_kjt()
    vqm.eval()
    other.eval()
    torch.testing.assert_close(other(kjt).values(), vqm(kjt).values())


# --- gradients / training -------------------------------------------------------------------


def test_gradients_reach_rows_through_straight_through_estimator() -> None:
    plain, vqm = paired({"t1": vq_cfg(update="ema")})
    kjt = make_kjt(seed=5)
    w = torch.randn(6, 4 * DIM, generator=torch.Generator().manual_seed(1))
    (plain(kjt).values() * w).sum().backward()
    (vqm(kjt).values() * w).sum().backward()  # task loss only: STE passes it unchanged
    for table in ("t1", "t2", "t3"):
        g_plain = plain.embedding_bags[table].weight.grad
        g_vq = vqm.ebc.embedding_bags[table].weight.grad
        assert g_vq is not None and g_vq.abs().sum() > 0
        torch.testing.assert_close(g_vq, g_plain)
    used = torch.unique(kjt["f1"].values())
    unused = torch.ones(20, dtype=torch.bool)
    unused[used] = False
    unused[torch.unique(kjt["f2"].values())] = False
    assert vqm.ebc.embedding_bags["t1"].weight.grad[unused].abs().sum() == 0


def test_vq_loss_and_stats() -> None:
    _, vqm = paired({"t1": vq_cfg(), "t2": vq_cfg()})
    assert vq_loss(vqm).item() == 0.0  # nothing ran yet
    vqm(make_kjt())
    last = vqm.quantize.last_outputs()
    assert set(last) == {"t1", "t2"}
    torch.testing.assert_close(vq_loss(vqm), last["t1"].loss + last["t2"].loss)
    assert vq_loss(vqm).requires_grad
    stats = vq_stats(vqm)
    assert set(stats) == {"t1", "t2"}
    assert set(stats["t1"]) >= {"perplexity", "usage", "dead_codes"}
    assert 1.0 <= stats["t1"]["perplexity"] <= K and 0.0 < stats["t1"]["usage"] <= 1.0
    assert vq_loss(torch.nn.Linear(2, 2)).item() == 0.0


def dlrm_tables(dim: int = DIM) -> list[EmbeddingBagConfig]:
    """DLRM's SparseArch indexes by feature name, so no feature may serve two tables."""
    return bag_tables(dim)[:2]


def _dlrm_batches(n: int, batch: int = 32) -> list[tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        dense = torch.randn(batch, 4, generator=g)
        ids = torch.randint(0, 20, (3 * batch,), generator=g)
        kjt = KeyedJaggedTensor(keys=["f1", "f2", "f3"], values=ids, lengths=torch.ones(3 * batch, dtype=torch.long))
        label = ((ids[:batch] % 2) ^ (dense[:, 0] > 0).long()).float()  # learnable from f1 + dense
        out.append((dense, kjt, label))
    return out


@pytest.mark.parametrize("arch", ["dlrm", "dlrm_dcn"])
@pytest.mark.parametrize("output", ["quantized", "concat"])
def test_drops_into_dlrm_and_training_reduces_loss(arch: str, output: str) -> None:
    torch.manual_seed(0)
    vqm = VQEmbeddingBagCollection(dlrm_tables(), vq_cfg(codebook_size=16, output=output))
    d = vqm.embedding_bag_configs()[0].embedding_dim
    assert d == (2 * DIM if output == "concat" else DIM)
    if arch == "dlrm":
        model = DLRM(embedding_bag_collection=vqm, dense_in_features=4, dense_arch_layer_sizes=[16, d], over_arch_layer_sizes=[16, 1])
    else:
        model = DLRM_DCN(embedding_bag_collection=vqm, dense_in_features=4, dense_arch_layer_sizes=[16, d], over_arch_layer_sizes=[16, 1], dcn_num_layers=1, dcn_low_rank_dim=4)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    batches = _dlrm_batches(4)
    bce = torch.nn.BCEWithLogitsLoss()

    def eval_loss() -> float:
        with torch.no_grad():
            model.eval()
            total = sum(bce(model(x, k).squeeze(1), y).item() for x, k, y in batches)
            model.train()
        return total

    before = eval_loss()
    for _ in range(20):
        for x, kjt, y in batches:
            opt.zero_grad()
            loss = bce(model(x, kjt).squeeze(1), y) + vq_loss(model)
            loss.backward()
            opt.step()
    after = eval_loss()
    assert after < 0.9 * before, (before, after)


# --- swap in / codes ---------------------------------------------------------------------------


def test_swap_in_vq_keeps_weights_and_respects_tables() -> None:
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=dlrm_tables())
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[DIM], over_arch_layer_sizes=[4, 1])
    weights = {n: p for n, p in ebc.named_parameters()}
    x, kjt, _ = _dlrm_batches(1)[0]
    swapped = swap_in_vq(model, vq=vq_cfg(), tables=["t2"])
    assert swapped is model
    vqm = model.sparse_arch.embedding_bag_collection
    assert isinstance(vqm, VQEmbeddingBagCollection)
    assert vqm.ebc is ebc and set(vqm.vq_configs) == {"t2"}
    for name, p in vqm.ebc.named_parameters():
        assert p is weights[name]
    assert model(x, kjt).shape == (32, 1)
    with pytest.raises(ValueError, match="missing_table"):
        swap_in_vq(DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=dlrm_tables()), dense_in_features=4, dense_arch_layer_sizes=[DIM], over_arch_layer_sizes=[4, 1]), vq=vq_cfg(), tables=["missing_table"])
    alone = swap_in_vq(EmbeddingBagCollection(tables=bag_tables()), vq={"t1": vq_cfg()})
    assert isinstance(alone, VQEmbeddingBagCollection)
    ec = EmbeddingCollection(tables=seq_tables())
    assert isinstance(swap_in_vq(ec, vq=vq_cfg()), VQEmbeddingCollection)


def test_codes_and_export_codes_agree_and_change_no_state() -> None:
    _, vqm = paired({"t1": vq_cfg(), "t2": vq_cfg(num_levels=2)})
    vqm(make_kjt())  # one training forward so the codebooks are not pristine
    state = {k: v.clone() for k, v in vqm.state_dict().items()}
    ids = torch.tensor([0, 3, 7, 19])
    codes = vqm.export_codes("t1", ids)
    assert codes.dtype == torch.long and codes.shape == (4,)
    assert (codes >= 0).all() and (codes < K).all()
    rows = vqm.ebc.embedding_bags["t1"].weight[ids].detach()
    torch.testing.assert_close(codes, vqm.quantize.quantizers["t1"].encode(rows))
    kjt = KeyedJaggedTensor(keys=["f1", "f2", "f3"], values=torch.tensor([0, 3, 7, 19, 1, 2]),
                            lengths=torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0]))
    by_key = vqm.codes(kjt)
    assert set(by_key) == {"f1@t1", "f2", "f3"}
    torch.testing.assert_close(by_key["f1@t1"], codes)
    assert by_key["f2"].tolist() == [-1, -1, -1, -1]  # empty bags have no code
    assert by_key["f3"].shape == (4, 2)  # residual: one code per level
    assert (by_key["f3"][:2] >= 0).all() and (by_key["f3"][2:] == -1).all()
    assert vqm.export_codes("t2", torch.tensor([5])).shape == (1, 2)
    for k, v in vqm.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="t3"):
        vqm.export_codes("t3", ids)  # not quantized
    with pytest.raises(ValueError, match="out of range"):
        vqm.export_codes("t1", torch.tensor([20]))
    with pytest.raises(TypeError, match="int"):
        vqm.export_codes("t1", torch.tensor([1.0]))


# --- bad input --------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors() -> None:
    _, vqm = paired({"t1": vq_cfg()})
    ones = torch.ones(6, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown feature keys.*'f9'"):
        vqm(KeyedJaggedTensor(keys=["f1", "f2", "f3", "f9"], values=torch.zeros(8, dtype=torch.long), lengths=torch.ones(8, dtype=torch.long)))
    with pytest.raises(ValueError, match="'f3'.*missing"):
        vqm(KeyedJaggedTensor(keys=["f1", "f2"], values=torch.zeros(4, dtype=torch.long), lengths=torch.ones(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="'f3'.*\\[30\\].*outside \\[0, 30\\)"):
        vqm(KeyedJaggedTensor(keys=["f1", "f2", "f3"], values=torch.tensor([0, 1, 2, 3, 30, 4]), lengths=ones))
    with pytest.raises(ValueError, match="'f1'.*\\[20\\].*outside \\[0, 20\\)"):
        # f1 is served by t1 (20 rows) and t3 (25 rows): the smaller bound applies
        vqm(KeyedJaggedTensor(keys=["f1", "f2", "f3"], values=torch.tensor([20, 1, 2, 3, 4, 5]), lengths=ones))
    with pytest.raises(ValueError, match="'f2'.*-1"):
        vqm(KeyedJaggedTensor(keys=["f1", "f2", "f3"], values=torch.tensor([0, 1, -1, 3, 4, 5]), lengths=ones))
    with pytest.raises(TypeError, match="int32 or int64.*float"):
        vqm(KeyedJaggedTensor(keys=["f1", "f2", "f3"], values=torch.zeros(6), lengths=ones))
    with pytest.raises(ValueError, match="lengths sum"):
        vqm(KeyedJaggedTensor(keys=["f1", "f2", "f3"], values=torch.zeros(5, dtype=torch.long), lengths=ones))
    with pytest.raises(TypeError, match="KeyedJaggedTensor"):
        vqm(torch.zeros(3, dtype=torch.long))  # type: ignore[arg-type]


@pytest.mark.parametrize("output", ["quantized", "concat"])
def test_empty_bags_give_exact_zeros(output: str) -> None:
    plain, vqm = paired({"t1": vq_cfg(output=output), "t2": vq_cfg(output=output)})
    kjt = make_kjt(batch=6, empty_every=2)  # bags 0, 2, 4 of every feature are empty
    out = vqm(kjt)
    values = out.values()
    assert torch.isfinite(values).all()
    empty = torch.tensor([0, 2, 4])
    assert (values[empty] == 0).all()
    assert (values[torch.tensor([1, 3, 5])].abs().sum(1) > 0).all()
    assert torch.isfinite(vq_loss(vqm))


def test_empty_batch_gives_empty_output() -> None:
    _, vqm = paired({"t1": vq_cfg()})
    kjt = KeyedJaggedTensor(keys=["f1", "f2", "f3"], values=torch.zeros(0, dtype=torch.long), lengths=torch.zeros(0, dtype=torch.long))
    out = vqm(kjt)
    assert out.keys() == ["f1@t1", "f2", "f3", "f1@t3"] and out.values().shape == (0, 4 * DIM)


def test_all_bags_empty_batch() -> None:
    _, vqm = paired(vq_cfg())
    kjt = KeyedJaggedTensor(keys=["f1", "f2", "f3"], values=torch.zeros(0, dtype=torch.long), lengths=torch.zeros(12, dtype=torch.long))
    values = vqm(kjt).values()
    assert values.shape == (4, 4 * DIM) and (values == 0).all()


# --- VQEmbeddingCollection ------------------------------------------------------------------------


def seq_tables() -> list[EmbeddingConfig]:
    return [
        EmbeddingConfig(name="s1", embedding_dim=DIM, num_embeddings=20, feature_names=["f1", "f2"]),
        EmbeddingConfig(name="s2", embedding_dim=DIM, num_embeddings=30, feature_names=["f3"]),
    ]


def test_embedding_collection_quantizes_every_row() -> None:
    torch.manual_seed(0)
    plain = EmbeddingCollection(tables=seq_tables())
    vqm = VQEmbeddingCollection.from_ec(copy.deepcopy(plain), {"s1": vq_cfg()})
    kjt = make_kjt(empty_every=3)
    ref, out = plain(kjt), vqm(kjt)
    assert list(out) == list(ref) == ["f1", "f2", "f3"]
    for key in out:
        assert out[key].values().shape == ref[key].values().shape
        torch.testing.assert_close(out[key].lengths(), ref[key].lengths())
    torch.testing.assert_close(out["f3"].values(), ref["f3"].values(), rtol=0, atol=0)
    rows = torch.cat([out["f1"].values(), out["f2"].values()]).detach()
    assert torch.unique(rows, dim=0).shape[0] <= K
    codes = vqm.codes(kjt)
    assert set(codes) == {"f1", "f2"} and codes["f1"].values().shape == (kjt["f1"].values().numel(),)
    torch.testing.assert_close(vqm.export_codes("s1", kjt["f1"].values()), codes["f1"].values())
    (out["f1"].values().sum() + vq_loss(vqm)).backward()
    assert vqm.ec.embeddings["s1"].weight.grad.abs().sum() > 0


def test_embedding_collection_concat_and_validation() -> None:
    vqm = VQEmbeddingCollection(seq_tables(), vq_cfg(output="concat"))
    out = vqm(make_kjt())
    assert all(jt.values().shape[1] == 2 * DIM for jt in out.values())
    assert vqm.embedding_dim() == 2 * DIM
    with pytest.raises(ValueError, match="one embedding_dim"):
        VQEmbeddingCollection(seq_tables(), {"s1": vq_cfg(output="concat")})
    with pytest.raises(ValueError, match="'f3'.*outside"):
        vqm(KeyedJaggedTensor(keys=["f1", "f2", "f3"], values=torch.tensor([1, 2, 99]), lengths=torch.ones(3, dtype=torch.long)))
    empty = vqm(KeyedJaggedTensor(keys=["f1", "f2", "f3"], values=torch.zeros(0, dtype=torch.long), lengths=torch.zeros(0, dtype=torch.long)))
    assert list(empty) == ["f1", "f2", "f3"] and all(jt.values().shape == (0, 2 * DIM) for jt in empty.values())
