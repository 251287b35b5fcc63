"""Shared fixtures: paths to the read-only real data beside the repo, tiny configs."""
from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLE_NPZ = SHARED / "data" / "cifar100_sample.npz"
WEIGHTS = SHARED / "weights"
CIFAR10_JPEG = SHARED / "data" / "cifar10_jpeg.tar.gz"

# Tests never download: the hub and dataset sites are unreachable in CI.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def need_shared() -> None:
    if not SAMPLE_NPZ.is_file():
        pytest.skip(f"the shared sample data is not at {SAMPLE_NPZ}")


@pytest.fixture
def sample_npz() -> Path:
    need_shared()
    return SAMPLE_NPZ


@pytest.fixture
def resnet56_weights() -> Path:
    p = WEIGHTS / "cifar100_resnet56.pth"
    if not p.is_file():
        pytest.skip(f"shared weights not at {p}")
    return p


@pytest.fixture(scope="session")
def resnet56_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pretrained ResNet-56 exported once per test session, as a user would (slow: ~25 s)."""
    import subprocess
    import sys

    weights = WEIGHTS / "cifar100_resnet56.pth"
    if not (weights.is_file() and SAMPLE_NPZ.is_file()):
        pytest.skip("the shared sample data and ResNet-56 weights are needed")
    out = tmp_path_factory.mktemp("onnx") / "r56.onnx"
    subprocess.run([sys.executable, "-m", "distill2deploy", "export", "--model", "resnet56_cifar", "--checkpoint",
                    str(weights), "--data", f"npz:{SAMPLE_NPZ}", "--out", str(out)], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


def kill_at_checkpoint(proc: subprocess.Popen, run_dir: Path, pattern: str, ready: Callable[[dict], bool],
                       timeout: float = 300) -> Path:
    """SIGKILL ``proc``'s process group as soon as a trainer state file under ``run_dir`` matching
    ``pattern`` satisfies ``ready``; returns that file. Fails if the run ends or ``timeout`` passes first."""
    import json
    import signal
    import time

    deadline = time.time() + timeout
    while True:
        try:
            state = next(run_dir.glob(pattern))
            if ready(json.loads(state.read_text())):
                break
        except (StopIteration, FileNotFoundError, ValueError, KeyError):
            pass
        assert proc.poll() is None, f"the run ended before a checkpoint matching {pattern} was ready"
        assert time.time() < deadline, f"no checkpoint matching {pattern} within {timeout} s"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return state
