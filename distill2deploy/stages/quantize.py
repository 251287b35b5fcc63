"""quantize: static INT8 (QDQ) student with onnxruntime, calibrated on training images."""
from __future__ import annotations

from pathlib import Path

from ..data import preprocess, stratified_subset
from ..deploy.quantize import quantize_int8
from ._base import RunContext, Stage, StageResult


class QuantizeStage(Stage):
    name = "quantize"
    needs = ("export",)

    reads = ("seed", "data", "quantize")

    def run(self, ctx: RunContext, stage_dir: Path) -> StageResult:
        q, d = ctx.cfg.quantize, ctx.cfg.data
        if not q.enabled:
            return StageResult(outputs={}, summary={"enabled": False})
        train = ctx.data(need_train=True).train
        n = min(q.calib_samples, len(train.labels)) // q.calib_batch_size * q.calib_batch_size
        idx = stratified_subset(train.labels, n, ctx.cfg.seed)
        calib = preprocess(train.images[idx], mean=d.mean, std=d.std, input_size=d.input_size)
        out = stage_dir / "student.int8.onnx"
        info = quantize_int8(ctx.output("export", "student"), out, calib, calib_batch_size=q.calib_batch_size,
                             activation_type=q.activation_type, weight_type=q.weight_type,
                             per_channel=q.per_channel, calibrate_method=q.calibrate_method,
                             threads=ctx.cfg.threads)
        print(f"[quantize] {out.name}: {info['bytes'] / 1e6:.2f} MB, calibrated on {info['calib_samples']} images")
        return StageResult(outputs={"student_int8": out}, summary=info)
