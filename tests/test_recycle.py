"""Recycled CPU buffers (vq_torchrec/quantization/recycle.py): reused only when nobody can see them."""

from __future__ import annotations

import torch

from vq_torchrec.quantization import VectorQuantizer
from vq_torchrec.quantization.grouped import quantize_slots
from vq_torchrec.quantization.recycle import POOL, recycled

CPU = torch.device("cpu")


def test_reused_once_dropped() -> None:
    a = recycled("t_drop", (4, 3), torch.float32, CPU)
    ptr = a.data_ptr()
    del a
    b = recycled("t_drop", (2, 3), torch.float32, CPU)  # smaller fits too
    assert b.data_ptr() == ptr and b.shape == (2, 3)


def test_not_reused_while_a_view_or_the_storage_is_held() -> None:
    a = recycled("t_held", (4, 3), torch.float32, CPU)
    a.fill_(7.0)
    view = a[1:3]
    b = recycled("t_held", (4, 3), torch.float32, CPU)
    assert b.data_ptr() != view.data_ptr() - 3 * 4
    b.fill_(-1.0)
    assert torch.equal(view, torch.full((2, 3), 7.0))
    c = recycled("t_storage", (5,), torch.float32, CPU)
    c.fill_(3.0)
    storage = c.untyped_storage()
    del c
    d = recycled("t_storage", (5,), torch.float32, CPU)
    d.fill_(0.0)
    assert torch.equal(torch.tensor([], dtype=torch.float32).set_(storage), torch.full((5,), 3.0))


def test_other_sizes_and_names_get_their_own_buffers() -> None:
    a = recycled("t_a", (2,), torch.float32, CPU)
    b = recycled("t_b", (2,), torch.float32, CPU)
    assert a.data_ptr() != b.data_ptr()
    ptr = a.data_ptr()
    del a
    big = recycled("t_a", (1000,), torch.float32, CPU)  # larger than the cached one: new
    assert big.data_ptr() != ptr


def _two_tables(seed: int) -> tuple[list[VectorQuantizer], torch.Tensor]:
    """Two initialised quantizers (dim 8, K 16) and a ``(32, 2, 8)`` batch for quantize_slots."""
    torch.manual_seed(seed)
    qs = [VectorQuantizer(8, 16, kmeans_iters=2, restart_every=0) for _ in range(2)]
    z = torch.randn(32, 2, 8)
    for t, q in enumerate(qs):  # initialise through the per-table path
        q(z[:, t])
    return qs, z


def test_grouped_output_kept_by_the_caller_is_never_overwritten() -> None:
    qs, z = _two_tables(seed=0)
    outputs, grads, copies = [], [], []
    for step in range(3):
        zs = (z + step).requires_grad_()
        res = quantize_slots(qs, [0, 1], zs)
        assert res is not None
        (res.quantized.pow(2).sum() + sum(res.losses)).backward()
        outputs.append(res.quantized)  # kept: the next steps must not reuse its buffer
        grads.append(zs.grad)
        copies.append((res.quantized.detach().clone(), zs.grad.clone()))
    for out, grad, (out_copy, grad_copy) in zip(outputs, grads, copies):
        assert torch.equal(out.detach(), out_copy) and torch.equal(grad, grad_copy)


def test_grouped_output_buffer_is_reused_when_dropped() -> None:
    qs, z = _two_tables(seed=1)
    ptrs = []
    for _ in range(4):
        zs = z.clone().requires_grad_()
        res = quantize_slots(qs, [0, 1], zs)
        assert res is not None
        ptrs.append(res.quantized.data_ptr())
        res.quantized.sum().backward()
        del res
    # at most POOL buffers serve all steps (the other tests' ones may be among them)
    assert len(set(ptrs)) <= POOL and ptrs[-1] in ptrs[:-1]


def test_pool_serves_the_buffer_of_two_steps_ago() -> None:
    # the VQ leaf keeps its last output until the next forward replaces it
    first = recycled("t_pool", (6,), torch.float32, CPU)
    first_ptr = first.data_ptr()
    second = recycled("t_pool", (6,), torch.float32, CPU)  # `first` still held: a new buffer
    assert second.data_ptr() != first_ptr
    del first
    third = recycled("t_pool", (6,), torch.float32, CPU)  # `second` held, `first` free
    assert third.data_ptr() == first_ptr
