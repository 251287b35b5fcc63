"""Fidelity to the KD benchmark (CRD/RepDistiller, mdistiller): its checkpoints load strictly into our
registered models, and our parameter counts are the reference definitions'.

``data/kd_zoo_keys.json.gz`` holds the state-dict keys and shapes the reference code produces (see
``data/make_kd_zoo_keys.py``); checkpoints are generated from it in the published format
(``{"epoch": ..., "model": state_dict, "accuracy": ..., "optimizer": ...}``), so nothing is downloaded.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import timm
import torch

import distill2deploy  # noqa: F401  (registers the *_cifar models)
from distill2deploy.models import CIFAR_MODELS, create_model

KEYS_FILE = Path(__file__).parent / "data" / "kd_zoo_keys.json.gz"
REFERENCE = json.loads(gzip.decompress(KEYS_FILE.read_bytes()))
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

# the published student sizes at 100 classes (CRD's mobile_half, ShuffleV1, ShuffleV2)
PUBLISHED_PARAMS = {"mobilenetv2_x0_5_cifar": 812_836, "shufflenetv1_cifar": 949_258,
                    "shufflenetv2_cifar": 1_355_528}


def _zoo_checkpoint(name: str, path: Path) -> dict[str, torch.Tensor]:
    """A RepDistiller ``ckpt_epoch_240.pth`` for ``name``: every tensor filled with its key's index."""
    sd = {}
    for i, (key, shape) in enumerate(REFERENCE[name]["keys"]):
        dtype = torch.long if key.endswith("num_batches_tracked") else torch.float32
        sd[key] = torch.full(shape, i, dtype=dtype)
    optimizer = {"state": {}, "param_groups": [{"lr": 0.05, "momentum": 0.9, "params": [0, 1]}]}
    torch.save({"epoch": 240, "model": sd, "accuracy": 0.0, "optimizer": optimizer}, path)
    return sd


def test_every_registered_architecture_has_a_reference() -> None:
    assert set(REFERENCE) == set(CIFAR_MODELS)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_benchmark_checkpoint_loads_strictly(name: str, tmp_path: Path) -> None:
    path = tmp_path / "ckpt_epoch_240.pth"
    written = _zoo_checkpoint(name, path)
    model = create_model(name, num_classes=100, checkpoint=path, role="teacher")
    loaded = model.state_dict()
    assert list(loaded) == list(written)  # same names, same order as the reference module tree
    for key, value in written.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_parameter_count_equals_the_reference(name: str) -> None:
    reference = sum(torch.Size(shape).numel() for key, shape in REFERENCE[name]["keys"]
                    if not key.endswith(_BUFFERS))
    ours = sum(p.numel() for p in timm.create_model(name, num_classes=100).parameters())
    assert ours == reference
    if name in PUBLISHED_PARAMS:
        assert ours == PUBLISHED_PARAMS[name]
