"""A distill stage killed with SIGKILL resumes from its last checkpoint when the command is rerun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import SAMPLE_NPZ, WEIGHTS, need_shared


def command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "distill2deploy", "distill", "quickstart", "--out", str(run_dir),
            "-o", f"data.source=npz:{SAMPLE_NPZ}", "-o", f"teacher.checkpoint={WEIGHTS / 'cifar100_resnet56.pth'}",
            "-o", "data.subset.train=128", "-o", "data.subset.test=64", "-o", "distill.epochs=3",
            "-o", "distill.milestones=[2]"]


@pytest.mark.slow
def test_kill_during_distill_then_resume(tmp_path):
    need_shared()
    run_dir = tmp_path / "run"
    state = run_dir / "distill" / "checkpoints" / "last" / "trainer_state.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command(run_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 300
    while not state.exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 right after the first epoch's checkpoint landed
    proc.wait()
    first = json.loads(state.read_text())
    assert first["epoch"] in (0, 1)
    assert not (run_dir / "distill" / "stage.json").exists()

    out = subprocess.run(command(run_dir), env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"resuming after epoch {first['epoch'] + 1}/3" in out.stdout + out.stderr
    rows = [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    manifest = json.loads((run_dir / "distill" / "stage.json").read_text())
    assert manifest["summary"]["resumed_from_epoch"] == first["epoch"]
