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
from distill2deploy.config import load_config
from distill2deploy.models import CIFAR_MODELS, create_model
from distill2deploy.models.builders import build_teacher
from distill2deploy.stages import STAGES, RunContext

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
    optimizer = {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                 "param_groups": [{"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "params": [0]}]}
    # the 2019 release predates torch's zip format
    torch.save({"epoch": 240, "model": sd, "best_acc": torch.tensor(75.0), "optimizer": optimizer}, path,
               _use_new_zipfile_serialization=False)
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


@pytest.mark.parametrize(("config", "teacher", "release"), [
    ("vgg13_mobilenetv2", "vgg13_bn_cifar", "vgg13_vanilla"),
    ("resnet32x4_shufflenetv2", "resnet32x4_cifar", "resnet32x4_vanilla"),
])
def test_bundled_benchmark_pairs_read_the_documented_teacher(config: str, teacher: str, release: str,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    documented = f"~/.cache/distill2deploy/cifar_teachers/{release}/ckpt_epoch_240.pth"
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "cifar_teachers.tar" in readme and f"{config}.yaml" in readme
    cfg, _ = load_config(config)
    assert (cfg.teacher.model, cfg.teacher.checkpoint) == (teacher, documented)
    monkeypatch.setenv("HOME", str(tmp_path))
    path = Path(documented).expanduser()
    path.parent.mkdir(parents=True)
    written = _zoo_checkpoint(teacher, path)
    model = build_teacher(cfg, num_classes=100)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in written.items())
    teacher_stage = next(s for s in STAGES if s.name == "teacher")
    assert teacher_stage.cache_key(RunContext(cfg, tmp_path / "run"))  # the cache key hashes the file at ~
