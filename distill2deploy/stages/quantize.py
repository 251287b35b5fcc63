"""quantize: static INT8 (QDQ) student with onnxruntime, calibrated on training images.

With ``quantize.search`` the INT8 variants of :mod:`~distill2deploy.deploy.quantize_search` are
scored on held-out training images and timed, and the fastest within ``quantize.max_drop`` is kept;
when none is (or ``quantize.qat.always``), ``quantize.qat.epochs > 0`` fine-tunes the student with
fake quantization and the distillation loss (:mod:`~distill2deploy.qat`) and adds it to the table.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__, _io
from ..config_keys import config_slice
from ..data import DataSource, Split, preprocess
from ..deploy.evaluate import accuracy, make_session, run_batched
from ..deploy.latency import measure_latency_many
from ..deploy.quantize import calibration_inputs, quantize_int8
from ..deploy.quantize_score import latency_fields, paired_drop, pick, unseen_views
from ..deploy.quantize_search import held_out_split, search_from_config
from ._base import RunContext, Stage, StageResult


class QuantizeStage(Stage):
    name = "quantize"
    # teacher and distill: the weights quantization-aware distillation starts from
    needs = ("teacher", "distill", "export")

    reads = ("seed", "data", "quantize")

    def key_files(self, ctx: RunContext) -> dict[str, Any]:
        """Beyond ``reads``, only with ``quantize.search``: the threads and batch sizes the search times its
        candidates with decide which one is kept (without search, a timing change re-quantizes nothing)."""
        if not ctx.cfg.quantize.search:
            return {}
        return {"search_timing": {"threads": self._threads(ctx), "batch_sizes": ctx.cfg.validate.batch_sizes}}

    @staticmethod
    def _threads(ctx: RunContext) -> int:
        return ctx.cfg.validate.threads or ctx.cfg.threads

    def run(self, ctx: RunContext, stage_dir: Path) -> StageResult:
        q, d = ctx.cfg.quantize, ctx.cfg.data
        if not q.enabled:
            return StageResult(outputs={}, summary={"enabled": False})
        train = ctx.data(need_train=True).train
        out = stage_dir / "student.int8.onnx"
        if q.search:
            info = search_from_config(ctx.output("export", "student"), out, images=train.images, labels=train.labels,
                                      q=q, mean=d.mean, std=d.std, input_size=d.input_size, seed=ctx.cfg.seed,
                                      threads=self._threads(ctx), batch_sizes=ctx.cfg.validate.batch_sizes)
            if q.qat.epochs and (q.qat.always or not info["within_budget"]):
                self._add_qat(ctx, stage_dir, out, info)
            verdict = "within" if info["within_budget"] else "NOT within"
            print(f"[quantize] kept {info['chosen']} ({verdict} {q.max_drop} top-1 points of fp32)")
            return StageResult(outputs={"student_int8": out}, summary={"search": info})
        calib = calibration_inputs(train, samples=q.calib_samples, batch_size=q.calib_batch_size, seed=ctx.cfg.seed,
                                   mean=d.mean, std=d.std, input_size=d.input_size,
                                   batch_key="quantize.calib_batch_size")
        info = quantize_int8(ctx.output("export", "student"), out, calib, calib_batch_size=q.calib_batch_size,
                             activation_type=q.activation_type, weight_type=q.weight_type,
                             per_channel=q.per_channel, calibrate_method=q.calibrate_method,
                             threads=ctx.cfg.threads)
        print(f"[quantize] {out.name}: {info['bytes'] / 1e6:.2f} MB, calibrated on {info['calib_samples']} images")
        return StageResult(outputs={"student_int8": out}, summary=info)

    #: quantization-aware distillation's checkpoint: a killed run resumes it, a rerun whose QAT inputs did
    #: not change (only the search's timing, budget, ...) reuses the finished one instead of retraining
    resume_files = ("qat/checkpoints/last", "qat/metrics.jsonl", "qat/best.pt")
    checkpoint_dir = "qat/checkpoints/last"

    def resume_key(self, ctx: RunContext, key: str) -> str:
        return self._qat_key(ctx)

    def _qat_key(self, ctx: RunContext) -> str:
        """What the fine-tuned weights depend on: the data, the held-out slice it leaves out, the QAT
        schedule, the loss, the teacher and distilled student. Not the search's candidates, timing or
        budget, which only decide what is done with those weights."""
        reads = ("seed", "data", "quantize.search_samples", "quantize.qat", "distill.method", "distill.options",
                 "distill.mixed_precision")
        cfg = config_slice(ctx.cfg, reads)
        cfg["quantize"]["qat"].pop("always")
        return _io.obj_sha256({"qat": __version__, "config": cfg,
                               "upstream": {d: ctx.manifests[d]["outputs_sha256"] for d in ("teacher", "distill")}})

    def _add_qat(self, ctx: RunContext, stage_dir: Path, out: Path, info: dict[str, Any]) -> None:
        """Fine-tune with fake quantization on the training images outside the held-out slice (resuming
        ``qat/checkpoints/last``), quantize the tuned float student like the searched choice, score it on
        that slice, time it interleaved with fp32 and the choice, and keep it when it is the fastest model
        within budget (or the only one closer to it)."""
        from ..methods import get_method
        from ..models.builders import build_student, build_teacher
        from ..qat import prepare_qat, qat_method, requantize, sync_tuned_student
        from ..training.loop import TrainOptions, train

        cfg, q, d = ctx.cfg, ctx.cfg.quantize, ctx.cfg.data
        data = ctx.data(need_train=True)
        calib_idx, eval_idx = held_out_split(data.train.labels, max(q.search_calib_samples), q.search_samples,
                                             cfg.seed)
        rest = np.setdiff1d(np.arange(len(data.train.labels)), eval_idx)
        held_out = Split(images=data.train.images[eval_idx], labels=data.train.labels[eval_idx])
        # the trainer's per-epoch "test" accuracy is the held-out training slice: the test split stays unseen
        source = DataSource(train=Split(images=data.train.images[rest], labels=data.train.labels[rest]),
                            test=held_out, class_names=data.class_names, named=data.named)
        method_cls = get_method(cfg.distill.method)
        options = method_cls.parse_options(cfg.distill.options)
        student = build_student(cfg, data.num_classes, weights=ctx.output("distill", "weights"))
        teachers = ([build_teacher(cfg, data.num_classes, weights=ctx.output("teacher", "weights"))]
                    if method_cls.needs_teacher(options) else [])
        prepared = prepare_qat(student, d.input_size, per_channel=q.qat.per_channel)
        method, used = qat_method(method_cls, options, student, prepared, teachers, num_classes=data.num_classes,
                                  input_size=d.input_size)
        print(f"[quantize] no candidate within budget: quantization-aware distillation ({used}), "
              f"{q.qat.epochs} epochs" if not info["within_budget"] else
              f"[quantize] quantization-aware distillation ({used}, quantize.qat.always), {q.qat.epochs} epochs")
        result = train(ctx.accelerator, method, source, data_cfg=d, schedule=q.qat, seed=cfg.seed,
                       out_dir=stage_dir / "qat", key=self._qat_key(ctx), desc=f"qat:{used}",
                       options=TrainOptions(), section="quantize.qat")
        # the tuned weights and BN statistics, wherever the graph trained; kept, and quantized as the choice was
        sync_tuned_student(student, prepared)
        _io.save_torch(student.state_dict(), stage_dir / "qat" / "student.pt")
        chosen = next(r for r in info["rows"] if r["name"] == info["chosen"])
        prep = {"mean": d.mean, "std": d.std, "input_size": d.input_size}
        qat_path = stage_dir / "qat" / "student.qat.int8.onnx"
        requantize(student, qat_path, fp32_path=ctx.output("export", "student"),
                   calib=preprocess(data.train.images[calib_idx[:chosen["calib_samples"]]], **prep),
                   settings={**chosen, "per_channel": q.qat.per_channel}, input_size=d.input_size,
                   qat={"epochs": q.qat.epochs, "lr": q.qat.lr, "loss": used, "per_channel": q.qat.per_channel},
                   opset=cfg.export.opset, calib_batch_size=q.calib_batch_size, threads=self._threads(ctx))
        # scored as the search scored its candidates: the held-out images and their unseen views, 95% bound
        views = unseen_views(held_out.images, q.search_views, cfg.seed) if q.search_views else held_out.images[:0]
        x = preprocess(np.concatenate([held_out.images, views]), **prep)
        n, threads = len(held_out.labels), self._threads(ctx)
        f_all, q_all = (run_batched(make_session(p, threads=threads), x, 128)
                        for p in (ctx.output("export", "student"), qat_path))
        top1 = accuracy(q_all[:n], held_out.labels)["top1"]
        score = paired_drop(f_all, q_all, held_out.labels)
        timed = measure_latency_many([ctx.output("export", "student"), out, qat_path], input_sizes=[d.input_size] * 3,
                                     batch_sizes=ctx.cfg.validate.batch_sizes, runs=q.search_runs, rounds=6,
                                     threads=threads)
        ptq_timing, qat_timing = (latency_fields(t["latency_ms"], timed[0]["latency_ms"]) for t in timed[1:])
        epochs = _io.read_jsonl(stage_dir / "qat" / "metrics.jsonl")
        name = f"qat-{used}-{q.qat.epochs}ep" + ("" if q.qat.per_channel else "-pt")
        row = {"name": name, "qat_epochs": q.qat.epochs, "loss": used, "per_channel": q.qat.per_channel,
               "calibrate_method": chosen["calibrate_method"], "calib_samples": chosen["calib_samples"],
               "top1": top1, "drop_pt": 100 * (info["fp32_top1"] - top1), "est_drop_pt": score["drop_pt"],
               "drop_ucb_pt": score["drop_ucb_pt"], "disagreement": score["disagreement"], **qat_timing,
               # the searched choice, timed again in this run: the ratio QAT vs PTQ that is fair
               "ptq_choice_latency_ratio": ptq_timing["latency_ratio"],
               # the fine-tune's cost over all the calls that trained it (a reused one costs nothing now)
               "train_seconds": round(sum(e["epoch_seconds"] for e in epochs), 1),
               "resumed_from_epoch": result.resumed_from_epoch, "bytes": qat_path.stat().st_size}
        print(f"[quantize] {name}: top-1 {100 * top1:.2f}% (fp32 {100 * info['fp32_top1']:.2f}%), drop bound "
              f"{row['drop_ucb_pt']:+.2f} pts (choice {chosen['drop_ucb_pt']:+.2f}), "
              f"{row['latency_ratio']:.2f}x fp32 time ({chosen['name']}: {row['ptq_choice_latency_ratio']:.2f}x)")
        best = pick([{**chosen, **ptq_timing}, row], q.max_drop, score="drop_ucb_pt")  # the search's rule: bound, then ties
        if best == 1 or (best is None and row["drop_ucb_pt"] < chosen["drop_ucb_pt"]):
            with _io.atomic_path(out) as dst:
                shutil.copyfile(qat_path, dst)
            info.update(chosen=name, within_budget=best is not None)
        info["rows"].append(row)
