"""Exact resume: a distill stage killed with SIGKILL mid-epoch, rerun with the same command, ends with
bitwise the weights of an uninterrupted run.

The run checkpoints after every optimizer step (``distill.checkpoint_every_steps=1``); the test
kills the process group as soon as a checkpoint *inside* an epoch has landed, so the resume has to
restore the data position (epoch, step), the optimizer, the scheduler, the RNG streams (the student
has dropout, drawn from the global RNG inside the step) and the per-sample augmentation. The kill
may also hit the next checkpoint while it is being written: the last complete one must be used.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill2deploy.training.checkpoint import recover_checkpoint

from .conftest import SAMPLE_NPZ, WEIGHTS, kill_at_checkpoint, need_shared


def command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "distill2deploy", "distill", "quickstart", "--out", str(run_dir),
            "-o", f"data.source=npz:{SAMPLE_NPZ}", "-o", "teacher.model=resnet20_cifar",
            "-o", f"teacher.checkpoint={WEIGHTS / 'cifar100_resnet20.pth'}",
            "-o", "data.subset.train=96", "-o", "data.subset.test=32", "-o", "distill.epochs=2",
            "-o", "distill.milestones=[1]", "-o", "distill.batch_size=32", "-o", "distill.checkpoint_every_steps=1",
            "-o", "student.model_kwargs={drop_rate: 0.2}"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_kill_mid_epoch_then_resume_gives_the_uninterrupted_weights(tmp_path):
    need_shared()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    reference = tmp_path / "uninterrupted"
    out = subprocess.run(command(reference), env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command(run_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    # The stage trains in its work directory; it becomes run/distill only when it has finished.
    state = kill_at_checkpoint(proc, run_dir, ".work/distill-*/checkpoints/last/trainer_state.json",
                               lambda s: s["next_step"] > 0)  # a checkpoint inside an epoch
    recover_checkpoint(state.parent)  # what the rerun does first, if the kill fell between two renames
    killed_at = json.loads(state.read_text())
    assert not (run_dir / "distill" / "stage.json").exists() and not (run_dir / "distill" / "student.pt").exists()

    out = subprocess.run(command(run_dir), env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    log = (out.stdout + out.stderr).replace("\r", "\n")
    assert f"ended without releasing {run_dir / '.lock'}" in log  # the killed run's lock, taken over
    assert not (run_dir / ".lock").exists() and not (run_dir / ".work").exists()
    if killed_at["next_step"] > 0:
        assert f"resuming in epoch {killed_at['next_epoch'] + 1}/2 at step {killed_at['next_step']}/3" in log, log
    summary = json.loads((run_dir / "distill" / "stage.json").read_text())["summary"]
    assert summary["resumed_from_epoch"] == pytest.approx(killed_at["next_epoch"] + killed_at["next_step"] / 3)

    expected = torch.load(reference / "distill" / "student.pt")
    got = torch.load(run_dir / "distill" / "student.pt")
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    # The metrics too (the interrupted epoch's running sums are part of the checkpoint).
    assert [r["epoch"] for r in rows(run_dir)] == [1, 2]
    for a, b in zip(rows(reference), rows(run_dir)):
        for k in a:
            if k.startswith(("train_", "test_")):
                assert b[k] == pytest.approx(a[k], rel=1e-6), k
