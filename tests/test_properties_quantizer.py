"""Property-based tests (hypothesis) of VectorQuantizer / ResidualVectorQuantizer.

Random shapes (including N = 0 and extra leading dims), dtypes (fp32 / bf16 / fp16 / fp64),
huge and tiny values (1e30, 1e15, 1e-30, fp32 denormals, signed zeros), duplicated rows and
every mode (vector / outer, l2 / cosine, ema / loss, rotation trick, residual levels, k-means
or random init, restarts every step). Property: the forward and backward either give finite
values of the right shape, dtype and range and leave every buffer finite, or raise a clear
``ValueError`` that says what is wrong. Derandomized, so CI runs the same examples every time.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vq_torchrec import VQConfig
from vq_torchrec.quantization import ResidualVectorQuantizer, VectorQuantizer, build_quantizer
from vq_torchrec.quantization.validation import MAX_ABS_INPUT

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# tiny (fp32 denormals 1e-40 / 1e-45 and fp16 underflow), huge (1e15 is the largest accepted
# magnitude, 1e16 / 1e30 / 1e300 must be rejected), signed zeros and the fp16 maximum
SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 1e-40, -1e-45, 1e15, -1e15, 1e16, 1e30, -1e30, 1e300, 65504.0, -65504.0]
PROPERTY_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)




@dataclass
class Case:
    cfg: VQConfig
    lead: tuple[int, ...]
    dim: int
    dtype: torch.dtype
    values: list[float]
    training: bool

    def z(self) -> torch.Tensor:
        z64 = torch.tensor(self.values, dtype=torch.float64).reshape(*self.lead, self.dim)
        return z64.to(self.dtype)


values_strategy = st.one_of(
    st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from(SPECIAL),
)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    dim = draw(st.integers(1, 5))
    lead = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=2)))
    n = 1
    for s in lead:
        n *= s
    # rows drawn from a small pool, so duplicated rows are common
    pool = draw(st.lists(st.lists(values_strategy, min_size=dim, max_size=dim), min_size=1, max_size=4))
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=n, max_size=n))
    values = [v for i in picks for v in pool[i]]
    cfg = VQConfig(
        codebook_size=draw(st.integers(1, 6)),
        mode=draw(st.sampled_from(["vector", "outer"])),
        distance=draw(st.sampled_from(["l2", "cosine"])),
        update=draw(st.sampled_from(["ema", "loss"])),
        rotation_trick=draw(st.booleans()),
        kmeans_init=draw(st.booleans()),
        kmeans_iters=draw(st.integers(0, 3)),
        restart_every=draw(st.sampled_from([0, 1, 2])),
        dead_code_threshold=draw(st.sampled_from([0.0, 0.03, 1.0])),
        num_levels=draw(st.integers(1, 2)),
        chunk_size=draw(st.sampled_from([1, 3, 8192])),
    )
    return Case(cfg, lead, dim, draw(st.sampled_from(DTYPES)), values, draw(st.booleans()))


def expected_codes_shape(case: Case) -> tuple[int, ...]:
    shape = case.lead
    if case.cfg.num_levels > 1:
        shape = (*shape, case.cfg.num_levels)
    if case.cfg.mode == "outer":
        shape = (*shape, case.dim)
    return shape


def assert_state_finite(q: torch.nn.Module) -> None:
    bad = [n for n, t in list(q.named_buffers()) + list(q.named_parameters()) if t.is_floating_point()
           and not bool(torch.isfinite(t).all())]
    assert bad == [], bad


def check_forward(q: VectorQuantizer | ResidualVectorQuantizer, case: Case) -> torch.Tensor:
    """One forward + backward; every property of the output. Returns ``z``'s gradient."""
    z = case.z().requires_grad_()
    out = q(z)
    levels, k = case.cfg.num_levels, case.cfg.codebook_size
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    assert bool(torch.isfinite(out.quantized).all()), out.quantized
    assert out.codes.dtype == torch.long and tuple(out.codes.shape) == expected_codes_shape(case)
    if out.codes.numel():
        assert 0 <= int(out.codes.min()) and int(out.codes.max()) < k
    for stat in (out.loss, out.perplexity, out.usage):
        assert stat.dtype == torch.float32 and stat.dim() == 0 and bool(torch.isfinite(stat)), out
    assert float(out.loss.detach()) >= 0.0
    assert 1.0 - 1e-4 <= float(out.perplexity) <= k + 1e-4
    assert 0.0 <= float(out.usage) <= 1.0
    assert 0 <= int(out.dead_codes) <= k * levels
    (out.quantized.float().sum() + out.loss).backward()
    # finite for every dtype: casts back to fp16/bf16 saturate instead of overflowing
    assert z.grad is not None and z.grad.shape == z.shape and z.grad.dtype == z.dtype
    assert bool(torch.isfinite(z.grad).all()), z.grad
    for p in q.parameters():
        assert p.grad is None or bool(torch.isfinite(p.grad).all())
    assert_state_finite(q)
    return z.grad


def run_case(case: Case) -> list[torch.Tensor]:
    """Two training-mode steps (init / EMA / restarts), then one in eval; the gradients."""
    torch.manual_seed(0)
    q = build_quantizer(case.dim, case.cfg)
    q.train(case.training)
    grads = [check_forward(q, case) for _ in range(2)]
    q.eval()
    grads.append(check_forward(q, case))
    assert tuple(q.encode(case.z()).shape) == expected_codes_shape(case)
    return grads


def out_of_range(case: Case) -> str | None:
    """What validate_input must reject in ``case`` (after the cast to its dtype), or None."""
    z = case.z().double()
    if z.numel() == 0:
        return None
    if not bool(torch.isfinite(z).all()):
        return "NaN or Inf"
    if float(z.abs().max()) > MAX_ABS_INPUT:
        return "|z| >"
    return None


@PROPERTY_SETTINGS
@given(case=cases())
def test_quantizer_outputs_are_finite_and_well_shaped_or_a_clear_error(case: Case) -> None:
    problem = out_of_range(case)
    event(f"dtype={case.dtype}, outcome={problem or 'finite output'}")
    if problem is not None:
        q = build_quantizer(case.dim, case.cfg)
        q.train(case.training)
        state = {k: v.clone() for k, v in q.state_dict().items()}
        with pytest.raises(ValueError, match=problem.replace("|", r"\|")):
            q(case.z())
        for k, v in q.state_dict().items():  # a rejected batch changes nothing
            torch.testing.assert_close(v, state[k], rtol=0, atol=0)
        return
    run_case(case)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    dtype=st.sampled_from([torch.int64, torch.int32, torch.bool, torch.complex64]),
    dim=st.integers(1, 4),
)
def test_non_float_input_is_a_clear_type_error(dtype: torch.dtype, dim: int) -> None:
    q = VectorQuantizer(dim, 3)
    z = torch.ones(2, dim).to(dtype)
    expected = (TypeError, ValueError) if dtype.is_complex else TypeError
    with pytest.raises(expected, match="floating|complex|dtype"):
        q(z)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(dim=st.integers(1, 5), got=st.integers(1, 6), lead=st.lists(st.integers(0, 3), max_size=2))
def test_wrong_last_dim_names_expected_and_got(dim: int, got: int, lead: list[int]) -> None:
    if got == dim:
        got += 1
    q = VectorQuantizer(dim, 3)
    with pytest.raises(ValueError, match=rf"last dimension = dim = {dim}"):
        q(torch.zeros(*lead, got))


# --- regressions found by the properties above -----------------------------------------------


@pytest.mark.parametrize("mode", ["vector", "outer"])
@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("value", [1e20, 1e30, -1e30])
def test_huge_inputs_are_rejected_not_turned_into_inf(mode: str, distance: str, value: float) -> None:
    """|z| = 1e20 gave an Inf loss (l2) or Inf quantized rows (cosine) without any error."""
    q = VectorQuantizer(4, 3, mode=mode, distance=distance)
    z = torch.zeros(5, 4)
    z[:, 1] = value
    with pytest.raises(ValueError, match=r"5 of 20 values with \|z\| > 1e\+15"):
        q(z)
    assert not bool(q.initialized)


def test_float64_beyond_float32_range_is_rejected() -> None:
    """fp64 1e300 is finite, but becomes Inf in the fp32 compute: it used to yield NaN codes."""
    q = ResidualVectorQuantizer(3, 2, 4)
    with pytest.raises(ValueError, match=r"\|z\| > 1e\+15"):
        q(torch.tensor([[1e300, 0.0, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("kwargs", [{"distance": "cosine"}, {"rotation_trick": True}, {"mode": "outer", "distance": "cosine"}])
@pytest.mark.parametrize("value", [0.0, 1e-30])
def test_zero_rows_get_a_bounded_gradient(kwargs: dict[str, object], value: float) -> None:
    """A zero (or norm < 1e-12) row has no direction: its cosine normalisation / rotation used
    to divide by 1e-12, giving gradients of 1e10..1e12 (Inf once cast back to float16)."""
    torch.manual_seed(0)
    q = VectorQuantizer(4, 3, kmeans_init=False, **kwargs)  # type: ignore[arg-type]
    z = torch.cat([torch.full((1, 4), value), torch.randn(3, 4)]).requires_grad_()
    out = q(z)
    (out.quantized.sum() + out.loss).backward()
    assert float(z.grad[0].abs().max()) <= 2.0, z.grad
    z16 = torch.zeros(2, 4, dtype=torch.float16, requires_grad=True)
    out16 = q(z16)
    (out16.quantized.float().sum() + out16.loss).backward()
    assert bool(torch.isfinite(z16.grad).all()), z16.grad


def test_largest_accepted_magnitude_stays_finite() -> None:
    for mode in ("vector", "outer"):
        for distance in ("l2", "cosine"):
            q = VectorQuantizer(4, 3, mode=mode, distance=distance, restart_every=1)
            z = torch.full((64, 4), MAX_ABS_INPUT) * torch.randn(64, 4).sign()
            out = q(z.requires_grad_())
            out.loss.backward()
            assert bool(torch.isfinite(out.quantized).all()) and bool(torch.isfinite(out.loss))
            assert bool(torch.isfinite(z.grad).all())
