"""search_precision="bf16": bf16 candidates + exact fp32 choice must match the exact search.

These test the pure-torch algorithm (what CUDA, and a CPU without the C++ kernel, run): on CPU
the C++ certified search replaces it (tests/test_certified_search.py), so it is switched off here.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from vq_torchrec import VQConfig
from vq_torchrec.quantization import native
from vq_torchrec.quantization.distances import l2_normalize, nearest_codes
from vq_torchrec.quantization.factory import build_quantizer
from vq_torchrec.quantization.fast_search import group_layout, nearest_codes_bf16
from vq_torchrec.quantization.vector_quantizer import VectorQuantizer


@pytest.fixture(autouse=True)
def _torch_search() -> Iterator[None]:
    with native.disabled():
        yield


def _data(distance: str, n: int, k: int, d: int, seed: int, from_data: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 1.5 + 0.3
    if from_data:  # codebook near the data, as after k-means: many close calls
        book = x[torch.randperm(n, generator=g)[:k]] + 0.3 * torch.randn(k, d, generator=g)
    else:
        book = torch.randn(k, d, generator=g)
    if distance == "cosine":
        x, book = l2_normalize(x), l2_normalize(book)
    return x, book


def _sq_dist(x: torch.Tensor, book: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return (x.double() - book.double()[codes]).pow(2).sum(dim=1)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("from_data", [False, True])
def test_agrees_with_exact_search(distance: str, from_data: bool) -> None:
    n, k, d = 8192, 512, 64
    for seed in (0, 1):
        x, book = _data(distance, n, k, d, seed, from_data)
        ref = nearest_codes(x, book, distance, 8192)
        fast = nearest_codes_bf16(x, book, distance, 8192)
        assert fast.dtype == torch.long and fast.shape == (n,)
        agree = (fast == ref).double().mean().item()
        assert agree >= 0.999, f"{distance} seed {seed}: agreement {agree:.5f}"
        # a disagreement is a near tie: its exact distance is within bf16 rounding of the optimum
        worse = _sq_dist(x, book, fast) - _sq_dist(x, book, ref)
        scale = x.double().pow(2).sum(1) + book.double().pow(2).sum(1).max()
        assert (worse <= 2.0**-6 * scale).all(), f"max excess {worse.max().item():.4g}"
        assert (worse >= -1e-4 * scale).all()  # never better than the exact optimum beyond fp32 noise


def test_one_candidate_is_bf16_only_and_worse() -> None:
    """Sanity check that the test data has close calls: a single bf16 candidate disagrees more."""
    x, book = _data("l2", 8192, 512, 64, 0, True)
    ref = nearest_codes(x, book, "l2", 8192)
    agree1 = (nearest_codes_bf16(x, book, "l2", 8192, num_candidates=1) == ref).double().mean().item()
    agree3 = (nearest_codes_bf16(x, book, "l2", 8192) == ref).double().mean().item()
    assert agree1 < agree3


@pytest.mark.parametrize("k", [1, 7, 128, 300, 1000])
def test_codebook_sizes_chunks_and_padding(k: int) -> None:
    groups, per_group = group_layout(k)
    assert groups * per_group >= k and groups * per_group - k < groups  # every group holds a real code
    x, book = _data("l2", 700, k, 16, 3, False)
    ref = nearest_codes(x, book, "l2", 8192)
    big = nearest_codes_bf16(x, book, "l2", 8192)
    small = nearest_codes_bf16(x, book, "l2", 33)  # several row blocks, last one partial
    assert torch.equal(big, small)
    assert int(big.max()) < k
    assert (big == ref).double().mean().item() >= 0.995


def test_empty_ties_and_zero_rows() -> None:
    book = torch.randn(64, 8)
    book[40] = book[5]  # duplicate code: both searches must return the lower index
    x = torch.cat([book[5:6] + 1e-3, torch.zeros(1, 8)])
    assert nearest_codes_bf16(x[:0], book, "l2", 16).shape == (0,)
    assert torch.equal(nearest_codes_bf16(x, book, "l2", 16), nearest_codes(x, book, "l2", 16))
    unit = l2_normalize(book)
    assert torch.equal(nearest_codes_bf16(l2_normalize(x), unit, "cosine", 16), nearest_codes(l2_normalize(x), unit, "cosine", 16))


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizer_bf16_search_matches_fp32_twin(distance: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    kwargs = dict(distance=distance, kmeans_iters=3, restart_every=0)
    exact = VectorQuantizer(32, 256, **kwargs)
    fast = VectorQuantizer(32, 256, search_precision="bf16", **kwargs)
    fast.load_state_dict(exact.state_dict())
    z = (torch.randn(4096, 32) * 2).to(dtype)
    torch.manual_seed(1)
    out_exact = exact(z)
    torch.manual_seed(1)
    out_fast = fast(z)  # training step: same k-means init (fp32), then bf16 search
    assert out_fast.quantized.dtype == dtype and out_fast.loss.dtype == torch.float32
    assert fast.embed.dtype == torch.float32 and fast.cluster_size.dtype == torch.float32
    agree = (out_fast.codes == out_exact.codes).double().mean().item()
    assert agree >= 0.999, agree
    # the EMA update saw the (almost) same assignment, so the codebooks stay close
    assert torch.allclose(fast.embed, exact.embed, atol=0.05)
    fast.eval()
    exact.eval()
    fast.load_state_dict(exact.state_dict())
    enc = (fast.encode(z) == exact.encode(z)).double().mean().item()
    assert enc >= 0.999, enc
    assert "search_precision=bf16" in repr(fast)


def test_config_and_residual_pass_the_option() -> None:
    q = build_quantizer(16, VQConfig(codebook_size=32, search_precision="bf16"))
    assert isinstance(q, VectorQuantizer) and q.search_precision == "bf16"
    assert VQConfig().search_precision == "fp32"
    rq = build_quantizer(16, VQConfig(codebook_size=32, num_levels=2, search_precision="bf16"))
    assert all(level.search_precision == "bf16" for level in rq.levels)
    rq.eval()
    z = torch.randn(50, 16)
    assert rq.encode(z).shape == (50, 2)


def test_bad_search_precision() -> None:
    with pytest.raises(ValueError, match="search_precision"):
        VectorQuantizer(8, 16, search_precision="fp16")
    with pytest.raises(ValueError, match="search_precision"):
        build_quantizer(8, VQConfig(codebook_size=16, search_precision="int8"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode='vector'"):
        VectorQuantizer(8, 16, mode="outer", search_precision="bf16")


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_large_common_offset(distance: str) -> None:
    # rows and codes at 5 +- 0.1: the bf16 candidates come from mean-shifted vectors, so the
    # offset costs no precision (unshifted, only ~11 % of l2 rows got the best code)
    g = torch.Generator().manual_seed(12)
    x = 5 + 0.1 * torch.randn(2000, 64, generator=g)
    book = 5 + 0.1 * torch.randn(256, 64, generator=g)
    if distance == "cosine":
        x, book = l2_normalize(x), l2_normalize(book)
    out = torch.empty(2000)
    fast = nearest_codes_bf16(x, book, distance, 8192, best_scores=out)
    x64, b64 = x.double(), book.double()
    s = x64 @ b64.t()
    if distance == "l2":
        s = 2 * s - b64.pow(2).sum(1)
    best = s.argmax(1)
    assert (fast == best).double().mean().item() >= 0.999
    # the returned score is the unshifted one (2 x.c - ||c||^2 / x.c) of the chosen code
    ref = s.gather(1, fast.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-2)
