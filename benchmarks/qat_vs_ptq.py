"""Quantization-aware distillation against post-training INT8 on the *test* split of a pipeline run.

    python benchmarks/qat_vs_ptq.py RUN_DIR [--ptq pc-minmax-128 pt-minmax-128] [--torchao]
        [--zero-dead-channels] [--also OTHER.onnx ...] [--runs 40] [--threads 1] [--json OUT.json]

RUN_DIR is a finished pipeline run with ``quantize.search`` and ``quantize.qat.epochs > 0``. Scored on
the run's whole test split (which neither the search nor QAT ever saw) and timed interleaved with
explicit threads (``validate_models``): fp32, the stage's kept file, the QAT file
(``quantize/qat/student.qat.int8.onnx``, the tuned student re-quantized by onnxruntime), each
``--ptq`` setting (``pc``/``pt`` weights, calibration method, images) quantized from the fp32 file on
the calibration images the search used, and with ``--torchao`` torchao's own QDQ export of the same
fine-tune (``convert_pt2e`` of the checkpointed fake-quant graph, exported by the project's exporter); with
``--zero-dead-channels`` the ``--ptq`` settings again on the fp32 student whose dead channels' conv
weights are zeroed (see :func:`zero_dead_channels`).
Prints one table (top-1, paired change vs fp32 with its 95% interval, latency ratios per batch size)
and the QAT cost; asserts nothing. Built files go to RUN_DIR/.qat_vs_ptq/.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from distill2deploy.config import load_config  # noqa: E402
from distill2deploy.data import load_source, preprocess, subset_source  # noqa: E402
from distill2deploy.deploy.export import export_onnx  # noqa: E402
from distill2deploy.deploy.metadata import load_model  # noqa: E402
from distill2deploy.deploy.quantize import quantize_int8  # noqa: E402
from distill2deploy.deploy.quantize_search import held_out_split  # noqa: E402
from distill2deploy.deploy.regression import paired_accuracy  # noqa: E402
from distill2deploy.deploy.validate import validate_models  # noqa: E402


def torchao_qdq(cfg, run: Path, row: dict, out: Path, num_classes: int) -> Path:  # noqa: ANN001
    """torchao's QDQ file of the run's fine-tune: the fake-quant graph with the last checkpoint's state."""
    from distill2deploy.models.builders import build_student
    from distill2deploy.qat import convert_qat, prepare_qat

    student = build_student(cfg, num_classes, weights=run / "distill" / "student.pt")
    prepared = prepare_qat(student, cfg.data.input_size, per_channel=row["per_channel"])
    state = torch.load(run / "quantize" / "qat" / "checkpoints" / "last" / "pytorch_model.bin", map_location="cpu")
    # the checkpoint holds the method (student and teachers): the student's entries are the prepared graph's
    prepared.load_state_dict({k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")})
    props = {p.key: p.value for p in load_model(run / "export" / "student.onnx").metadata_props}
    export_onnx(convert_qat(prepared), out, input_size=cfg.data.input_size, opset=cfg.export.opset,
                metadata={**props, "quantization": json.dumps({"format": "QDQ", "method": "torchao"})})
    return out


def zero_dead_channels(cfg, run: Path, out: Path, num_classes: int) -> tuple[Path, int]:  # noqa: ANN001
    """The fp32 student with the weights of dead conv output channels zeroed, exported beside the others.

    A channel whose BatchNorm saw (numerically) no variance (running_var < 1e-12) outputs its BN bias
    whatever its conv weights are, but folding BN divides those weights by sqrt(running_var + eps): one
    such channel sets a per-tensor weight scale hundreds of times too coarse for the rest of the layer.
    Zeroing its weights leaves the fp32 outputs unchanged (the column "change vs fp32" shows it).
    """
    from distill2deploy.models.builders import build_student

    student = build_student(cfg, num_classes, weights=run / "distill" / "student.pt").eval()
    modules, dead = list(student.modules()), 0
    with torch.no_grad():
        for conv, bn in zip(modules, modules[1:]):
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                mask = bn.running_var < 1e-12
                conv.weight[mask] = 0
                dead += int(mask.sum())
    props = {p.key: p.value for p in load_model(run / "export" / "student.onnx").metadata_props}
    export_onnx(student, out, input_size=cfg.data.input_size, opset=cfg.export.opset, metadata=props)
    return out, dead


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--ptq", nargs="*", default=[], help="post-training settings, e.g. pc-minmax-128 pt-minmax-128")
    ap.add_argument("--torchao", action="store_true", help="also torchao's own QDQ export of the fine-tune")
    ap.add_argument("--zero-dead-channels", action="store_true",
                    help="also the --ptq settings on the fp32 student with its dead channels' weights zeroed")
    ap.add_argument("--also", nargs="*", default=[], help="other ONNX files to score and time")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()

    run = args.run
    cfg, _ = load_config(str(run / "config.yaml"))
    q, d = cfg.quantize, cfg.data
    stage = json.loads((run / "quantize" / "stage.json").read_text())["summary"]["search"]
    row = next(r for r in stage["rows"] if "qat_epochs" in r)
    data = subset_source(load_source(d.source, root=d.root, need_train=True, num_classes=d.num_classes),
                         d.subset.train, d.subset.test, cfg.seed)
    prep = {"mean": d.mean, "std": d.std, "input_size": d.input_size}
    work = run / ".qat_vs_ptq"
    work.mkdir(exist_ok=True)
    models = {"fp32": run / "export" / "student.onnx",
              f"kept ({stage['chosen']})": run / "quantize" / "student.int8.onnx",
              row["name"]: run / "quantize" / "qat" / "student.qat.int8.onnx"}
    calib_idx, _ = held_out_split(data.train.labels, max(q.search_calib_samples), q.search_samples, cfg.seed)
    pool = preprocess(data.train.images[calib_idx], **prep)
    for name in args.ptq:
        granularity, method, n = name.split("-")
        path = work / f"ptq-{name}.int8.onnx"
        quantize_int8(models["fp32"], path, pool[:int(n)], calib_batch_size=q.calib_batch_size,
                      per_channel=granularity == "pc", calibrate_method=method, threads=args.threads)
        models[f"ptq {name}"] = path
    if args.zero_dead_channels:
        clean, dead = zero_dead_channels(cfg, run, work / "student.dead0.onnx", data.num_classes)
        models[f"fp32, {dead} dead channels zeroed"] = clean
        for name in args.ptq:
            granularity, method, n = name.split("-")
            path = work / f"ptq-{name}.dead0.int8.onnx"
            quantize_int8(clean, path, pool[:int(n)], calib_batch_size=q.calib_batch_size,
                          per_channel=granularity == "pc", calibrate_method=method, threads=args.threads)
            models[f"ptq {name}, dead channels zeroed"] = path
    if args.torchao:
        models[f"{row['name']} torchao QDQ"] = torchao_qdq(cfg, run, row, work / "student.qat.torchao.onnx",
                                                           data.num_classes)
    models.update({Path(p).name: Path(p) for p in args.also})

    x = preprocess(data.test.images, **prep)
    res = validate_models(list(models.values()), x, data.test.labels, batch_sizes=args.batch_sizes, runs=args.runs,
                          warmup=5, threads=args.threads, keep_correct=True, named=False)
    keys = list(res["models"])
    fp32 = res["models"][keys[0]]
    print(f"\nTest split ({len(data.test.labels)} images), {args.threads} thread(s), all models timed interleaved; "
          f"QAT {row['qat_epochs']} epochs ({row['loss']}), {row['train_seconds']} s of training:")
    print("| model | test top-1 | change vs fp32 (pts, 95% CI) | " + " | ".join(
        f"p50 / fp32 bs{b}" for b in args.batch_sizes) + " |")
    print("|---|---|---|" + "---|" * len(args.batch_sizes))
    table = []
    for label, key in zip(models, keys):
        m = res["models"][key]
        ch = paired_accuracy(res["correct"][keys[0]], res["correct"][key])
        ratios = [m["latency_ms"][str(b)]["p50"] / fp32["latency_ms"][str(b)]["p50"] for b in args.batch_sizes]
        table.append({"model": label, "path": str(models[label]), "top1": m["accuracy"]["top1"], "change": ch,
                      "latency_ratio": dict(zip(map(str, args.batch_sizes), ratios))})
        lo, hi = ch["ci95_pts"]
        print(f"| {label} | {100 * m['accuracy']['top1']:.2f}% | {ch['change_pts']:+.2f} [{lo:+.2f}, {hi:+.2f}] | "
              + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"table": table, "qat": row, "settings": res["settings"]}, indent=1,
                                              default=str))


if __name__ == "__main__":
    main()
