"""GPU checks of the VQ collections (run by benchmarks/gpu_check.sh on a CUDA machine; skipped
where there is no GPU): no host syncs in the VQ leaf, and DMP over nccl with row-wise
sharding (GPU-only for EBC) and fused Adam (GPU-only)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from dist_utils import free_port
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

from vq_torchrec import VQConfig
from vq_torchrec.distributed import shard_model
from vq_torchrec.modules import VQEmbeddingBagCollection, vq_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DIM = 16


def tables() -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=1000, feature_names=[f"f{i}"])
        for i in range(4)
    ]


def batch(b: int, seed: int, device: torch.device) -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 3, (4 * b,), generator=g)
    values = torch.randint(0, 1000, (int(lengths.sum()),), generator=g)
    kjt = KeyedJaggedTensor(keys=[f"f{i}" for i in range(4)], values=values, lengths=lengths).to(device)
    dense = torch.randn(b, 8, generator=g).to(device)
    label = (values[: b].float().mean() > 500).float().expand(b).clone().to(device) if values.numel() else torch.zeros(b, device=device)
    return dense, kjt, label


def test_vq_leaf_has_no_host_sync_on_cuda() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    vqm = VQEmbeddingBagCollection(tables(), VQConfig(codebook_size=64, kmeans_init=True), device=device, validate_inputs=False)
    _, kjt, _ = batch(256, 0, device)
    vqm(kjt)  # first call: k-means init (allowed to sync)
    pooled = vqm.ebc(kjt)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = vqm.quantize(pooled, kjt)
        loss = vq_loss(vqm) + out.values().sum()
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.values()).all()
    assert out.values().shape == (256, 4 * DIM)


def test_dmp_nccl_row_wise_with_fused_adam_trains() -> None:
    device = torch.device("cuda")
    created = False
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("nccl", rank=0, world_size=1)
        created = True
    try:
        torch.manual_seed(0)
        vqm = VQEmbeddingBagCollection(tables(), VQConfig(codebook_size=32), device=torch.device("meta"))
        model = DLRM(embedding_bag_collection=vqm, dense_in_features=8, dense_arch_layer_sizes=[32, DIM],
                     over_arch_layer_sizes=[32, 1], dense_device=device)
        vqm.quantize.to(device)
        apply_optimizer_in_backward(torch.optim.Adam, vqm.ebc.parameters(), {"lr": 0.01})
        dmp = shard_model(model, "row_wise", device=device)
        assert "row_wise" in str(dmp.plan)
        opt = torch.optim.Adam([p for _, p in in_backward_optimizer_filter(dmp.named_parameters())], lr=0.01)
        data = [batch(512, s, device) for s in range(4)]
        bce = torch.nn.BCEWithLogitsLoss()
        losses = []
        for _ in range(10):
            for dense, kjt, label in data:
                opt.zero_grad()
                loss = bce(dmp(dense, kjt).squeeze(1), label) + vq_loss(dmp)
                loss.backward()
                opt.step()
                losses.append(loss.item())
        assert all(torch.isfinite(torch.tensor(losses)))
        assert sum(losses[-4:]) < sum(losses[:4])
    finally:
        if created:
            dist.destroy_process_group()


def test_grouped_path_matches_per_table_path_on_cuda() -> None:
    """The grouped fast path (taken after the k-means batch) gives the per-table path's codes,
    outputs and codebooks on CUDA too."""
    import copy

    device = torch.device("cuda")
    torch.manual_seed(0)
    fast = VQEmbeddingBagCollection(tables(), VQConfig(codebook_size=32), device=device, validate_inputs=False)
    slow = copy.deepcopy(fast)
    slow.quantize.grouped = False
    for step in range(3):
        _, kjt, _ = batch(128, step, device)
        outs = []
        for model in (fast, slow):
            torch.manual_seed(step)
            out = model(kjt)
            (out.values().sum() + vq_loss(model)).backward()
            outs.append(out.values())
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for key, value in fast.quantize.state_dict().items():
        torch.testing.assert_close(value, slow.quantize.state_dict()[key], rtol=1e-5, atol=1e-6, msg=key)
