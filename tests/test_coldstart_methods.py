"""Cold-start methods on generated data: warm phases, the vq generator, end-to-end runs."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from vq_torchrec.coldstart.backbone import BackboneConfig, CTRBackbone
from vq_torchrec.coldstart.features import ColdStartFeatures
from vq_torchrec.coldstart.protocol import split_cold_start
from vq_torchrec.coldstart.runner import RunConfig, pretrain_backbone, run_method
from vq_torchrec.coldstart.synthetic import make_synthetic_movielens
from vq_torchrec.coldstart.training import TrainConfig, train_new_item_rows
from vq_torchrec.coldstart.vq_method import VQItemGenerator, VQMethod, VQMethodConfig

N, K = 40, 5




def _cfg(kind: str = "deepfm") -> RunConfig:
    cfg = RunConfig(backbone=BackboneConfig(kind=kind), train=TrainConfig(batch_size=256))
    cfg.vq.epochs = 2
    cfg.vq.codebook_size = 8
    cfg.vq.phase_decoder_epochs = 1
    return cfg


@pytest.fixture(scope="module")
def feats() -> dict[str, ColdStartFeatures]:
    d = make_synthetic_movielens(num_users=300, num_items=80, max_ratings=120, seed=3)
    split = split_cold_start(d.ratings, N, K)
    return {fs: ColdStartFeatures(split, d.users, d.items, fs, all_ratings=d.ratings)
            for fs in ("cvar", "clean")}


@pytest.fixture(scope="module")
def pretrained_by_fs(feats) -> dict[str, CTRBackbone]:
    return {fs: pretrain_backbone(f, _cfg(), seed=0) for fs, f in feats.items()}


@pytest.fixture(scope="module")
def pretrained(pretrained_by_fs) -> CTRBackbone:
    return pretrained_by_fs["clean"]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_warm_phase_changes_only_new_item_rows(feats, pretrained):
    f = feats["clean"]
    model = copy.deepcopy(pretrained)
    model.train()  # the phase must not update BatchNorm statistics either
    before = _state(model)
    rows = f.phases[0][1]
    train_new_item_rows(model, f, rows, TrainConfig(batch_size=64, lr=1e-2),
                        torch.Generator().manual_seed(0))
    after = _state(model)
    new = torch.zeros(f.table_sizes["item_id"], dtype=torch.bool)
    new[f.new_items] = True
    for key, value in before.items():
        if key.endswith("embedding_bags.item_id.weight") or key.endswith("item_id_linear.weight"):
            changed_rows = (after[key] != value).any(dim=1)
            assert changed_rows[new].any(), f"{key}: no new item row was trained"
            assert not changed_rows[~new].any(), f"{key}: a row of an old item changed"
        else:
            assert torch.equal(after[key], value), f"{key} changed in a warm phase"


def test_warm_phase_rejects_old_item_rows(feats, pretrained):
    f = feats["clean"]
    with pytest.raises(ValueError, match="not new items"):
        train_new_item_rows(copy.deepcopy(pretrained), f, f.train_base, TrainConfig(),
                            torch.Generator().manual_seed(0))


def test_vq_decoder_is_trained_on_quantized_codes(feats, pretrained):
    """The decoder's input during training must be the quantized vector (a codebook row), not the
    encoder output z; this fails if the decoder were fed z."""
    f = feats["clean"]
    cfg = _cfg()
    method = VQMethod(cfg.train, VQMethodConfig(variant="vector", codebook_size=8, epochs=1,
                                                phase_decoder_epochs=0))
    seen_inputs: list[torch.Tensor] = []
    seen_z: list[torch.Tensor] = []
    orig_init = VQItemGenerator.__init__

    def init_with_hooks(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        self.decoder[0].register_forward_pre_hook(
            lambda mod, inp: seen_inputs.append(inp[0].detach().clone()) if self.training else None)
        self.encoder.register_forward_hook(
            lambda mod, inp, out: seen_z.append(out.detach().clone()) if self.training else None)

    VQItemGenerator.__init__ = init_with_hooks
    try:
        method.fit(copy.deepcopy(pretrained), f, torch.Generator().manual_seed(0))
    finally:
        VQItemGenerator.__init__ = orig_init
    assert seen_inputs and len(seen_inputs) == len(seen_z)
    code_dim = method.vq_cfg.code_dim
    codebook = method.generator.quantizer.codebook.detach()
    # the last training step's decoder input: its code part must consist of codebook rows
    # (up to the codebook update of that same step: compare with the nearest row).
    q = seen_inputs[-1][:, :code_dim]
    z = seen_z[-1]
    dist_q = torch.cdist(q, codebook).min(dim=1).values
    assert float((q - z).abs().max()) > 1e-4, "decoder input equals z: not quantized"
    # every row of the decoder input is (close to) one codebook vector, far closer than z is
    dist_z = torch.cdist(z, codebook).min(dim=1).values
    assert float(dist_q.max()) < 0.1 * float(dist_z.mean()) + 1e-3
    # few distinct rows: at most codebook_size
    assert torch.unique(q.round(decimals=5), dim=0).shape[0] <= method.vq_cfg.codebook_size


@pytest.mark.parametrize("variant", ["vector", "outer", "residual"])
def test_vq_codes_export(feats, pretrained_by_fs, variant):
    f = feats["cvar"]
    backbone = copy.deepcopy(pretrained_by_fs["cvar"])
    method = VQMethod(_cfg().train, VQMethodConfig(variant=variant, codebook_size=8, epochs=1))
    method.fit(backbone, f, torch.Generator().manual_seed(0))
    codes = method.item_codes(f.new_items)
    assert codes.shape[0] == f.new_items.numel()
    expected_dims = {"vector": 1, "outer": 2, "residual": 2}[variant]
    assert codes.dim() == expected_dims
    assert codes.dtype == torch.long
    shared = method.shared_code_count(f)
    assert 0 <= shared <= f.new_items.numel()


@pytest.mark.parametrize(
    ("method", "fs", "variants"),
    [("base", "cvar", ()), ("base", "clean", ()), ("cvar", "cvar", ()), ("cvar", "clean", ()),
     ("vq", "cvar", ("outer",)), ("vq", "clean", ("vector", "residual"))],
)
def test_end_to_end_returns_four_finite_aucs(feats, pretrained_by_fs, method, fs, variants):
    cfg = _cfg()
    if variants:
        cfg.vq_variants = variants
    res = run_method(feats[fs], method, seed=0, cfg=cfg, pretrained=pretrained_by_fs[fs])
    assert len(res.aucs) == 4
    assert all(math.isfinite(a) and 0.0 <= a <= 1.0 for a in res.aucs)
    if method == "vq":
        assert res.info["variant"] in cfg.vq_variants
        assert set(res.info["validation"]) == set(cfg.vq_variants)
        assert all(len(v) == 3 for v in res.info["validation"].values())
        assert res.aucs == res.info["test_by_variant"][res.info["variant"]]


def test_end_to_end_dlrm(feats):
    res = run_method(feats["clean"], "base", seed=0, cfg=_cfg("dlrm"))
    assert len(res.aucs) == 4 and all(math.isfinite(a) for a in res.aucs)


def test_run_is_seeded(feats, pretrained):
    a = run_method(feats["clean"], "cvar", seed=1, cfg=_cfg(), pretrained=pretrained).aucs
    b = run_method(feats["clean"], "cvar", seed=1, cfg=_cfg(), pretrained=pretrained).aucs
    assert a == b


def test_unknown_method(feats):
    with pytest.raises(ValueError, match="unknown method"):
        run_method(feats["clean"], "magic", seed=0, cfg=_cfg())
    with pytest.raises(ValueError, match="variant"):
        VQMethodConfig(variant="scalar")
