"""quantize: static INT8 (QDQ) student with onnxruntime, calibrated on training images."""
from __future__ import annotations

from pathlib import Path

from ..deploy.quantize import calibration_inputs, quantize_int8
from ._base import RunContext, Stage, StageResult


class QuantizeStage(Stage):
    name = "quantize"
    needs = ("export",)

    reads = ("seed", "data", "quantize")

    def run(self, ctx: RunContext, stage_dir: Path) -> StageResult:
        q, d = ctx.cfg.quantize, ctx.cfg.data
        if not q.enabled:
            return StageResult(outputs={}, summary={"enabled": False})
        calib = calibration_inputs(ctx.data(need_train=True).train, samples=q.calib_samples,
                                   batch_size=q.calib_batch_size, seed=ctx.cfg.seed, mean=d.mean, std=d.std,
                                   input_size=d.input_size, batch_key="quantize.calib_batch_size")
        out = stage_dir / "student.int8.onnx"
        info = quantize_int8(ctx.output("export", "student"), out, calib, calib_batch_size=q.calib_batch_size,
                             activation_type=q.activation_type, weight_type=q.weight_type,
                             per_channel=q.per_channel, calibrate_method=q.calibrate_method,
                             threads=ctx.cfg.threads)
        print(f"[quantize] {out.name}: {info['bytes'] / 1e6:.2f} MB, calibrated on {info['calib_samples']} images")
        return StageResult(outputs={"student_int8": out}, summary=info)
