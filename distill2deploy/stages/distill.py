"""distill: train the student with the configured method from the teacher stage's weights."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import _io
from ..methods import get_method
from ..models.builders import TEACHER_ARCHITECTURE, build_student, build_teacher
from ._base import RunContext, Stage, StageResult, file_sha256


class DistillStage(Stage):
    name = "distill"
    needs = ("teacher",)
    all_processes = True
    resume_files = ("checkpoints/last", "metrics.jsonl", "best.pt")

    reads = ("seed", "data", "student", "distill", *TEACHER_ARCHITECTURE)

    def key_files(self, ctx: RunContext) -> dict[str, Any]:
        return {"student.checkpoint": file_sha256(ctx.cfg.student.checkpoint, "student.checkpoint")}

    def run(self, ctx: RunContext, stage_dir: Path) -> StageResult:
        from ..training.loop import TrainOptions, train

        cfg = ctx.cfg
        data = ctx.data(need_train=True)
        method_cls = get_method(cfg.distill.method)
        options = method_cls.parse_options(cfg.distill.options)
        torch.manual_seed(cfg.seed)  # the student's initialisation
        student = build_student(cfg, data.num_classes)
        teachers = []
        if method_cls.needs_teacher(options):
            teachers = [build_teacher(cfg, data.num_classes, weights=ctx.output("teacher", "weights"))]
        method = method_cls(student, teachers, options, num_classes=data.num_classes,
                            input_size=cfg.data.input_size)
        result = train(ctx.accelerator, method, data, data_cfg=cfg.data, schedule=cfg.distill, seed=cfg.seed,
                       out_dir=stage_dir, key=self.cache_key(ctx), desc=f"distill:{cfg.distill.method}",
                       options=TrainOptions.from_config(cfg.distill))
        out = stage_dir / "student.pt"
        acc = ctx.accelerator
        if acc.is_main_process:
            _io.save_torch(acc.unwrap_model(student).state_dict(), out)
            for name, net in method.extra_eval_models().items():  # e.g. the co-trained teacher
                _io.save_torch(acc.unwrap_model(net).state_dict(), stage_dir / f"{name}_trained.pt")
        acc.wait_for_everyone()
        summary = {"method": cfg.distill.method, "options": method_cls.options_dict(options),
                   "student": cfg.student.model, "params": sum(p.numel() for p in student.parameters()),
                   "epochs": result.epochs, "test_top1": result.last_top1, "best_top1": result.best_top1,
                   "best_epoch": result.best_epoch, "train_seconds": round(result.seconds, 1),
                   "resumed_from_epoch": result.resumed_from_epoch, **{f"{k}": v for k, v in result.extra_top1.items()}}
        return StageResult(outputs={"weights": out, "metrics": stage_dir / "metrics.jsonl"}, summary=summary)
