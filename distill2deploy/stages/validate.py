"""validate: accuracy and latency of every exported model, measured in onnxruntime."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import _io
from .._schema import to_dict
from ..data import preprocess
from ..deploy.validate import validate_models
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
                                 named=data.named)
        out = stage_dir / "validate.json"
        _io.write_json(out, result)
        return StageResult(outputs={"results": out}, summary={"models": sorted(result["models"])})
