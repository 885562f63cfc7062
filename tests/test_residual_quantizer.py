"""ResidualVectorQuantizer: semantic-ID codes, decreasing residual error, estimator, config."""

from __future__ import annotations

import pytest
import torch

from vq_torchrec.quantization import ResidualVectorQuantizer, VQConfig, build_quantizer


def _train(rvq: ResidualVectorQuantizer, data: torch.Tensor, steps: int = 20) -> None:
    for step in range(steps):
        rvq(data[(step * 256) % data.shape[0]:][:256])


def test_codes_shape_and_semantic_id() -> None:
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(8, 3, codebook_size=16)
    out = rvq(torch.randn(40, 8))
    assert out.codes.shape == (40, 3) and out.codes.dtype == torch.long
    assert out.quantized.shape == (40, 8)
    assert rvq.codebook.shape == (3, 16, 8)
    assert torch.equal(rvq.eval().encode(torch.zeros(2, 8))[0], rvq.encode(torch.zeros(2, 8))[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_residual_error_decreases_with_levels(seed: int) -> None:
    torch.manual_seed(seed)
    data = torch.randn(2048, 8)
    rvq = ResidualVectorQuantizer(8, 4, codebook_size=32, restart_every=5)
    _train(rvq, data)
    rvq.eval()
    codes = rvq.encode(data)
    errors = []
    recon = torch.zeros_like(data)
    for level in range(4):
        recon = recon + rvq.levels[level].decode(codes[:, level])
        errors.append(float((data - recon).pow(2).mean()))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0], errors
    out = rvq(data)
    assert torch.allclose(out.quantized, recon, atol=1e-5)
    assert torch.allclose(rvq.decode(codes), recon, atol=1e-5)


def test_loss_is_sum_of_levels_and_ste_identity() -> None:
    torch.manual_seed(3)
    rvq = ResidualVectorQuantizer(6, 2, codebook_size=8, update="loss", kmeans_init=False, restart_every=0)
    z = torch.randn(20, 6, requires_grad=True)
    out = rvq(z)
    b0, b1 = rvq.levels[0].codebook, rvq.levels[1].codebook
    zd = z.detach()
    c0 = torch.cdist(zd, b0).argmin(1)
    r1 = zd - b0[c0]
    c1 = torch.cdist(r1, b1).argmin(1)
    ref = 1.25 * ((zd - b0[c0]) ** 2).mean() + 1.25 * ((r1 - b1[c1]) ** 2).mean()
    assert torch.equal(out.codes, torch.stack([c0, c1], 1))
    assert torch.allclose(out.loss, ref, rtol=1e-5)
    g = torch.randn(20, 6)
    (grad,) = torch.autograd.grad(out.quantized, z, g)
    assert torch.equal(grad, g)


def test_build_quantizer_residual_and_bad_levels() -> None:
    rvq = build_quantizer(8, VQConfig(num_levels=3, codebook_size=8, mode="outer"))
    assert isinstance(rvq, ResidualVectorQuantizer)
    assert rvq.num_levels == 3 and rvq.mode == "outer"
    out = rvq(torch.randn(5, 8))
    assert out.codes.shape == (5, 3, 8) and torch.isfinite(out.quantized).all()
    with pytest.raises(ValueError, match="num_levels"):
        build_quantizer(8, VQConfig(num_levels=0))
    with pytest.raises(ValueError, match="num_levels"):
        ResidualVectorQuantizer(8, 0)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        rvq(torch.randn(5, 7))


def test_residual_eval_changes_no_state_and_load_refreshes() -> None:
    torch.manual_seed(4)
    rvq = ResidualVectorQuantizer(8, 2, codebook_size=16, restart_every=2)
    _train(rvq, torch.randn(1024, 8), steps=3)
    state = {k: v.clone() for k, v in rvq.state_dict().items()}
    rvq.eval()(torch.randn(64, 8))
    for k, v in rvq.state_dict().items():
        assert torch.equal(v, state[k]), k
    other = ResidualVectorQuantizer(8, 2, codebook_size=16, restart_every=2)
    other.load_state_dict(state)
    assert all(level._initialized and level._step == 3 for level in other.levels)
