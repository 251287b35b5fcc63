"""export: the teacher and the distilled student as ONNX, with the metadata a server needs."""
from __future__ import annotations

from pathlib import Path

from ..config_keys import MODEL_SECTIONS, config_hash
from ..deploy.export import export_classifier
from ..models.builders import build_student, build_teacher
from ._base import RunContext, Stage, StageResult


class ExportStage(Stage):
    name = "export"
    needs = ("teacher", "distill")

    # the models' metadata records config_hash(), the hash of MODEL_SECTIONS: reading it reads them all
    reads = MODEL_SECTIONS

    def run(self, ctx: RunContext, stage_dir: Path) -> StageResult:
        cfg = ctx.cfg
        data = ctx.data(need_train=False)
        d = cfg.data
        student = build_student(cfg, data.num_classes, weights=ctx.output("distill", "weights"))
        teacher = build_teacher(cfg, data.num_classes, weights=ctx.output("teacher", "weights"))
        outputs, summary = {}, {}
        for role, model, name in (("teacher", teacher, cfg.teacher.model), ("student", student, cfg.student.model)):
            path = stage_dir / f"{role}.onnx"
            info = export_classifier(model, path, model_name=name, class_names=data.class_names, mean=d.mean,
                                     std=d.std, input_size=d.input_size, opset=cfg.export.opset,
                                     config_hash=config_hash(cfg), test_images=data.test.images,
                                     parity_samples=cfg.export.parity_samples, threads=cfg.threads)
            outputs[role] = path
            summary[role] = {"bytes": info["bytes"], "opset": info["opset"], "parity": info["parity"]}
            p = info["parity"]
            print(f"[export] {path.name}: max |torch - onnxruntime| {p['max_abs_diff']:.2e}, "
                  f"top-1 agreement {100 * p['top1_agreement']:.2f}% on {p['n']} test images")
        return StageResult(outputs=outputs, summary=summary)
