"""Shared fixtures: paths to the read-only real data beside the repo, tiny configs."""
from __future__ import annotations

import os
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
