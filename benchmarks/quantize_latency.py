"""Compare INT8 quantization settings in onnxruntime: top-1 and CPU latency relative to fp32.

Run by hand (numbers depend on the CPU and its load; nothing here asserts on time):

    python benchmarks/quantize_latency.py --model resnet56_cifar \
        --weights ../shared/weights/cifar100_resnet56.pth \
        --data ../shared/data/cifar100_sample.npz

Exports the model once, quantizes it with each settings variant (U8S8 vs S8S8, per-channel on/off,
quant_pre_process on/off), then times fp32 and all variants *interleaved* in the same run so that
the ratios to fp32 are fair on a machine with background load.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import distill2deploy  # noqa: F401  (registers the *_cifar models with timm)
from distill2deploy.deploy import accuracy, build_metadata, export_onnx, predict_onnx, quantize_int8
from distill2deploy.deploy.latency import measure_latency_many

CIFAR100_MEAN, CIFAR100_STD = (0.5070, 0.4865, 0.4409), (0.2673, 0.2564, 0.2761)

# name -> quantize_int8 keyword arguments
VARIANTS: dict[str, dict] = {
    "u8s8-pc-pre": dict(activation_type="uint8", weight_type="int8", per_channel=True, preprocess=True),
    "u8s8-pc-nopre": dict(activation_type="uint8", weight_type="int8", per_channel=True, preprocess=False),
    "u8s8-pt-pre": dict(activation_type="uint8", weight_type="int8", per_channel=False, preprocess=True),
    "s8s8-pc-pre": dict(activation_type="int8", weight_type="int8", per_channel=True, preprocess=True),
    "s8s8-pt-pre": dict(activation_type="int8", weight_type="int8", per_channel=False, preprocess=True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet56_cifar", help="timm model name")
    p.add_argument("--weights", type=Path, help="state_dict to load (strict)")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--data", type=Path,
                   help="npz with x_train/y_train/x_test/y_test uint8 NHWC (calibration + top-1); "
                        "without it, calibration uses random inputs and top-1 is not reported")
    p.add_argument("--mean", type=float, nargs=3, default=CIFAR100_MEAN)
    p.add_argument("--std", type=float, nargs=3, default=CIFAR100_STD)
    p.add_argument("--calib-batch-size", type=int, default=32)
    p.add_argument("--calibrate-method", default="minmax")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    p.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "torchscript"])
    p.add_argument("--out-dir", type=Path, help="keep the .onnx files here (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import timm

    from distill2deploy.data import preprocess

    args = parse_args(argv)
    model = timm.create_model(args.model, num_classes=args.num_classes)
    if args.weights:
        model.load_state_dict(torch.load(args.weights, weights_only=True, map_location="cpu"), strict=True)
    model.eval()

    def prep(images: np.ndarray) -> np.ndarray:
        return preprocess(images, mean=args.mean, std=args.std, input_size=args.input_size)

    if args.data:
        data = np.load(args.data)
        x_calib, x_test, y_test = prep(data["x_train"]), prep(data["x_test"]), data["y_test"]
    else:
        rng = np.random.default_rng(0)
        x_calib = rng.standard_normal((256, 3, args.input_size, args.input_size), dtype=np.float32)
        x_test = y_test = None

    tmp = tempfile.TemporaryDirectory(prefix="d2d-bench-")
    out_dir = args.out_dir or Path(tmp.name)
    meta = build_metadata(model_name=args.model, class_names=[str(i) for i in range(args.num_classes)],
                          mean=args.mean, std=args.std, input_size=args.input_size, config_hash="benchmark")
    t0 = time.perf_counter()
    fp32 = out_dir / f"{args.model}.onnx"
    exp = export_onnx(model, fp32, input_size=args.input_size, metadata=meta, parity_inputs=x_test,
                      exporter=args.exporter)
    print(f"exported with {exp['exporter']} in {time.perf_counter() - t0:.1f}s, parity {exp['parity']}",
          file=sys.stderr)

    rows = {"fp32": {"path": fp32, "bytes": exp["bytes"]}}
    for name in args.variants:
        t0 = time.perf_counter()
        path = out_dir / f"{args.model}.{name}.int8.onnx"
        q = quantize_int8(fp32, path, x_calib, calib_batch_size=args.calib_batch_size,
                          calibrate_method=args.calibrate_method, **VARIANTS[name])
        rows[name] = {"path": path, "bytes": q["bytes"]}
        print(f"quantized {name} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if x_test is not None:
        for row in rows.values():
            row["top1"] = accuracy(predict_onnx(row["path"], x_test, threads=args.threads), y_test)["top1"]

    lats = measure_latency_many([r["path"] for r in rows.values()], input_sizes=[args.input_size] * len(rows),
                                batch_sizes=args.batch_sizes, warmup=args.warmup, runs=args.runs,
                                threads=args.threads)
    for row, lat in zip(rows.values(), lats):
        row["p50_ms"] = {bs: v["p50"] for bs, v in lat["latency_ms"].items()}
        row["settings"] = lat["settings"]

    bss = [str(b) for b in args.batch_sizes]
    head = f"{'variant':<16}{'MB':>6}{'top1':>8}" + "".join(f"{'p50@' + b:>11}{'x fp32':>8}" for b in bss)
    print(head)
    print("-" * len(head))
    ref = rows["fp32"]
    for name, row in rows.items():
        top1 = f"{100 * row['top1']:.2f}" if "top1" in row else "-"
        line = f"{name:<16}{row['bytes'] / 2**20:>6.2f}{top1:>8}"
        for b in bss:
            line += f"{row['p50_ms'][b]:>9.3f}ms{row['p50_ms'][b] / ref['p50_ms'][b]:>8.2f}"
        print(line)
    print(f"({ref['settings']['runs']} runs/batch size, threads={args.threads}, "
          f"onnxruntime {ref['settings']['onnxruntime']}, {ref['settings']['cpu_count']} CPUs)")
    if args.json:
        args.json.write_text(json.dumps({k: {**v, "path": str(v["path"])} for k, v in rows.items()}, indent=2))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
