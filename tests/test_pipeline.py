"""End to end through the real CLI on the shared CIFAR-100 sample: every stage, caching, resume."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from distill2deploy.cli import main

from .conftest import SAMPLE_NPZ, WEIGHTS, need_shared

pytestmark = pytest.mark.slow  # every test shares one real pipeline run (minutes on 2 cores)


def quick_args(run_dir: Path, *extra: str) -> list[str]:
    need_shared()
    return ["pipeline", "quickstart", "--out", str(run_dir),
            "-o", f"data.source=npz:{SAMPLE_NPZ}", "-o", f"teacher.checkpoint={WEIGHTS / 'cifar100_resnet56.pth'}",
            "-o", "data.subset.train=256", "-o", "data.subset.test=128", "-o", "distill.epochs=1",
            "-o", "distill.milestones=[1]", "-o", "quantize.calib_samples=64", "-o", "validate.runs=5",
            "-o", "validate.warmup=1", "-o", "validate.batch_sizes=[1, 8]", "-o", "export.parity_samples=32",
            "-o", "validate.baseline_rounds=5",
            *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "quick"
    assert main(quick_args(run_dir)) == 0
    return run_dir


def test_pipeline_produces_models_and_report(finished_run):
    for f in ("teacher/teacher.pt", "distill/student.pt", "export/teacher.onnx", "export/student.onnx",
              "quantize/student.int8.onnx", "report.json", "report.md", "accuracy_latency.png",
              "training_curves.png", "config.yaml", "config.sha256", "baseline.json"):
        assert (finished_run / f).is_file(), f
    report = json.loads((finished_run / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "student", "student.int8"}
    teacher = report["models"]["teacher"]
    assert teacher["accuracy"]["n"] == 128
    # The pretrained ResNet-56 is far better than chance on real CIFAR-100 images in onnxruntime.
    assert teacher["accuracy"]["top1"] > 0.5
    assert set(teacher["latency_ms"]) == {"1", "8"}
    for m in report["models"].values():
        assert 0.0 <= m["accuracy"]["top1"] <= m["accuracy"]["top5"] <= 1.0
        assert m["latency_ms"]["1"]["p50"] <= m["latency_ms"]["1"]["p99"]
    assert report["distill"]["method"] == "kd" and report["distill"]["epochs"] == 1
    metrics = [json.loads(line) for line in (finished_run / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in metrics] == [1]


def test_rerun_is_cached_and_fast(finished_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*.onnx")}
    t0 = time.perf_counter()
    assert main(quick_args(finished_run)) == 0
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    for stage in ("teacher", "distill", "export", "quantize", "validate", "report"):
        assert f"✓ {stage}: cached" in out
    assert {p: p.stat().st_mtime_ns for p in finished_run.rglob("*.onnx")} == before
    assert elapsed < 30


def test_force_reruns_one_stage(finished_run, capsys):
    assert main(quick_args(finished_run, "--force", "report")) == 0
    out = capsys.readouterr().out
    assert "✓ distill: cached" in out and "✓ report: done" in out


def test_changed_validate_settings_reuse_models(finished_run, capsys):
    assert main(quick_args(finished_run, "-o", "validate.runs=6")) == 0
    out = capsys.readouterr().out
    assert "✓ quantize: cached" in out and "✓ validate: done" in out


def test_one_config_hash_int8_verdict_and_baseline(finished_run):
    from distill2deploy.deploy.metadata import read_metadata

    report = json.loads((finished_run / "report.json").read_text())
    digest = (finished_run / "config.sha256").read_text().strip()
    assert report["config_hash"] == digest == read_metadata(finished_run / "export" / "student.onnx")["config_hash"]
    verdict = report["int8"]["student.int8 vs student"]
    tc = verdict["top1_change"]
    top1 = {k: report["models"][k]["accuracy"]["top1"] for k in ("student", "student.int8")}
    assert tc["change_pts"] == pytest.approx(100 * (top1["student.int8"] - top1["student"])) and tc["n"] == 128
    assert set(verdict["latency_ratio"]) == {"1", "8"} and 0 < verdict["size_ratio"] < 0.5
    assert report["machine"]["threads"] == 1 and report["machine"]["cores"] >= 1  # threads: the run's default
    assert "machine" not in report["latency_settings"]  # once, at the top level
    md = (finished_run / "report.md").read_text()
    assert "## Is INT8 worth it?" in md and f"{report['machine']['threads']} thread" in md
    baseline = json.loads((finished_run / "baseline.json").read_text())
    assert set(baseline["roles"]) == {"teacher", "student", "student.int8"}
    assert baseline["roles"]["teacher"]["accuracy"]["top1"] == report["models"]["teacher"]["accuracy"]["top1"]


def test_report_and_check_take_a_run_directory(finished_run, capsys):
    assert main(["report", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert "✓ validate: cached" in out and f"report: {finished_run / 'report.md'}" in out
    assert "INT8 student.int8 vs student: top-1" in out
    # the pipeline's own baseline, role picked by file name; a generous budget: this is about plumbing
    assert main(["check", str(finished_run / "quantize" / "student.int8.onnx"), "--baseline",
                 str(finished_run / "baseline.json"), "--rounds", "5", "--max-slowdown", "5"]) == 0
    assert "(role 'student.int8')" in capsys.readouterr().err


def test_changed_calibration_reexports_nothing(finished_run, capsys):
    """The derived cache keys end to end: quantize settings rerun quantize and what follows, not export."""
    assert main(quick_args(finished_run, "-o", "quantize.calib_samples=32")) == 0
    out = capsys.readouterr().out
    assert "✓ export: cached" in out and "✓ quantize: done" in out and "✓ validate: done" in out
