"""validate: accuracy and latency of every exported model, measured in onnxruntime (and ``validate.runtimes``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import _io
from ..deploy.baseline import accuracy_entry, data_sha256, measure_model, write_baseline
from ..deploy.validate import model_key, per_model_inputs, validate_models
from ._base import RunContext, Stage, StageResult


class ValidateStage(Stage):
    name = "validate"
    needs = ("export", "quantize")

    # latency depends on the thread count: validate.threads, else the run's threads
    reads = ("seed", "data", "validate", "threads")

    @staticmethod
    def threads(ctx: RunContext) -> int:
        """validate.threads, else the run's threads."""
        v = ctx.cfg.validate.threads
        return v if v is not None else ctx.cfg.threads

    def run(self, ctx: RunContext, stage_dir: Path) -> StageResult:
        v = ctx.cfg.validate
        data = ctx.data(need_train=False)
        test = data.test
        paths = [ctx.output("export", "teacher"), ctx.output("export", "student")]
        if ctx.has_output("quantize", "student_int8"):
            paths.append(ctx.output("quantize", "student_int8"))
        result = validate_models(paths, per_model_inputs(test.images), test.labels, batch_sizes=v.batch_sizes, warmup=v.warmup,
                                 runs=v.runs, threads=self.threads(ctx), class_names=data.class_names,
                                 named=data.named, keep_correct=True, runtimes=v.runtimes)
        correct = result.pop("correct")
        out = stage_dir / "validate.json"
        _io.write_json(out, result)
        outputs = {"results": out}
        if v.baseline_rounds:
            outputs["baseline"] = self._baseline(ctx, paths, correct, test)
        return StageResult(outputs=outputs, summary={"models": sorted(result["models"])})

    def _baseline(self, ctx: RunContext, paths: list[Path], correct: dict[str, Any], test: Any) -> Path:
        """<run>/baseline.json, keyed by role (teacher, student, student.int8), for ``distill2deploy check``."""
        v = ctx.cfg.validate
        data_hash = data_sha256(test.images, test.labels)
        entries = {}
        for path in paths:
            role = model_key(path)
            print(f"[validate] baseline for {role}: {v.baseline_rounds} rounds against the reference workload")
            entry = measure_model(path, input_size=ctx.cfg.data.input_size, batch_sizes=v.batch_sizes,
                                  rounds=v.baseline_rounds, threads=1, runtime=v.runtimes[0])
            entry["accuracy"] = accuracy_entry(correct[role], data_hash)
            entries[role] = entry
        out = ctx.run_dir / "baseline.json"
        write_baseline(out, entries)
        return out
