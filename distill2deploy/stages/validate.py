"""validate: accuracy and latency of every exported model, measured in onnxruntime (and ``validate.runtimes``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import _io
from .._schema import to_dict
from ..data import preprocess
from ..deploy.baseline import accuracy_entry, data_sha256, measure_model, write_baseline
from ..deploy.validate import model_key, validate_models
from ._base import RunContext, Stage, StageResult


class ValidateStage(Stage):
    name = "validate"
    needs = ("export", "quantize")

    def key_inputs(self, ctx: RunContext) -> dict[str, Any]:
        return {"validate": to_dict(ctx.cfg.validate), "data": ctx.data_key(), "seed": ctx.cfg.seed,
                "threads": self.threads(ctx)}

    @staticmethod
    def threads(ctx: RunContext) -> int:
        """validate.threads, else the run's threads: latency depends on it, so it keys the cache."""
        v = ctx.cfg.validate.threads
        return v if v is not None else ctx.cfg.threads

    def run(self, ctx: RunContext, stage_dir: Path) -> StageResult:
        v, d = ctx.cfg.validate, ctx.cfg.data
        data = ctx.data(need_train=False)
        test = data.test
        paths = [ctx.output("export", "teacher"), ctx.output("export", "student")]
        if ctx.has_output("quantize", "student_int8"):
            paths.append(ctx.output("quantize", "student_int8"))
        images = preprocess(test.images, mean=d.mean, std=d.std, input_size=d.input_size)
        result = validate_models(paths, images, test.labels, batch_sizes=v.batch_sizes, warmup=v.warmup,
                                 runs=v.runs, threads=self.threads(ctx), class_names=data.class_names,
                                 named=data.named, keep_correct=True, runtimes=v.runtimes)
        correct = result.pop("correct")
        out = stage_dir / "validate.json"
        _io.write_json(out, result)
        outputs = {"results": out}
        if v.baseline_rounds:
            outputs["baseline"] = self._baseline(ctx, paths, images, correct, test)
        return StageResult(outputs=outputs, summary={"models": sorted(result["models"])})

    def _baseline(self, ctx: RunContext, paths: list[Path], images: Any, correct: dict[str, Any], test: Any) -> Path:
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
