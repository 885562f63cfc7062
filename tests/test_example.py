"""The example script end to end on a tiny generated ml-100k: single process and 2-rank torchrun."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from test_example_data import example_cmd, run_example, write_tiny_ml100k


def _check_outputs(out: Path, epochs: int, world_size: int, vq: bool) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["auc"] <= 1.0 and results["logloss"] > 0
    assert results["world_size"] == world_size
    assert [h["epoch"] for h in results["history"]] == list(range(epochs))
    assert len(results["train_loss_per_step"]) == epochs * results["steps_per_epoch"]
    best = results["history"][results["best_epoch"]]
    assert results["auc"] == best["test_auc"]
    assert best["val_auc"] == max(h["val_auc"] for h in results["history"])
    if vq:
        assert set(results["codebook"]) >= {"t_user_id", "t_item_id"}
        for stats in results["codebook"].values():
            assert stats["perplexity"] >= 1.0 and 0.0 < stats["usage"] <= 1.0
    else:
        assert results["codebook"] == {}
    png = (out / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 400 and height > 200
    assert (out / "checkpoints" / "LATEST").read_text().strip().startswith("step-")
    return results


@pytest.mark.slow
def test_example_single_process_vq_learns(tmp_path: Path) -> None:
    data = write_tiny_ml100k(tmp_path / "ml-100k")
    out = tmp_path / "run"
    proc = run_example(example_cmd(data, out, "--epochs", "3", "--vq", "--seed", "1",
                                   "--sparse-lr", "0.1", "--lr", "0.01"))
    assert "[done]" in proc.stdout
    results = _check_outputs(out, epochs=3, world_size=1, vq=True)
    # the data has strong user/item biases: a trained model ranks clearly better than chance
    assert results["val_auc"] > 0.6, results["history"]
    assert results["history"][-1]["train_loss"] < results["history"][0]["train_loss"]


@pytest.mark.slow
def test_example_torchrun_two_ranks(tmp_path: Path) -> None:
    data = write_tiny_ml100k(tmp_path / "ml-100k")
    out = tmp_path / "run"
    run_example(example_cmd(data, out, "--epochs", "2", "--vq", "--arch", "dcn", nproc=2))
    results = _check_outputs(out, epochs=2, world_size=2, vq=True)
    # every rank contributes: the evaluation covers the whole split (+ wrap-around padding < 2)
    n_val, n_test = results["sizes"]["val"], results["sizes"]["test"]
    for h in results["history"]:
        assert n_val <= h["val_examples"] <= n_val + 1
        assert n_test <= h["test_examples"] <= n_test + 1


def test_example_rejects_bad_flags(tmp_path: Path) -> None:
    import subprocess
    import sys

    from test_example_data import EXAMPLE, example_env

    bad = subprocess.run(
        [sys.executable, str(EXAMPLE), "--data-root", str(tmp_path / "missing"), "--epochs", "1"],
        capture_output=True, text=True, timeout=120, env=example_env(),
    )
    assert bad.returncode == 2 and "missing" in bad.stderr and "does not exist" in bad.stderr
    bad = subprocess.run(
        [sys.executable, str(EXAMPLE), "--dense-arch", "16,x"],
        capture_output=True, text=True, timeout=60, env=example_env(),
    )
    assert bad.returncode == 2 and "--dense-arch" in bad.stderr


def test_resume_refuses_other_options(tmp_path: Path) -> None:
    from vq_torchrec.training.trainer import TrainConfig, run_training

    data = write_tiny_ml100k(tmp_path / "ml-100k")
    cfg = TrainConfig(data_root=str(data), output=str(tmp_path / "run"), epochs=1, batch_size=128,
                      embedding_dim=8, codebook_size=8, dense_arch=(8,), over_arch=(8,),
                      progress=False, download=False)
    first = run_training(cfg)
    # resuming a finished run re-evaluates nothing and reproduces the results
    cfg.resume = True
    again = run_training(cfg)
    assert again["auc"] == first["auc"] and again["history"] == first["history"]
    cfg.seed = 7  # another split and data order: must not silently continue
    with pytest.raises(ValueError, match="different options.*'seed': \\(0, 7\\)"):
        run_training(cfg)


def test_example_passes_regularisation_flags_to_the_config() -> None:
    import importlib.util

    from test_example_data import EXAMPLE

    spec = importlib.util.spec_from_file_location("dlrm_movielens_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    cfg = example.parse_args(
        ["--sparse-weight-decay", "3e-5", "--dense-weight-decay", "1e-6", "--lr-schedule", "cosine", "--lr-min-factor", "0.1"]
    )
    assert (cfg.sparse_weight_decay, cfg.dense_weight_decay) == (3e-5, 1e-6)
    assert (cfg.lr_schedule, cfg.lr_min_factor) == ("cosine", 0.1)
    cfg.validate()
    with pytest.raises(ValueError, match="sparse_weight_decay must be >= 0"):
        example.parse_args(["--sparse-weight-decay", "-1"]).validate()
