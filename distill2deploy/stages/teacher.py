"""teacher: build the teacher through timm, optionally fine-tune it, record its test accuracy."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .. import _io
from .._schema import to_dict
from ..config import PipelineConfig
from ..methods import get_method
from ..models.factory import create_model, load_checkpoint
from ._base import RunContext, Stage, StageResult, require_file


def build_teacher(cfg: PipelineConfig, num_classes: int, weights: Path | None = None) -> nn.Module:
    """The configured teacher; with ``weights`` (the teacher stage's output) no download happens."""
    t = cfg.teacher
    model = create_model(t.model, num_classes=num_classes,
                         pretrained=t.pretrained and t.checkpoint is None and weights is None,
                         checkpoint=None if weights is not None else t.checkpoint,
                         input_size=t.input_size, data_input_size=cfg.data.input_size, role="teacher",
                         reset_head=t.reset_head and weights is None, **t.model_kwargs)
    if weights is not None:
        load_checkpoint(model, str(weights))
    return model


class TeacherStage(Stage):
    name = "teacher"
    all_processes = True
    resume_files = ("checkpoints/last", "metrics.jsonl", "best.pt")

    def key_inputs(self, ctx: RunContext) -> dict[str, Any]:
        t = ctx.cfg.teacher
        ckpt = require_file(t.checkpoint, "teacher.checkpoint")
        return {"teacher": to_dict(t), "checkpoint_sha256": _io.file_sha256(ckpt) if ckpt else None,
                "data": ctx.data_key(), "seed": ctx.cfg.seed}

    def run(self, ctx: RunContext, stage_dir: Path) -> StageResult:
        from ..training.loaders import make_loaders
        from ..training.loop import train
        from ..training.step import evaluate

        cfg = ctx.cfg
        data = ctx.data(need_train=True)
        teacher = build_teacher(cfg, data.num_classes)
        summary: dict[str, Any] = {"model": cfg.teacher.model, "num_classes": data.num_classes,
                                   "params": sum(p.numel() for p in teacher.parameters())}
        acc = ctx.accelerator
        if cfg.teacher.train.epochs > 0:
            ce = get_method("ce")
            method = ce(teacher, [], ce.parse_options({}), num_classes=data.num_classes,
                        input_size=cfg.data.input_size)
            result = train(acc, method, data, data_cfg=cfg.data, schedule=cfg.teacher.train, seed=cfg.seed,
                           out_dir=stage_dir, key=self.cache_key(ctx), desc="teacher", section="teacher.train")
            summary.update(trained_epochs=result.epochs, train_seconds=round(result.seconds, 1),
                           best_top1=result.best_top1)
            teacher = acc.unwrap_model(teacher)
        _, test_loader = make_loaders(data, cfg.data, cfg.distill.batch_size, cfg.seed)
        teacher = teacher.to(acc.device)
        summary["test"] = evaluate(teacher, acc.prepare_data_loader(test_loader), acc)
        summary["test_images"] = len(data.test.labels)
        out = stage_dir / "teacher.pt"
        if acc.is_main_process:
            _io.save_torch(teacher.state_dict(), out)
            acc.print(f"[teacher] {cfg.teacher.model}: test top-1 {100 * summary['test']['top1']:.2f}% "
                      f"on {summary['test_images']} images")
        acc.wait_for_everyone()
        return StageResult(outputs={"weights": out}, summary=summary)
