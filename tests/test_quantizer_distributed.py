"""2-rank gloo (fork) tests: codebooks stay bit-identical while each rank sees different data,
and the all-reduced EMA equals a single process on the concatenated batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_multiprocess

from vq_torchrec.quantization import ResidualVectorQuantizer, VectorQuantizer

pytestmark = pytest.mark.slow

CONFIGS = [
    {"update": "ema", "mode": "vector", "distance": "l2"},
    {"update": "loss", "mode": "vector", "distance": "cosine"},
    {"update": "ema", "mode": "outer", "distance": "l2"},
    {"update": "loss", "mode": "outer", "distance": "l2", "rotation_trick": True},
]


def _rank_data(rank: int, step: int, n: int, dim: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    centres = torch.randn(6, dim, generator=torch.Generator().manual_seed(rank)) * 4 + 3 * rank
    return centres[torch.randint(0, 6, (n,), generator=gen)] + 0.1 * torch.randn(n, dim, generator=gen)


def _train_body(rank: int, world_size: int, config: dict, residual: bool) -> dict:
    torch.manual_seed(100 + rank)  # different RNG streams per rank: init must still agree
    kwargs = dict(config, restart_every=2, kmeans_iters=3)
    dim, k = 6, 16
    vq = ResidualVectorQuantizer(dim, 2, k, **kwargs) if residual else VectorQuantizer(dim, k, **kwargs)
    opt = torch.optim.SGD(vq.parameters(), lr=0.5) if kwargs["update"] == "loss" else None
    first_book = None
    dead_seen = 0
    for step in range(7):
        n = 40 + 17 * rank  # different batch sizes per rank
        z = _rank_data(rank, step, n, dim).requires_grad_(True)
        out = vq(z)
        if first_book is None:
            first_book = vq.codebook.clone()
        dead_seen = max(dead_seen, int(out.dead_codes))
        (out.loss + out.quantized.pow(2).mean()).backward()
        if opt is not None:  # what DDP does: average the codebook gradients over ranks
            for p in vq.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world_size
            opt.step()
            opt.zero_grad()
    return {
        "state": {k: v.detach().clone() for k, v in vq.state_dict().items()},
        "first_book": first_book,
        "dead_seen": dead_seen,
    }


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_codebooks_bit_identical_across_ranks(config: dict) -> None:
    r0, r1 = run_multiprocess(_train_body, world_size=2, args=(config, False))
    assert r0["state"].keys() == r1["state"].keys()
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), f"{key} differs across ranks"
    assert not torch.equal(r0["first_book"], r0["state"]["embed"].float()), "codebook never moved"
    assert int(r0["state"]["step"]) == 7


def test_residual_codebooks_bit_identical_across_ranks() -> None:
    r0, r1 = run_multiprocess(_train_body, world_size=2, args=(CONFIGS[0], True))
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), f"{key} differs across ranks"


def _ema_body(rank: int, world_size: int) -> dict:
    torch.manual_seed(7)  # same random init on both ranks (and in the single-process reference)
    vq = VectorQuantizer(5, 8, kmeans_init=False, restart_every=0)
    for step in range(5):
        vq(_rank_data(rank, step, 30 + 10 * rank, 5))
    return {k: v.clone() for k, v in vq.state_dict().items()}


def test_all_reduced_ema_equals_single_process_on_concatenated_batch() -> None:
    states = run_multiprocess(_ema_body, world_size=2)
    torch.manual_seed(7)
    ref = VectorQuantizer(5, 8, kmeans_init=False, restart_every=0)
    for step in range(5):
        ref(torch.cat([_rank_data(r, step, 30 + 10 * r, 5) for r in range(2)]))
    for key, value in ref.state_dict().items():
        assert torch.allclose(states[0][key].float(), value.float(), rtol=1e-5, atol=1e-5), key


def _restart_body(rank: int, world_size: int) -> dict:
    torch.manual_seed(rank)
    vq = VectorQuantizer(4, 8, update="loss", kmeans_init=False, restart_every=1, dead_code_threshold=1.0)
    before = vq.codebook.clone()
    z = _rank_data(rank, 0, 20, 4) + 50.0  # far from every initial code: most codes are dead
    vq(z)
    return {"before": before, "after": vq.codebook.clone(), "z0": z if rank == 0 else None}


def test_restart_uses_rank0_rows_on_every_rank() -> None:
    r0, r1 = run_multiprocess(_restart_body, world_size=2)
    assert not torch.equal(r0["before"], r1["before"])  # different seeds: different random inits
    assert torch.equal(r0["after"], r1["after"])  # rank 0's init and replacements were broadcast
    replaced = ~torch.isclose(r0["after"], r0["before"]).all(dim=1)
    assert int(replaced.sum()) >= 4
    for row in r0["after"][replaced]:  # no optimizer step: every change is a restart to a rank-0 row
        assert float((r0["z0"] - row).norm(dim=1).min()) < 1e-6
