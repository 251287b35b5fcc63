"""Runs that train: a diverging loss stops cleanly, a failed rerun leaves the finished run byte-identical,
--force and byte-stable artifacts keep downstream caches, damaged checkpoints and metrics are not trusted."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from distill2deploy.cli import main
from distill2deploy.errors import UserError

from .conftest import SAMPLE_NPZ, WEIGHTS, need_shared


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_diverging_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    """Epoch 1 trains normally; the loss turns NaN at epoch 2, step 2 of 3."""
    import torch

    from distill2deploy.config import DataConfig, DistillConfig
    from distill2deploy.data import DataSource, Split
    from distill2deploy.methods import get_method
    from distill2deploy.models.factory import create_model
    from distill2deploy.training.loop import train
    from distill2deploy.training.processes import make_accelerator

    ce = get_method("ce")

    class Diverging(ce):
        def forward(self, images, labels, teacher_outputs, progress):
            out = super().forward(images, labels, teacher_outputs, progress)
            return dataclasses.replace(out, loss=out.loss * float("nan")) if progress > 1.2 else out

    rng = np.random.default_rng(0)
    split = Split(images=rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8), labels=np.arange(24) % 3)
    source = DataSource(train=split, test=split, class_names=["a", "b", "c"])
    torch.manual_seed(0)
    method = Diverging(create_model("resnet8x4_cifar", num_classes=3), [], ce.parse_options({}), num_classes=3,
                       input_size=8)
    schedule = DistillConfig(epochs=3, batch_size=8, milestones=[2])
    data_cfg = DataConfig(input_size=8, num_workers=0)
    with pytest.raises(UserError) as e:
        train(make_accelerator(schedule), method, source, data_cfg=data_cfg, schedule=schedule, seed=0,
              out_dir=tmp_path, key="k", section="distill")
    msg = e.value.format()
    assert "epoch 2, step 2/3" in msg and "distill.lr" in msg and "last checkpoint before it is kept" in msg
    state = json.loads((tmp_path / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert (state["next_epoch"], state["next_step"]) == (1, 0)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and all(np.isfinite(v) for v in rows[0].values() if isinstance(v, float))
    assert all(torch.isfinite(v).all() for v in torch.load(tmp_path / "best.pt").values() if v.is_floating_point())


def quick_args(run_dir: Path, *extra: str) -> list[str]:
    need_shared()
    return ["pipeline", "quickstart", "--out", str(run_dir),
            "-o", f"data.source=npz:{SAMPLE_NPZ}", "-o", "teacher.model=resnet20_cifar",
            "-o", f"teacher.checkpoint={WEIGHTS / 'cifar100_resnet20.pth'}",
            "-o", "data.subset.train=128", "-o", "data.subset.test=64", "-o", "distill.epochs=1",
            "-o", "distill.milestones=[1]", "-o", "distill.batch_size=32", "-o", "quantize.calib_samples=32",
            "-o", "validate.runs=3", "-o", "validate.warmup=0", "-o", "validate.batch_sizes=[1]",
            "-o", "export.parity_samples=16", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("safety") / "run"
    assert main(quick_args(run_dir)) == 0
    return run_dir


def _stage_lines(out: str) -> dict[str, str]:
    return {line.split()[1].rstrip(":"): line.split()[2] for line in out.splitlines() if line.startswith("✓ ")}


@pytest.mark.slow
def test_a_rerun_that_fails_late_leaves_the_run_byte_identical(finished, capsys):
    before = snapshot(finished)
    code = main(quick_args(finished, "-o", "distill.lr=1e6", "-o", "distill.batch_size=16"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "training diverged" in err and "distill.lr" in err and "epoch 1, step" in err
    assert snapshot(finished) == before
    # and the finished run is still a valid cache
    assert main(quick_args(finished)) == 0
    assert set(_stage_lines(capsys.readouterr().out).values()) == {"cached"}


@pytest.mark.slow
def test_force_teacher_keeps_downstream_caches_and_force_distill_starts_over(finished, capsys):
    teacher_pt = (finished / "teacher" / "teacher.pt").read_bytes()
    assert main(quick_args(finished, "--force", "teacher", "-o", "quantize.calib_samples=64")) == 0
    stages = _stage_lines(capsys.readouterr().out)
    assert (finished / "teacher" / "teacher.pt").read_bytes() == teacher_pt  # same weights, same bytes
    assert stages["teacher"] == "done" and stages["distill"] == "cached" and stages["export"] == "cached"
    assert stages["quantize"] == "done"

    assert main(quick_args(finished, "--threads", "2", "-o", "quantize.calib_samples=64")) == 0
    stages = _stage_lines(capsys.readouterr().out)
    assert [s for s, v in stages.items() if v == "done"] == ["validate", "report"]  # latency depends on threads

    assert main(["distill", *quick_args(finished, "--force", "distill", "-o", "quantize.calib_samples=64")[1:]]) == 0
    out = capsys.readouterr().out
    assert "resuming" not in out and _stage_lines(out)["distill"] == "done"
    summary = json.loads((finished / "distill" / "stage.json").read_text())["summary"]
    assert summary["resumed_from_epoch"] is None
    assert not (finished / ".work").exists() or not any((finished / ".work").iterdir())


@pytest.mark.slow
def test_damaged_checkpoint_or_edited_metrics_are_not_resumed(finished, capsys):
    """A deleted output is rebuilt from the finished checkpoint; a damaged one is retrained from scratch."""
    args = ["distill", *quick_args(finished)[1:]]  # up to distill: the later stages are not the point here
    assert main(args) == 0
    capsys.readouterr()
    student = finished / "distill" / "student.pt"
    good = student.read_bytes()
    metrics = (finished / "distill" / "metrics.jsonl").read_text()

    student.unlink()  # the checkpoint is intact: resumed (finished), the same bytes come back
    assert main(args) == 0
    out = capsys.readouterr()
    assert "resuming after epoch 1/1" in out.out and "not resuming" not in out.err
    assert student.read_bytes() == good

    row = json.loads(metrics.splitlines()[0])
    row["test_top1"] = 0.99  # someone "improves" the history
    (finished / "distill" / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    assert main(args) == 0
    out = capsys.readouterr()
    assert "not resuming" in out.err and "metrics.jsonl changed" in out.err
    assert json.loads((finished / "distill" / "metrics.jsonl").read_text().splitlines()[0])["test_top1"] != 0.99

    ckpt = finished / "distill" / "checkpoints" / "last"
    victim = next(p for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != "trainer_state.json")
    victim.write_bytes(victim.read_bytes()[:-8] + b"corrupt!")
    student.unlink()
    assert main(args) == 0
    out = capsys.readouterr()
    assert "not resuming" in out.err and victim.name in out.err and "training from scratch" in out.err
    assert student.read_bytes() == good  # retrained from scratch: bitwise the same run


@pytest.mark.slow
def test_reset_head_fine_tunes_a_100_class_teacher_on_10_classes(tmp_path, capsys):
    """The documented path for a pretrained teacher on data with another class count."""
    import torch

    need_shared()
    f = np.load(SAMPLE_NPZ)
    keep = {s: f[f"y_{s}"] < 10 for s in ("train", "test")}
    data = tmp_path / "ten.npz"
    np.savez(data, **{f"{k}_{s}": f[f"{k}_{s}"][keep[s]] for k in ("x", "y") for s in ("train", "test")},
             fine_label_names=f["fine_label_names"][:10])
    args = ["teacher", "quickstart", "--out", str(tmp_path / "run"), "-o", f"data.source=npz:{data}",
            "-o", "teacher.model=resnet20_cifar", "-o", f"teacher.checkpoint={WEIGHTS / 'cifar100_resnet20.pth'}",
            "-o", "data.subset.train=null", "-o", "data.subset.test=null"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "teacher.reset_head: true" in err and "Traceback" not in err
    assert main([*args, "-o", "teacher.reset_head=true", "-o", "teacher.train.epochs=1",
                 "-o", "teacher.train.milestones=[1]", "-o", "teacher.train.lr=0.01"]) == 0
    weights = torch.load(tmp_path / "run" / "teacher" / "teacher.pt")
    assert weights["fc.weight"].shape[0] == 10
    summary = json.loads((tmp_path / "run" / "teacher" / "stage.json").read_text())["summary"]
    assert summary["num_classes"] == 10 and summary["trained_epochs"] == 1
