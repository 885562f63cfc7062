"""MovieLensBatches: shapes, key order, determinism, rank slicing, resume offset."""

from __future__ import annotations

import pytest
import torch
from movielens_fixtures import make_ratings, write_ml1m
from torchrec.datasets.utils import Batch

from vq_torchrec.datasets import FeatureEncoder, MovieLensBatches, binarize, load_movielens


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ml1m")
    write_ml1m(root, make_ratings(n_users=6, n_items=8, per_user=8, seed=5)[:43])  # 43 rows: odd
    data = load_movielens("ml-1m", root=root)
    labelled = binarize(data.ratings)
    encoder = FeatureEncoder().fit(labelled, data.users, data.items)
    return encoder.transform(labelled)


def _same(a: Batch, b: Batch) -> bool:
    return (
        torch.equal(a.dense_features, b.dense_features)
        and torch.equal(a.labels, b.labels)
        and a.sparse_features.keys() == b.sparse_features.keys()
        and torch.equal(a.sparse_features.values(), b.sparse_features.values())
        and torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())
    )


def test_shapes_and_keys(encoded) -> None:
    batches = list(MovieLensBatches(encoded, batch_size=8, shuffle=False))
    assert [b.labels.shape[0] for b in batches] == [8, 8, 8, 8, 8, 3]
    first = batches[0]
    assert isinstance(first, Batch)
    assert first.dense_features.shape == (8, 2) and first.dense_features.dtype == torch.float32
    assert first.labels.dtype == torch.float32
    assert first.sparse_features.keys() == encoded.keys and first.sparse_features.stride() == 8
    # unshuffled: batch 0 holds rows 0..7
    dense, sparse, labels = encoded.rows(torch.arange(8))
    assert _same(first, Batch(dense, sparse, labels))
    lengths = first.sparse_features.length_per_key()
    assert lengths[0] == 8  # user_id: one value per row


def test_deterministic_per_seed_and_epoch(encoded) -> None:
    a = MovieLensBatches(encoded, batch_size=8, shuffle=True, seed=3)
    b = MovieLensBatches(encoded, batch_size=8, shuffle=True, seed=3)
    assert all(_same(x, y) for x, y in zip(a, b))
    epoch0 = a.rank_rows()
    a.set_epoch(1)
    assert not torch.equal(a.rank_rows(), epoch0)
    a.set_epoch(0)
    assert torch.equal(a.rank_rows(), epoch0)
    assert sorted(epoch0.tolist()) == list(range(len(encoded)))
    c = MovieLensBatches(encoded, batch_size=8, shuffle=True, seed=4)
    assert not torch.equal(c.rank_rows(), epoch0)


@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_slices_disjoint_and_equal(encoded, drop_last: bool) -> None:
    world = 3
    loaders = [
        MovieLensBatches(
            encoded, 4, shuffle=True, seed=1, drop_last=drop_last, rank=r, world_size=world
        )
        for r in range(world)
    ]
    rows = [loader.rank_rows().tolist() for loader in loaders]
    counts = [len(list(loader)) for loader in loaders]
    assert len(set(counts)) == 1 and counts[0] == len(loaders[0])
    sizes = [[b.labels.shape[0] for b in loader] for loader in loaders]
    assert sizes[0] == sizes[1] == sizes[2]
    n = len(encoded)  # 43
    if drop_last:
        assert all(len(r) == n // world for r in rows)  # 14 each
        assert counts[0] == (n // world) // 4
        flat = sum(rows, [])
        assert len(set(flat)) == len(flat)  # disjoint
    else:
        assert all(len(r) == -(-n // world) for r in rows)  # 15 each, 2 padded rows
        flat = sum(rows, [])
        assert set(flat) == set(range(n)) and len(flat) - len(set(flat)) == 2
        assert counts[0] == 4  # 15 rows -> 4, 4, 4, 3
    # padding masks mark exactly the duplicated rows
    kept = []
    for loader, rank_rows in zip(loaders, rows):
        mask = torch.cat([loader.padding_mask(b) for b in range(len(loader))])
        assert mask.shape[0] == min(len(rank_rows), len(loader) * 4)
        kept += [r for r, padded in zip(rank_rows, mask.tolist()) if not padded]
    assert len(kept) == len(set(kept)) == (len(loaders[0]) * 4 * world if drop_last else n)


def test_resume_at_exact_batch(encoded) -> None:
    full = MovieLensBatches(encoded, batch_size=5, shuffle=True, seed=9)
    full.set_epoch(2)
    reference = list(full)
    resumed = MovieLensBatches(encoded, batch_size=5, shuffle=True, seed=9)
    resumed.set_epoch(2)
    resumed.skip_batches(4)
    rest = list(resumed)
    assert len(rest) == len(reference) - 4
    assert all(_same(x, y) for x, y in zip(rest, reference[4:]))
    assert len(list(resumed)) == len(reference)  # the skip applies to one iteration only
    with pytest.raises(ValueError, match="cannot skip"):
        resumed.skip_batches(len(reference) + 1)


def test_bad_arguments(encoded) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        MovieLensBatches(encoded, 0)
    with pytest.raises(ValueError, match="rank"):
        MovieLensBatches(encoded, 4, rank=2, world_size=2)


def test_batches_feed_a_torchrec_dlrm(encoded) -> None:
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    sizes = {key: int(encoded.single[key].max()) + 1 for key in encoded.single}
    sizes.update({key: int(col.values.max()) + 1 for key, col in encoded.multi.items()})
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(
            name=f"t_{key}", embedding_dim=8, num_embeddings=sizes[key], feature_names=[key]
        )
        for key in encoded.keys
    ]
    model = DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables=tables),
        dense_in_features=encoded.dense.shape[1],
        dense_arch_layer_sizes=[16, 8],
        over_arch_layer_sizes=[16, 1],
    )
    batch = next(iter(MovieLensBatches(encoded, batch_size=16, shuffle=True, seed=0)))
    logits = model(batch.dense_features, batch.sparse_features)
    assert logits.shape == (16, 1) and torch.isfinite(logits).all()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.squeeze(1), batch.labels)
    loss.backward()
