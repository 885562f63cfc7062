"""VectorQuantizer (mode="vector") core tests: estimator, loss, stats, state, input checks."""

from __future__ import annotations

import pytest
import torch

from vq_torchrec.quantization import VectorQuantizer, VQConfig, VQOutput, build_quantizer
from vq_torchrec.quantization import vector_quantizer as vq_module


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"state {key!r} differs"


def _plain(dim: int = 8, k: int = 16, **kw) -> VectorQuantizer:
    """No k-means init, no restarts (EMA updates still run in training mode)."""
    kw.setdefault("kmeans_init", False)
    kw.setdefault("restart_every", 0)
    return VectorQuantizer(dim, k, **kw)


# ---------------------------------------------------------------- estimators
@pytest.mark.parametrize("mode", ["vector", "outer"])
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_straight_through_gradient_is_identity(mode: str, distance: str) -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(6, 8, mode=mode, distance=distance, update="loss")
    z = torch.randn(20, 6, requires_grad=True)
    out = vq(z)
    g = torch.randn(20, 6)
    (grad,) = torch.autograd.grad(out.quantized, z, g)
    assert torch.equal(grad, g)


def test_quantized_value_is_the_code_vector() -> None:
    torch.manual_seed(1)
    vq = _plain()
    z = torch.randn(30, 8)
    book = vq.codebook.clone()
    out = vq(z)  # training: the EMA moves the codebook after quantizing
    ref_codes = torch.cdist(z, book).argmin(dim=1)
    assert torch.equal(out.codes, ref_codes)
    assert torch.equal(out.quantized, book[ref_codes])
    assert not torch.equal(vq.codebook, book)
    vq.eval()
    ref_codes = torch.cdist(z, vq.codebook).argmin(dim=1)
    assert torch.equal(vq.encode(z), ref_codes)
    assert torch.equal(vq(z).quantized, vq.codebook[ref_codes])
    assert torch.equal(vq.decode(ref_codes), vq.codebook[ref_codes])


def test_rotation_trick_value_and_gradient() -> None:
    torch.manual_seed(2)
    vq = _plain(4, 8, rotation_trick=True, update="loss")
    z = torch.randn(5, 4, dtype=torch.float32, requires_grad=True)
    out = vq(z)
    q = vq.codebook[out.codes]
    assert torch.equal(out.quantized, q)
    g = torch.randn(5, 4)
    (grad,) = torch.autograd.grad(out.quantized, z, g)
    for n in range(5):  # explicit matrices: grad = (||q||/||z||) R^T g
        zn, qn = z[n].detach().double(), q[n].double()
        zh, qh = zn / zn.norm(), qn / qn.norm()
        w = (zh + qh) / (zh + qh).norm()
        rot = torch.eye(4, dtype=torch.float64) - 2 * torch.outer(w, w) + 2 * torch.outer(qh, zh)
        assert torch.allclose(rot @ zh, qh, atol=1e-6)
        expected = (qn.norm() / zn.norm()) * rot.t() @ g[n].double()
        assert torch.allclose(grad[n].double(), expected, atol=1e-5)
    assert not torch.allclose(grad, g)  # it is not the straight-through estimator


# ---------------------------------------------------------------- loss
def test_loss_gradients_match_formula_loss_update() -> None:
    torch.manual_seed(3)
    beta = 0.3
    vq = _plain(update="loss", commitment_weight=beta)
    z = torch.randn(40, 8, requires_grad=True)
    out = vq(z)
    gz, gc = torch.autograd.grad(out.loss, [z, vq.embed])

    z_ref = z.detach().clone().requires_grad_(True)
    c_ref = vq.embed.detach().clone().requires_grad_(True)
    codes = torch.cdist(z_ref, c_ref).argmin(dim=1)
    e = c_ref[codes]
    ref = ((z_ref.detach() - e) ** 2).mean() + beta * ((z_ref - e.detach()) ** 2).mean()
    gz_ref, gc_ref = torch.autograd.grad(ref, [z_ref, c_ref])
    assert torch.allclose(out.loss, ref, rtol=1e-6)
    assert torch.allclose(gz, gz_ref, atol=1e-7)
    assert torch.allclose(gc, gc_ref, atol=1e-7)
    # beta sits on the commitment term: dL/dz = 2 beta (z - e) / numel
    assert torch.allclose(gz, 2 * beta * (z.detach() - e.detach()) / z.numel(), atol=1e-7)


def test_loss_ema_update_is_commitment_only() -> None:
    torch.manual_seed(4)
    beta = 0.25
    vq = _plain(update="ema", commitment_weight=beta)
    z = torch.randn(40, 8, requires_grad=True)
    e = vq.codebook[torch.cdist(z.detach(), vq.codebook).argmin(dim=1)]
    out = vq(z)
    (gz,) = torch.autograd.grad(out.loss, z)
    assert torch.allclose(out.loss, beta * ((z.detach() - e) ** 2).mean(), rtol=1e-6)
    assert torch.allclose(gz, 2 * beta * (z.detach() - e) / z.numel(), atol=1e-7)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0


def test_cosine_codes_and_loss() -> None:
    torch.manual_seed(5)
    vq = _plain(distance="cosine", update="loss", commitment_weight=0.5)
    z = torch.randn(30, 8) * 3
    out = vq(z)
    zh = z / z.norm(dim=1, keepdim=True)
    ch = vq.embed.detach() / vq.embed.detach().norm(dim=1, keepdim=True)
    codes = (zh @ ch.t()).argmax(dim=1)
    assert torch.equal(out.codes, codes)
    assert torch.allclose(out.quantized, ch[codes] * z.norm(dim=1, keepdim=True), atol=1e-5)
    ref = 1.5 * ((zh - ch[codes]) ** 2).mean()
    assert torch.allclose(out.loss, ref, rtol=1e-5)


# ---------------------------------------------------------------- stats
def test_stats_from_histogram() -> None:
    vq = _plain(2, 4)
    with torch.no_grad():
        vq.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    z = torch.tensor([[0.1, 0.0], [0.0, 0.1], [9.9, 0.2], [10.0, 0.1]])
    out = vq.eval()(z)
    assert out.codes.tolist() == [0, 0, 1, 1]
    assert torch.allclose(out.perplexity, torch.tensor(2.0))
    assert torch.allclose(out.usage, torch.tensor(0.5))
    assert out.dead_codes.dtype == torch.long


# ---------------------------------------------------------------- codebook health
def _mixture(k: int, dim: int, gen: torch.Generator, offset: float) -> torch.Tensor:
    return torch.randn(k, dim, generator=gen) * 3.0 + offset


def _batch(centres: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, centres.shape[0], (n,), generator=gen)
    return centres[labels] + 0.05 * torch.randn(n, centres.shape[1], generator=gen)


def _train_usage(seed: int, *, kmeans_init: bool, restart_every: int, offset: float, steps: int = 150) -> float:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    k, dim = 32, 8
    centres = _mixture(k, dim, gen, offset)
    vq = VectorQuantizer(dim, k, kmeans_init=kmeans_init, restart_every=restart_every, decay=0.9)
    for _ in range(steps):
        vq(_batch(centres, 256, gen))
    vq.eval()
    return float(vq(_batch(centres, 4096, gen)).usage)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_ema_restart_uses_codes(seed: int) -> None:
    assert _train_usage(seed, kmeans_init=True, restart_every=10, offset=0.0) >= 0.9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bad_init_collapses_without_restart_and_recovers_with_it(seed: int) -> None:
    collapsed = _train_usage(seed, kmeans_init=False, restart_every=0, offset=20.0)
    recovered = _train_usage(seed, kmeans_init=False, restart_every=10, offset=20.0)
    assert collapsed <= 0.25, collapsed
    assert recovered >= 0.9, recovered


def test_dead_codes_are_counted_and_thresholds_scale_free() -> None:
    vq = _plain(2, 4, dead_code_threshold=0.5)
    with torch.no_grad():
        vq.usage_ema.copy_(torch.tensor([100.0, 100.0, 10.0, 0.0]))  # shares .476 .476 .048 0
    assert int(vq.dead_code_count()) == 2  # under 0.5 / 4 = 0.125
    with torch.no_grad():
        vq.usage_ema.mul_(1000.0)  # same shares, bigger batches / more ranks
    assert int(vq.dead_code_count()) == 2


# ---------------------------------------------------------------- dtypes, determinism, state
def test_bf16_input() -> None:
    torch.manual_seed(6)
    vq = VectorQuantizer(8, 16, update="loss")
    z = torch.randn(64, 8).to(torch.bfloat16).requires_grad_(True)
    out = vq(z)
    assert out.quantized.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32 and out.perplexity.dtype == torch.float32
    assert vq.embed.dtype == torch.float32 and vq.usage_ema.dtype == torch.float32
    assert torch.equal(out.codes, vq.eval().encode(z.detach().float()))
    (out.quantized.float().sum() + out.loss).backward()
    assert z.grad is not None and z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad).all()


def test_autocast_keeps_statistics_fp32() -> None:
    torch.manual_seed(7)
    vq = _plain(update="loss")
    z = torch.randn(64, 8)
    ref = vq(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
    assert torch.equal(out.codes, ref.codes)
    assert out.loss.dtype == torch.float32 and torch.equal(out.loss, ref.loss)


@pytest.mark.parametrize("update", ["ema", "loss"])
def test_deterministic_under_fixed_seed(update: str) -> None:
    def run() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        torch.manual_seed(123)
        vq = VectorQuantizer(8, 16, update=update, restart_every=3)
        opt = torch.optim.SGD(vq.parameters(), lr=0.1) if update == "loss" else None
        for _ in range(7):
            out = vq(torch.randn(50, 8))
            if opt is not None:
                opt.zero_grad()
                out.loss.backward()
                opt.step()
        return _snapshot(vq), out.codes

    (s1, c1), (s2, c2) = run(), run()
    _assert_same_state(s1, s2)
    assert torch.equal(c1, c2)


def test_chunking_does_not_change_results() -> None:
    torch.manual_seed(8)
    z = torch.randn(101, 8)
    a = _plain(chunk_size=8192)
    b = _plain(chunk_size=7)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(z).codes, b(z).codes)


@pytest.mark.parametrize("update", ["ema", "loss"])
def test_eval_mode_changes_no_state(update: str) -> None:
    torch.manual_seed(9)
    vq = VectorQuantizer(8, 16, update=update, restart_every=1).eval()
    before = _snapshot(vq)
    out = vq(torch.randn(50, 8))  # not initialised yet: eval must not run k-means either
    vq.encode(torch.randn(50, 8))
    _assert_same_state(before, _snapshot(vq))
    assert not vq._initialized and out.codes.shape == (50,)
    vq.train()
    vq(torch.randn(50, 8))
    assert vq._initialized and int(vq.step) == 1
    trained = _snapshot(vq)
    vq.eval()(torch.randn(50, 8))
    _assert_same_state(trained, _snapshot(vq))


def test_state_dict_round_trip_resumes_identically() -> None:
    torch.manual_seed(10)
    data = [torch.randn(60, 8) for _ in range(8)]
    a = VectorQuantizer(8, 16, restart_every=3)
    for z in data[:4]:
        a(z)
    b = VectorQuantizer(8, 16, restart_every=3)
    b.load_state_dict(a.state_dict())
    assert b._initialized and b._step == 4
    torch.manual_seed(11)
    outs_a = [a(z).codes for z in data[4:]]
    torch.manual_seed(11)
    outs_b = [b(z).codes for z in data[4:]]
    for x, y in zip(outs_a, outs_b):
        assert torch.equal(x, y)
    _assert_same_state(_snapshot(a), _snapshot(b))


def test_empty_batch() -> None:
    vq = VectorQuantizer(8, 16)
    out = vq(torch.zeros(0, 8, requires_grad=True))
    assert out.quantized.shape == (0, 8) and out.codes.shape == (0,)
    assert float(out.loss.detach()) == 0.0 and float(out.perplexity) == 1.0 and float(out.usage) == 0.0
    assert not vq._initialized  # k-means waits for a batch with rows
    vq(torch.randn(40, 8))
    assert vq._initialized


def test_leading_dims_are_kept() -> None:
    vq = _plain()
    out = vq(torch.randn(3, 5, 8))
    assert out.quantized.shape == (3, 5, 8) and out.codes.shape == (3, 5)


def test_no_host_sync_in_training_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Init, EMA, restarts and stats must not read device values (.item, bool, int, ...)."""
    torch.manual_seed(12)
    monkeypatch.setattr(vq_module, "validate_input", lambda z, dim, who="": None)  # CPU-only checks

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in forward")

    for mode in ("vector", "outer"):
        for update in ("ema", "loss"):
            vq = VectorQuantizer(8, 16, mode=mode, update=update, restart_every=2)
            zs = [torch.randn(40, 8) for _ in range(4)]
            with monkeypatch.context() as m:
                for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
                    m.setattr(torch.Tensor, name, forbidden)
                for z in zs:
                    out = vq(z)
                    out.loss.backward() if update == "loss" else None


# ---------------------------------------------------------------- bad input / config
def test_wrong_dim_names_expected_and_got() -> None:
    vq = _plain(64)
    with pytest.raises(ValueError, match=r"\(N, 64\).*got shape \(10, 32\)"):
        vq(torch.randn(10, 32))


def test_non_float_input() -> None:
    vq = _plain()
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        vq(torch.ones(4, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        vq([[0.0] * 8])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_input(bad: float) -> None:
    vq = _plain()
    z = torch.randn(4, 8)
    z[2, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        vq(z)
    with pytest.raises(ValueError, match="NaN or Inf"):
        vq.encode(z)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"mode": "pairwise"}, ValueError, "mode"),
        ({"distance": "l1"}, ValueError, "distance"),
        ({"update": "sgd"}, ValueError, "update"),
        ({"decay": 1.5}, ValueError, "decay"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"restart_every": 2.5}, TypeError, "restart_every"),
    ],
)
def test_bad_config_names_argument(kwargs: dict, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        VectorQuantizer(8, 16, **kwargs)
    with pytest.raises(TypeError, match="dim"):
        VectorQuantizer(8.0, 16)  # type: ignore[arg-type]


def test_build_quantizer_from_config() -> None:
    cfg = VQConfig(codebook_size=32, mode="outer", distance="cosine", update="loss", restart_every=5)
    vq = build_quantizer(8, cfg)
    assert isinstance(vq, VectorQuantizer)
    assert (vq.codebook_size, vq.mode, vq.distance, vq.update, vq.restart_every) == (32, "outer", "cosine", "loss", 5)
    out = vq(torch.randn(10, 8))
    assert isinstance(out, VQOutput) and out.codes.shape == (10, 8)
    with pytest.raises(TypeError, match="VQConfig"):
        build_quantizer(8, {"codebook_size": 4})  # type: ignore[arg-type]


def test_deepcopy_reset_parameters_and_meta_init() -> None:
    import copy

    torch.manual_seed(13)
    vq = VectorQuantizer(8, 16, restart_every=2)
    vq(torch.randn(40, 8))
    twin = copy.deepcopy(vq)
    _assert_same_state(_snapshot(vq), _snapshot(twin))
    assert twin._initialized and twin._step == 1 and twin.process_group is None
    twin.reset_parameters()
    assert not twin._initialized and twin._step == 0 and int(twin.step) == 0
    assert float(twin.usage_ema.sum()) == 0.0 and not bool(twin.initialized)
    with torch.device("meta"):
        lazy = VectorQuantizer(8, 16)
    lazy = lazy.to_empty(device="cpu")
    lazy.reset_parameters()
    out = lazy(torch.randn(40, 8))
    assert lazy._initialized and torch.isfinite(out.quantized).all() and torch.isfinite(lazy.codebook).all()


@pytest.mark.parametrize("n", [1, 3, 100])
@pytest.mark.parametrize("k", [1, 5, 64])
@pytest.mark.parametrize("mode", ["vector", "outer"])
def test_odd_shapes_stay_finite(n: int, k: int, mode: str) -> None:
    torch.manual_seed(n * 100 + k)
    vq = VectorQuantizer(3, k, mode=mode, restart_every=1, chunk_size=2)
    for scale in (1e-6, 1.0, 1e4):
        z = (torch.randn(n, 3) * scale).requires_grad_(True)
        out = vq(z)
        (out.quantized.sum() + out.loss).backward()
        assert out.codes.shape == ((n,) if mode == "vector" else (n, 3))
        assert int(out.codes.min()) >= 0 and int(out.codes.max()) < k
        for t in (out.quantized, out.loss, z.grad, vq.codebook):
            assert torch.isfinite(t).all()


@pytest.mark.parametrize("mode", ["vector", "outer"])
@pytest.mark.parametrize("rotation", [False, True])
def test_fp16_outputs_saturate_and_gradients_round_once(mode: str, rotation: bool) -> None:
    """fp16 at its largest finite values with codes beyond the fp16 range: ``quantized`` is
    cast back saturating (finite), and ``z``'s gradient is the fp32 gradient rounded to fp16
    once (Inf only where that overflows, which a GradScaler is there to catch)."""

    def run(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        torch.manual_seed(14)
        vq = VectorQuantizer(2, 3, mode=mode, update="loss", rotation_trick=rotation, kmeans_init=False, restart_every=0)
        with torch.no_grad():
            vq.embed.copy_(torch.tensor([[3e5, -3e5], [-3e5, 3e5], [2e5, 2e5]]))
        z = torch.tensor([[65504.0, -17328.0], [-65504.0, 65504.0], [1.0, -2.0]], dtype=dtype, requires_grad=True)
        out = vq(z)
        (out.quantized.float().sum() + out.loss).backward()
        return out.quantized, z.grad, out.loss

    q16, g16, loss16 = run(torch.float16)
    q32, g32, loss32 = run(torch.float32)
    assert q16.dtype == torch.float16 and torch.isfinite(q16).all()
    assert bool((q32.abs() > 65504).any())  # the case really overflows fp16
    assert torch.equal(q16, q32.clamp(-65504, 65504).half())
    assert g16.dtype == torch.float16 and torch.equal(g16, g32.half())
    assert torch.isfinite(loss16) and torch.equal(loss16, loss32)


def test_rotation_trick_zero_row_falls_back_to_identity_gradient() -> None:
    torch.manual_seed(15)
    vq = _plain(4, 8, rotation_trick=True, update="loss")
    z = torch.cat([torch.zeros(1, 4), torch.randn(3, 4)]).requires_grad_(True)
    out = vq(z)
    g = torch.randn(4, 4)
    (grad,) = torch.autograd.grad(out.quantized, z, g)
    assert torch.equal(grad[0], g[0])  # no direction to rotate: straight-through, not 1/||z||
    assert not torch.allclose(grad[1:], g[1:])
