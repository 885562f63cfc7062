"""The C++ certified nearest-code search (vq_torchrec/quantization/csrc/certified_search.cpp).

Its claim is exactness: the code it returns is the best one up to fp32 rounding of the score,
like the fp32 GEMM search, however close the bf16 candidate scores are. Every check measures
the chosen code against a float64 search.
"""

from __future__ import annotations

import pytest
import torch

from vq_torchrec.quantization import native
from vq_torchrec.quantization.distances import l2_normalize, nearest_codes


def _scores64(x: torch.Tensor, book: torch.Tensor, distance: str) -> torch.Tensor:
    """(M, K) float64 scores to maximise (2 x.c - ||c||^2 for l2, x.c for cosine)."""
    x64, b64 = x.double(), book.double()
    s = x64 @ b64.t()
    return 2 * s - b64.pow(2).sum(1) if distance == "l2" else s


def _assert_optimal(x: torch.Tensor, book: torch.Tensor, codes: torch.Tensor, distance: str) -> None:
    """The chosen code's float64 score is the best one up to fp32 rounding of the scores."""
    s = _scores64(x, book, distance)
    best = s.max(dim=1).values
    chosen = s.gather(1, codes.view(-1, 1)).squeeze(1)
    # fp32 rounding of a score: ~2^-24 * (d + 2) * (2 |x| |c| + |c|^2); use 4x that
    scale = 2 * x.double().norm(dim=1) * book.double().norm(dim=1).max() + book.double().pow(2).sum(1).max()
    tol = 4 * (x.shape[1] + 2) * 2.0**-24 * scale
    gap = best - chosen
    assert (gap <= tol).all(), f"{int((gap > tol).sum())} rows not optimal, worst gap {gap.max().item():.3g} vs tol"


def _data(kind: str, n: int, k: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(n, d, generator=g), 0.5 * torch.randn(k, d, generator=g)
    if kind == "clustered":  # rows sit close to their code, as after k-means
        book = torch.randn(k, d, generator=g) + 3.0
        return book[torch.randint(0, k, (n,), generator=g)] + 0.05 * torch.randn(n, d, generator=g), book
    if kind == "shifted":  # a large common offset: the unshifted fp32 scores lose digits
        return 5 + 0.1 * torch.randn(n, d, generator=g), 5 + 0.1 * torch.randn(k, d, generator=g)
    raise ValueError(kind)


def test_kernel_builds_on_this_machine() -> None:
    # CI runs on the project's x86 machine with g++ and ninja: the fast path must be there
    assert native.available()


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("kind", ["gauss", "clustered", "shifted"])
def test_codes_are_optimal(kind: str, distance: str) -> None:
    x, book = _data(kind, 3000, 512, 64, seed=1)
    if distance == "cosine":
        x, book = l2_normalize(x), l2_normalize(book)
    codes, best, stats = native.certified_search(x, book, distance, 8192)
    _assert_optimal(x, book, codes, distance)
    # returned score = the unshifted formula at the chosen code
    ref = _scores64(x, book, distance).gather(1, codes.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(best.double(), ref, rtol=1e-4, atol=1e-3)
    assert stats[1].item() == 0  # no row needed a full re-score
    assert 3000 <= stats[0].item() <= 8 * 3000  # a few candidates per row


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_agrees_with_torch_search(distance: str) -> None:
    x, book = _data("gauss", 4000, 1024, 128, seed=2)
    if distance == "cosine":
        x, book = l2_normalize(x), l2_normalize(book)
    fast = nearest_codes(x, book, distance, 8192)
    with native.disabled():
        ref = nearest_codes(x, book, distance, 8192)
    # Gaussian data has no near-ties at fp32 resolution: the same codes
    assert torch.equal(fast, ref)


def test_near_ties_below_bf16_resolution() -> None:
    # pairs of codes whose distances differ by ~1e-5 relative: bf16 (2^-8) cannot order them,
    # the candidate bound must keep both and the fp32 re-score must pick the better one
    g = torch.Generator().manual_seed(3)
    d = 32
    base = torch.randn(200, d, generator=g)
    twin = base + 1e-5 * torch.randn(200, d, generator=g)
    book = torch.cat([base, twin])
    x = base + 1e-3 * torch.randn(200, d, generator=g)
    codes, _, stats = native.certified_search(x, book, "l2", 64)
    _assert_optimal(x, book, codes, "l2")
    assert stats[0].item() >= 2 * 200  # both twins are candidates in every row
    # a one-candidate bf16 choice would be wrong on a good share of these rows
    bf16_top1 = (x.bfloat16().float() @ (2 * book.bfloat16().float()).t() - book.pow(2).sum(1)).argmax(1)
    assert (bf16_top1 != codes).sum() > 20


def test_too_many_candidates_fall_back_to_a_full_rescore() -> None:
    # unit codes +-u (mean exactly 0) and rows at the centre: every code scores -1 up to
    # rounding, all are candidates, more than the cap of 8, so every row is re-scored in full
    g = torch.Generator().manual_seed(4)
    u = l2_normalize(torch.randn(50, 16, generator=g))
    book = torch.cat([u, -u])
    x = 1e-9 * torch.randn(50, 16, generator=g)
    codes, _, stats = torch.ops.vq_torchrec.certified_search(x, book, None, True, 16, 8)
    assert stats[1].item() == 50
    _assert_optimal(x, book, codes, "l2")


@pytest.mark.parametrize(("k", "d"), [(1, 8), (5, 3), (100, 20), (1000, 7), (64, 1), (130, 130)])
def test_shapes_without_fast_paths(k: int, d: int) -> None:
    # K not a multiple of the 64-code tile (zero-code padding), odd d (MKL GEMM instead of
    # brgemm), d not a multiple of 16 (scalar tails), several row blocks, a partial last one
    x, book = _data("gauss", 777, k, d, seed=5)
    codes, _, _ = native.certified_search(x, book, "l2", 100)
    _assert_optimal(x, book, codes, "l2")
    assert codes.min() >= 0 and codes.max() < k


def test_ties_strided_rows_and_empty_input() -> None:
    g = torch.Generator().manual_seed(6)
    book = torch.randn(8, 16, generator=g)
    book = torch.cat([book, book])  # exact duplicates: the lower index wins, as torch.max
    pooled = torch.randn(300, 3, 16, generator=g)
    x = pooled[:, 1]  # row stride 48: a slot of a (B, S, d) view
    codes, _, _ = native.certified_search(x, book, "l2", 64)
    assert codes.max() < 8
    torch.testing.assert_close(codes, native.certified_search(x.contiguous(), book, "l2", 64)[0])
    columns = torch.randn(16, 300, generator=g).t()  # last dim strided: copied
    _assert_optimal(columns, book, native.certified_search(columns, book, "l2", 64)[0], "l2")
    empty, best, _ = native.certified_search(x[:0], book, "l2", 64)
    assert empty.shape == (0,) and best.shape == (0,)


def test_non_finite_rows_and_codebooks_follow_torch_max() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 16, generator=g)
    x[3, 2] = float("nan")
    x[5, 0] = float("inf")
    x[7] = 1e20  # finite, but its squared norm overflows
    book = torch.randn(32, 16, generator=g)
    with native.disabled():
        ref = nearest_codes(x, book, "l2", 64)
    got = nearest_codes(x, book, "l2", 64)
    assert torch.equal(got, ref)
    bad_book = book.clone()
    bad_book[9, 1] = float("nan")
    with native.disabled():
        ref = nearest_codes(x, bad_book, "l2", 64)
    assert torch.equal(nearest_codes(x, bad_book, "l2", 64), ref)


def test_same_codes_for_any_thread_count_and_block() -> None:
    x, book = _data("clustered", 2000, 256, 32, seed=8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.certified_search(x, book, "l2", 8192)
        torch.set_num_threads(2)
        two = native.certified_search(x, book, "l2", 37)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_best_scores_out_parameter() -> None:
    x, book = _data("gauss", 100, 64, 16, seed=9)
    out = torch.empty(100)
    codes = nearest_codes(x, book, "l2", 64, best_scores=out)
    ref = _scores64(x, book, "l2").gather(1, codes.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


def test_bad_arguments_name_the_problem() -> None:
    x, book = _data("gauss", 10, 4, 8, seed=10)
    with pytest.raises(RuntimeError, match="widths differ"):
        torch.ops.vq_torchrec.certified_search(x, book[:, :4], None, True, 16, 8)
    with pytest.raises(RuntimeError, match="fp32"):
        torch.ops.vq_torchrec.certified_search(x.double(), book, None, True, 16, 8)
    with pytest.raises(RuntimeError, match="empty codebook"):
        torch.ops.vq_torchrec.certified_search(x, book[:0], None, True, 16, 8)


def test_rows_are_searched_in_place() -> None:
    # rows= searches x[rows] without a gathered copy: the same codes and scores as on the copy,
    # repeated rows included, from a strided (B, S, d) slot
    g = torch.Generator().manual_seed(11)
    pooled = torch.randn(500, 4, 32, generator=g)
    x = pooled[:, 2]
    book = torch.randn(100, 32, generator=g)
    rows = torch.randint(0, 500, (300,), generator=g)
    codes, best, _ = native.certified_search(x, book, "l2", 64, rows=rows)
    ref_codes, ref_best, _ = native.certified_search(x.index_select(0, rows), book, "l2", 64)
    assert torch.equal(codes, ref_codes) and torch.equal(best, ref_best)
    with native.disabled():  # the torch path gathers
        assert torch.equal(nearest_codes(x, book, "l2", 64, rows=rows), nearest_codes(x[rows], book, "l2", 64))
    assert native.certified_search(x, book, "l2", 64, rows=rows[:0])[0].shape == (0,)
    with pytest.raises(RuntimeError, match="index out of range"):
        native.certified_search(x, book, "l2", 64, rows=torch.tensor([0, 500]))
    with pytest.raises(RuntimeError, match="index out of range"):
        native.certified_search(x, book, "l2", 64, rows=torch.tensor([-1]))
    with pytest.raises(RuntimeError, match="int64"):
        native.certified_search(x, book, "l2", 64, rows=torch.tensor([0, 1], dtype=torch.int32))


def test_self_test_switches_a_broken_kernel_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert native._self_test()  # the real kernels pass

    def broken(*args: object) -> None:
        raise RuntimeError("could not create a BRGeMM ukernel")

    monkeypatch.setattr(torch.ops.vq_torchrec, "certified_search", broken)
    with pytest.warns(UserWarning, match="failed their self-test .*BRGeMM"):
        assert not native._self_test()


def test_self_test_catches_wrong_results(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.ops.vq_torchrec.certified_search

    def off_by_one(*args: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes, best, stats = real(*args)
        return (codes + 1) % args[1].shape[0], best, stats  # type: ignore[attr-defined]

    monkeypatch.setattr(torch.ops.vq_torchrec, "certified_search", off_by_one)
    with pytest.warns(UserWarning, match="results differ"):
        assert not native._self_test()
