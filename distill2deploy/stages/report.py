"""report: report.json, report.md and PNG plots at the top of the run directory."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import _io
from ..config_keys import MODEL_SECTIONS, config_hash
from ..deploy.plots import plot_accuracy_latency, plot_quantize_search
from ..report import build_report, plot_training_curves, render_markdown
from ._base import RunContext, Stage, StageResult


class ReportStage(Stage):
    name = "report"
    needs = ("teacher", "distill", "export", "quantize", "validate")

    # the report shows the run's name and config_hash() (MODEL_SECTIONS); the rest comes from the manifests
    reads = ("name", *MODEL_SECTIONS)

    def run(self, ctx: RunContext, stage_dir: Path) -> StageResult:
        return write_report(ctx.run_dir, ctx.manifests, config_hash(ctx.cfg), ctx.cfg.name or ctx.run_dir.name)


def write_report(run_dir: Path, manifests: dict[str, dict[str, Any]], cfg_hash: str, name: str) -> StageResult:
    report = build_report(run_dir, manifests, cfg_hash, name)
    _io.write_json(run_dir / "report.json", report)
    _io.write_text(run_dir / "report.md", render_markdown(report))
    plot_accuracy_latency(report, run_dir / "accuracy_latency.png")
    metrics = _io.read_jsonl(run_dir / manifests["distill"]["outputs"]["metrics"]["path"])
    outputs = {"json": run_dir / "report.json", "markdown": run_dir / "report.md",
               "accuracy_latency": run_dir / "accuracy_latency.png"}
    search = report["quantize"].get("search")
    if search:
        plot_quantize_search(search, run_dir / "quantize_search.png")
        outputs["quantize_search"] = run_dir / "quantize_search.png"
    if metrics:
        teacher_top1 = manifests["teacher"]["summary"].get("test", {}).get("top1")
        plot_training_curves(metrics, run_dir / "training_curves.png", f"{name}: distill", teacher_top1)
        outputs["training_curves"] = run_dir / "training_curves.png"
    return StageResult(outputs=outputs, summary={})
