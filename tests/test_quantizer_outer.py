"""mode="outer" against a naive reference that builds the (N, d, d) matrix (small inputs)."""

from __future__ import annotations

import pytest
import torch

from vq_torchrec.quantization import VectorQuantizer
from vq_torchrec.quantization.outer import OuterDot, OuterRows, outer_factors


def naive_outer(z: torch.Tensor, codebook: torch.Tensor, beta: float, distance: str, train_codebook: bool):
    """Seed-style formulation, fixed: signed root, explicit (N, d, d) rows, full distances."""
    n, d = z.shape
    s = torch.sign(z) * torch.sqrt(torch.abs(z))
    rows = (s.unsqueeze(2) * s.unsqueeze(1)).reshape(n * d, d)  # row (n, i) = s_i * s
    book = codebook
    if distance == "cosine":
        rows = rows / rows.norm(dim=1, keepdim=True)
        book = codebook / codebook.norm(dim=1, keepdim=True)
        codes = (rows.detach() @ book.detach().t()).argmax(dim=1)
    else:
        codes = ((rows.detach().unsqueeze(1) - book.detach().unsqueeze(0)) ** 2).sum(-1).argmin(dim=1)
    e = book[codes]
    loss = beta * ((rows - e.detach()) ** 2).mean()
    if train_codebook:
        loss = loss + ((rows.detach() - e) ** 2).mean()
    diag = e.detach().reshape(n, d, d).diagonal(dim1=1, dim2=2)  # C[code_i, i]
    if distance == "cosine":
        row_norm = (s.abs() * s.norm(dim=1, keepdim=True)).detach()
        diag = diag * row_norm
    quantized = torch.sign(z.detach()) * diag
    return codes.reshape(n, d), quantized, loss


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("update", ["loss", "ema"])
def test_outer_matches_naive_reference(distance: str, update: str) -> None:
    torch.manual_seed(0)
    beta = 0.25
    vq = VectorQuantizer(6, 16, mode="outer", distance=distance, update=update, kmeans_init=False,
                         restart_every=0, commitment_weight=beta, chunk_size=12)  # 2 items per chunk
    z = torch.randn(9, 6, dtype=torch.float64).float()
    z = z + 0.1 * torch.sign(z)  # keep |z| away from 0 (the reference's sqrt gradient is inf there)
    z.requires_grad_(True)
    book = vq.embed.detach().clone()
    z_ref = z.detach().clone().requires_grad_(True)
    book_ref = book.clone().requires_grad_(update == "loss")

    out = vq(z)
    codes, quantized, loss = naive_outer(z_ref, book_ref, beta, distance, update == "loss")
    assert torch.equal(out.codes, codes)
    assert torch.allclose(out.quantized, quantized, atol=1e-5)
    assert torch.allclose(out.loss, loss, rtol=1e-4, atol=1e-7)

    targets = [z, vq.embed] if update == "loss" else [z]
    grads = torch.autograd.grad(out.loss, targets)
    grads_ref = torch.autograd.grad(loss, [z_ref, book_ref] if update == "loss" else [z_ref])
    for g, g_ref in zip(grads, grads_ref):
        assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-6), (g - g_ref).abs().max()


def test_outer_quantized_approximates_z_after_training() -> None:
    torch.manual_seed(1)
    vq = VectorQuantizer(4, 64, mode="outer", restart_every=5)
    centres = torch.randn(8, 4) * 2
    for _ in range(30):
        z = centres[torch.randint(0, 8, (128,))] + 0.01 * torch.randn(128, 4)
        vq(z)
    out = vq.eval()(z)
    rel = (out.quantized - z).norm() / z.norm()
    assert rel < 0.1, rel
    assert torch.equal(torch.sign(out.quantized), torch.sign(z))


def test_outer_dot_gradcheck() -> None:
    torch.manual_seed(2)
    u = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    book = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    codes = torch.randint(0, 7, (5, 3))
    assert torch.autograd.gradcheck(lambda a, b: OuterDot.apply(a, b, codes, 2), (u, book))


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("update", ["loss", "ema"])
def test_outer_mixed_signs_never_nan(distance: str, update: str) -> None:
    torch.manual_seed(3)
    vq = VectorQuantizer(8, 16, mode="outer", distance=distance, update=update, restart_every=2)
    for step in range(4):
        z = torch.randn(64, 8) * torch.tensor([1e-8, 1e-3, 1.0, 30.0, -1e-8, -1.0, -30.0, 1.0])
        z[::3, 0] = 0.0  # exact zeros: sqrt'(0) is infinite, ours is clamped
        z[1] = 0.0  # an all-zero item
        z.requires_grad_(True)
        out = vq(z)
        (out.quantized.sum() + out.loss).backward()
        for name, t in [("quantized", out.quantized), ("loss", out.loss), ("grad", z.grad),
                        ("perplexity", out.perplexity), ("codebook", vq.codebook)]:
            assert torch.isfinite(t).all(), f"{name} not finite at step {step}"


def test_outer_chunking_invariance_and_sums() -> None:
    torch.manual_seed(4)
    z = torch.randn(33, 5)
    book = torch.randn(11, 5)
    a, u = outer_factors(z, "l2")
    rows = OuterRows(a, u)
    codes_big = rows.assign(book, "l2", 10_000)
    codes_small = rows.assign(book, "l2", 5)  # one item per chunk
    assert torch.equal(codes_big, codes_small)
    dense = (a.unsqueeze(2) * u.unsqueeze(1)).reshape(-1, 5)
    counts, sums = rows.sums(codes_big, 11, 7)
    ref_sums = torch.zeros(11, 5).index_add_(0, codes_big.reshape(-1), dense)
    assert torch.allclose(sums, ref_sums, atol=1e-5)
    assert torch.equal(counts, torch.bincount(codes_big.reshape(-1), minlength=11).float())
    idx = torch.tensor([0, 7, 164])
    assert torch.allclose(rows.gather(idx), dense[idx])
