"""Kill-and-resume: real SIGKILLs of the example (single process and 2-rank torchrun), resume from
the last checkpoint, and bit-identical final metrics and weights vs an uninterrupted run; a kill
in the middle of a checkpoint write leaves the previous checkpoint loadable; ``torchrun
--max-restarts=1`` restarts a killed rank and the job completes."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_example_data import example_cmd, example_env, run_example, write_tiny_ml100k
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

pytestmark = pytest.mark.slow

FLAGS = ("--epochs", "2", "--vq", "--seed", "3", "--checkpoint-every-steps", "2",
         "--log-every-steps", "1")
# 2 ranks: every table really sharded (table-wise), so checkpoints hold per-rank shards
FLAGS2 = FLAGS + ("--sharding-type", "table_wise")
COMPARED = ("auc", "logloss", "best_epoch", "history", "train_loss_per_step", "codebook",
            "global_step")
STEP_RE = re.compile(r"^\[train\] .* global_step (\d+) ")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_ml100k(tmp_path_factory.mktemp("data") / "ml-100k")


def _final_weights(out: Path, tmp: Path) -> dict[str, torch.Tensor]:
    latest = (out / "checkpoints" / "LATEST").read_text().strip()
    dst = tmp / f"{out.name}-final.pt"
    dcp_to_torch_save(out / "checkpoints" / latest / "dcp", dst)
    state = torch.load(dst, weights_only=False)
    return {k: v for k, v in state["model"].items() if isinstance(v, torch.Tensor)}


def _assert_identical(ref: Path, got: Path, tmp: Path) -> None:
    a = json.loads((ref / "results.json").read_text())
    b = json.loads((got / "results.json").read_text())
    for key in COMPARED:
        assert a[key] == b[key], f"{key} differs after resume: {a[key]!r} vs {b[key]!r}"
    wa, wb = _final_weights(ref, tmp), _final_weights(got, tmp)
    assert wa.keys() == wb.keys() and len(wa) > 10
    assert any("quantizers" in k for k in wa), "VQ codebooks missing from the checkpoint"
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"weight {k} differs after resume"


def _start(cmd: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = example_env()
    env.update(extra_env or {})
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)


def _run_until(proc: subprocess.Popen[str], predicate, timeout: float = 180) -> list[str]:
    """Read the process's output until ``predicate(line)``; returns the lines read."""
    deadline = time.time() + timeout
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if predicate(line):
            return lines
        if time.time() > deadline:
            break
    proc.kill()
    raise AssertionError("run ended before the expected line:\n" + "".join(lines[-60:]))


def _kill_group(proc: subprocess.Popen[str]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, like a machine crash
    proc.wait(timeout=30)


def _at_step(k: int):
    def pred(line: str) -> bool:
        m = STEP_RE.match(line)
        return m is not None and int(m.group(1)) >= k
    return pred


@pytest.fixture(scope="module")
def reference_1(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref1") / "run"
    run_example(example_cmd(data, out, *FLAGS))
    return out


@pytest.fixture(scope="module")
def reference_2(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref2") / "run"
    run_example(example_cmd(data, out, *FLAGS2, nproc=2))
    return out


def test_sigkill_single_process_resumes_bit_identical(data: Path, reference_1: Path, tmp_path: Path) -> None:
    total = json.loads((reference_1 / "results.json").read_text())["global_step"]
    kill_at = random.Random(11).randint(3, total - 2)
    out = tmp_path / "run"
    proc = _start(example_cmd(data, out, *FLAGS))
    _run_until(proc, _at_step(kill_at))
    _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()
    proc = run_example(example_cmd(data, out, *FLAGS, "--resume"))
    assert "[resume] from" in proc.stdout, proc.stdout[-2000:]
    _assert_identical(reference_1, out, tmp_path)


def test_sigkill_torchrun_two_ranks_resumes_bit_identical(data: Path, reference_2: Path, tmp_path: Path) -> None:
    total = json.loads((reference_2 / "results.json").read_text())["global_step"]
    kill_at = random.Random(12).randint(3, total - 2)
    out = tmp_path / "run"
    proc = _start(example_cmd(data, out, *FLAGS2, nproc=2))
    _run_until(proc, _at_step(kill_at))
    _kill_group(proc)
    assert not (out / "results.json").exists()
    proc = run_example(example_cmd(data, out, *FLAGS2, "--resume", nproc=2))
    assert "[resume] from" in proc.stdout + proc.stderr
    _assert_identical(reference_2, out, tmp_path)


def test_sigkill_during_checkpoint_write_keeps_previous(data: Path, reference_1: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    proc = _start(example_cmd(data, out, *FLAGS),
                  extra_env={"VQ_TORCHREC_CKPT_SLOW_WRITE": "6:60"})
    _run_until(proc, lambda line: line.startswith("[checkpoint] writing"))
    partial = ckpts / ".tmp-step-000000006"
    assert partial.is_dir() and any((partial / "dcp").iterdir())  # shards are on disk
    _kill_group(proc)
    # the half-written checkpoint is not published; the previous one is complete and current
    assert (ckpts / "LATEST").read_text().strip() == "step-000000004"
    assert (ckpts / "step-000000004" / "COMPLETE").exists()
    assert not (ckpts / "step-000000006").exists()
    proc = run_example(example_cmd(data, out, *FLAGS, "--resume"))
    assert "[resume] from" in proc.stdout and "step-000000004" in proc.stdout
    assert not partial.exists()  # stale temp directory cleaned by the next save
    _assert_identical(reference_1, out, tmp_path)


def test_torchrun_max_restarts_recovers_killed_rank(data: Path, reference_2: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(example_cmd(data, out, *FLAGS2, "--resume", nproc=2, max_restarts=1))
    lines = _run_until(proc, _at_step(7))
    pids = dict(re.findall(r"\[dist\] rank (\d+)/2 pid (\d+)", "".join(lines)))
    assert "1" in pids, "".join(lines[-40:])
    os.kill(int(pids["1"]), signal.SIGKILL)  # rank 1 dies mid-epoch, once
    assert proc.stdout is not None
    rest = proc.stdout.read()
    proc.wait(timeout=240)
    assert proc.returncode == 0, rest[-4000:]
    assert "[resume] from" in rest, rest[-3000:]
    restarted = dict(re.findall(r"\[dist\] rank (\d+)/2 pid (\d+)", rest))
    assert restarted.get("1") not in (None, pids["1"]), "rank 1 was not restarted"
    _assert_identical(reference_2, out, tmp_path)
