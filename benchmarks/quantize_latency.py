"""fp32 vs INT8 for every student, in onnxruntime and OpenVINO: CPU and wall time, ratios to onnxruntime fp32.

Run by hand (numbers depend on the CPU and its load; nothing here asserts on time):

    nice -n 10 python benchmarks/quantize_latency.py \
        --trained mobilenetv2_x0_5_cifar=exports/benchmarks/methods/cpu-2h/runs/kd_s0 \
        --data folder:~/.cache/distill2deploy/cifar10_jpeg

Latency graphs: each student is exported with seeded random weights (as ``distill2deploy export
--random-init``) and quantized with the project's INT8 settings (``--variants`` adds others), so
every architecture is timed even where no trained model exists; a ``--trained`` run's own files are
timed beside them (they should match their random twin). Accuracy comes from the ``--trained`` runs
on the full test split of ``--data``, in every runtime.

Timing: per model and batch size, every configuration (file x runtime) runs in blocks of equal CPU
duration, interleaved in ``--rounds`` rounds with the order rotated each round, so load on a shared
machine hits all alike. Each block records process CPU time (the runtimes' own threads included)
and wall time per run; the table gives the median over rounds, the spread ((max - min) / median of
the per-round figures) and the ratio to onnxruntime fp32 of the same model (the median of the
per-round ratios). ``--threads`` (default 1) is every runtime's intra-op thread count. OpenVINO runs
as the project's sessions do (a static-batch compilation per batch size) and, for comparison, with
one dynamic-batch compilation (``--ov-shapes``); each thread's CPU ticks (from /proc) show whether a
runtime's CPU time is spent on the calling thread or in a pool of its own.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import distill2deploy  # noqa: F401  (registers the *_cifar models with timm)
from distill2deploy import _io
from distill2deploy.deploy import build_metadata, export_onnx, quantize_int8
from distill2deploy.deploy.benchmark import block_timer
from distill2deploy.deploy.evaluate import accuracy, make_session, run_batched
from distill2deploy.deploy.latency import spread
from distill2deploy.deploy.machine import describe, fingerprint
from distill2deploy.deploy.metadata import read_metadata
from distill2deploy.deploy.regression import paired_accuracy
from distill2deploy.deploy.runtimes import STATIC_BATCHES, OpenVinoSession, runtime_version
from distill2deploy.deploy.validate import check_classes
from distill2deploy.models.factory import random_init_model

STUDENTS = ["mobilenetv2_x0_5_cifar", "shufflenetv1_cifar", "shufflenetv2_cifar", "resnet20_cifar", "resnet8x4_cifar"]
# name -> quantize_int8 keyword arguments ("default" = the pipeline's quantize stage defaults)
VARIANTS: dict[str, dict] = {
    "default": dict(activation_type="uint8", weight_type="int8", per_channel=True, preprocess=True),
    "per-tensor": dict(activation_type="uint8", weight_type="int8", per_channel=False, preprocess=True),
    "s8s8": dict(activation_type="int8", weight_type="int8", per_channel=True, preprocess=True),
    # depthwise convs kept in float (onnxruntime's INT8 depthwise kernel is slower than its fp32 one)
    "dw-float": dict(activation_type="uint8", weight_type="int8", per_channel=True, preprocess=True,
                     nodes_to_exclude="depthwise"),
}
#: the issue's target for the MobileNetV2 student: INT8 on the best runtime vs onnxruntime fp32
TARGET = {"model": "mobilenetv2_x0_5_cifar", "ratio": {"1": 0.8, "64": 0.5}, "max_drop_pts": 0.3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=STUDENTS, help="timm model names exported with random weights")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS), help="INT8 settings")
    p.add_argument("--runtimes", nargs="+", default=["onnxruntime", "openvino"])
    p.add_argument("--ov-hints", nargs="+", default=["LATENCY"], choices=["LATENCY", "THROUGHPUT"],
                   help="OpenVINO PERFORMANCE_HINTs to time (each one a configuration)")
    p.add_argument("--ov-shapes", nargs="+", default=["static", "dynamic"], choices=["static", "dynamic"],
                   help="OpenVINO compilations to time: static (per batch size, what sessions use) and the "
                   "dynamic-batch one (each one a configuration)")
    p.add_argument("--trained", action="append", default=[], metavar="MODEL=RUN_DIR",
                   help="a pipeline run of MODEL (its export/student.onnx and quantize/student.int8.onnx): "
                   "timed too, and its top-1 measured on --data (repeatable)")
    p.add_argument("--data", help="data source for the trained runs' top-1 (its full test split)")
    p.add_argument("--batch-sizes", nargs="+", default=["1", "64"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--block-seconds", type=float, default=0.1, help="CPU seconds per timed block")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=Path("exports/benchmarks/quantize_latency"))
    return p.parse_args(argv)


def export_random(name: str, out_dir: Path, args: argparse.Namespace, variants: list[str]) -> dict[str, Path]:
    """fp32 and INT8 files of ``name`` with seeded random weights (``export --random-init``)."""
    model = random_init_model(name, num_classes=args.num_classes).eval()
    meta = build_metadata(model_name=name, class_names=[str(i) for i in range(args.num_classes)], mean=[0.5] * 3,
                          std=[0.25] * 3, input_size=args.input_size, config_hash="random-init")
    files = {"fp32": out_dir / f"{name}.onnx"}
    export_onnx(model, files["fp32"], input_size=args.input_size, metadata=meta, threads=args.threads)
    calib = np.random.default_rng(0).standard_normal((256, 3, args.input_size, args.input_size), dtype=np.float32)
    for v in variants:
        files[f"int8-{v}"] = out_dir / f"{name}.{v}.int8.onnx"
        kwargs = dict(VARIANTS[v])
        if kwargs.get("nodes_to_exclude") == "depthwise":
            kwargs["nodes_to_exclude"] = depthwise_convs(files["fp32"])
        quantize_int8(files["fp32"], files[f"int8-{v}"], calib, calib_batch_size=32, threads=args.threads, **kwargs)
    return files


def depthwise_convs(path: Path) -> list[str]:
    """Names of the grouped (depthwise) Conv nodes of an ONNX file."""
    import onnx

    return [n.name for n in onnx.load(str(path)).graph.node
            if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]


def sessions(files: dict[str, Path], args: argparse.Namespace) -> dict[tuple[str, str], Any]:
    """One session per (file label, runtime label): onnxruntime, and OpenVINO once per hint and shape."""
    out = {}
    for label, path in files.items():
        for runtime in args.runtimes:
            if runtime == "openvino":
                for hint, shapes in itertools.product(args.ov_hints, args.ov_shapes):
                    tag = "-".join(["openvino"] + [hint.lower()] * (hint != "LATENCY") + ["dynamic"] * (shapes == "dynamic"))
                    out[(label, tag)] = OpenVinoSession(path, threads=args.threads, hint=hint,
                                                        static_batches=STATIC_BATCHES if shapes == "static" else 0)
            else:
                out[(label, runtime)] = make_session(path, threads=args.threads, runtime=runtime)
    return out


def thread_ticks() -> dict[str, int]:
    """CPU clock ticks (user + system) of each thread of this process, from /proc (empty elsewhere):
    shows whether a runtime's CPU time is spent on the calling thread or in its own pool."""
    out = {}
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[tid] = int(fields[11]) + int(fields[12])
    return out


def time_model(sess: dict[tuple[str, str], Any], bs: int, args: argparse.Namespace) -> dict[tuple[str, str], dict]:
    """Interleaved rounds of equal-CPU-duration blocks; per configuration: per-round CPU and wall ms per run."""
    x = np.random.default_rng(0).standard_normal((bs, 3, args.input_size, args.input_size), dtype=np.float32)
    timers = {k: block_timer(s, x, time.process_time) for k, s in sess.items()}
    plan = {}
    for k, run in timers.items():
        run(3)  # warm-up: arenas, kernel choice
        cpu = float(np.median([run(1)[1] for _ in range(3)]))
        plan[k] = max(1, round(args.block_seconds / max(cpu, 1e-6)))
    rounds = {k: {"cpu_ms": [], "wall_ms": []} for k in timers}
    ticks = {k: {"calling": 0, "other": 0} for k in timers}
    me = str(threading.get_native_id())
    keys = list(timers)
    for r in range(args.rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:  # rotate the order: no config always goes first
            t0 = thread_ticks()
            wall, cpu = timers[k](plan[k], True)
            for tid, t in thread_ticks().items():
                ticks[k]["calling" if tid == me else "other"] += t - t0.get(tid, 0)
            rounds[k]["cpu_ms"].append(cpu * 1e3)
            rounds[k]["wall_ms"].append(wall * 1e3)
    ref = rounds[("fp32", "onnxruntime")]
    out = {}
    for k, v in rounds.items():
        out[k] = {**{f"{c}_median": float(np.median(v[c])) for c in ("cpu_ms", "wall_ms")},
                  **{f"{c}_spread": spread(v[c]) for c in ("cpu_ms", "wall_ms")},
                  **{f"{c}_ratio": float(np.median(np.asarray(v[c]) / np.asarray(ref[c]))) for c in ("cpu_ms", "wall_ms")},
                  "cpu_ratio_spread": spread(np.asarray(v["cpu_ms"]) / np.asarray(ref["cpu_ms"])),
                  "runs_per_block": plan[k], "thread_ticks": ticks[k], "rounds": v}
    return out


def trained_accuracy(run_dir: Path, source: str, args: argparse.Namespace) -> dict[str, Any]:
    """Top-1 of a run's fp32 and INT8 student on the full test split, in every runtime, with paired changes."""
    from distill2deploy.data import load_source, preprocess

    files = {"fp32": run_dir / "export" / "student.onnx", "int8-default": run_dir / "quantize" / "student.int8.onnx"}
    meta = read_metadata(files["fp32"])
    src = load_source(source, need_train=False)
    check_classes(meta, src.class_names, src.named, files["fp32"])  # other classes would score nonsense
    test = src.test
    x = preprocess(test.images, mean=meta["mean"], std=meta["std"], input_size=meta["input_size"])
    correct, out = {}, {}
    for label, path in files.items():
        for runtime in args.runtimes:
            logits = run_batched(make_session(path, threads=args.threads, runtime=runtime), x, 256)
            correct[(label, runtime)] = logits.argmax(1) == test.labels
            out[f"{label} {runtime}"] = accuracy(logits, test.labels)
            print(f"  top-1 {label:<13} {runtime:<12} {100 * out[f'{label} {runtime}']['top1']:.2f}%", file=sys.stderr)
    changes = {f"{a[0]} {a[1]} -> {b[0]} {b[1]}": paired_accuracy(correct[a], correct[b])
               for a in correct for b in correct if a < b}
    return {"files": {k: str(v) for k, v in files.items()}, "top1": out, "paired": changes}


def table(results: dict[str, Any], batch_sizes: list[str]) -> list[str]:
    head = f"{'model':<34}{'file':<17}{'runtime':<22}" + "".join(
        f"{'cpu ms@' + b:>11}{'±':>5}{'x ort32':>8}{'wall ms':>9}{'x ort32':>8}" for b in batch_sizes) + f"{'top-1':>8}"
    lines = [head, "-" * len(head)]
    for model, m in results["models"].items():
        for key in m["timing"][batch_sizes[0]]:
            label, runtime = key.split(" | ")
            acc = m.get("accuracy", {}).get("top1", {}).get(f"{label} {runtime}")
            line = f"{model:<34}{label:<17}{runtime:<22}"
            for b in batch_sizes:
                t = m["timing"][b][key]
                line += (f"{t['cpu_ms_median']:>11.3f}{100 * t['cpu_ms_spread']:>4.0f}%{t['cpu_ms_ratio']:>8.2f}"
                         f"{t['wall_ms_median']:>9.3f}{t['wall_ms_ratio']:>8.2f}")
            lines.append(line + (f"{100 * acc['top1']:>7.2f}%" if acc else f"{'-':>8}"))
    return lines


def verdict(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The issue's target for the MobileNetV2 student, on each runtime's default-INT8 file, judged on CPU time."""
    lines = []
    for model, m in results["models"].items():
        if not model.startswith(TARGET["model"]):
            continue
        acc = m.get("accuracy")
        for runtime in {k.split(" | ")[1] for k in m["timing"][args.batch_sizes[0]]}:
            key = f"int8-default | {runtime}"
            ratios = {b: m["timing"][b][key]["cpu_ms_ratio"] for b in TARGET["ratio"] if b in m["timing"]}
            ok = all(r <= TARGET["ratio"][b] for b, r in ratios.items())
            text = ", ".join(f"{r:.2f}x @bs{b} (target <= {TARGET['ratio'][b]})" for b, r in ratios.items())
            drop = ""
            rt = runtime.split("-")[0]
            if acc and f"fp32 {rt} -> int8-default {rt}" in acc["paired"]:
                c = acc["paired"][f"fp32 {rt} -> int8-default {rt}"]
                ok = ok and c["change_pts"] >= -TARGET["max_drop_pts"]
                drop = (f"; top-1 {c['change_pts']:+.2f} pts [95% CI {c['ci95_pts'][0]:+.2f}, {c['ci95_pts'][1]:+.2f}] "
                        f"(target >= -{TARGET['max_drop_pts']})")
            lines.append(f"target {model} INT8 on {runtime}: {text}{drop}: {'MET' if ok else 'MISSED'}")
        best = {b: min((t["cpu_ms_ratio"], k.split(" | ")[1]) for k, t in m["timing"][b].items()
                       if k.startswith("int8-default | ")) for b in TARGET["ratio"] if b in m["timing"]}
        lines.append(f"fastest INT8 runtime per batch size for {model}: "
                     + ", ".join(f"bs{b} {rt} {r:.2f}x" for b, (r, rt) in best.items()))
    return lines


def thread_lines(results: dict[str, Any]) -> list[str]:
    """Where each runtime's CPU time went: the calling thread or the runtime's own threads (from /proc)."""
    ticks: dict[str, list[int]] = {}
    for m in results["models"].values():
        for per_bs in m["timing"].values():
            for key, t in per_bs.items():
                c = ticks.setdefault(key.split(" | ")[1], [0, 0])
                c[0] += t["thread_ticks"]["calling"]
                c[1] += t["thread_ticks"]["other"]
    return ["CPU time on the calling thread: " + ", ".join(
        f"{rt} {100 * a / max(a + b, 1):.1f}% ({a + b} ticks)" for rt, (a, b) in ticks.items())]


def plot(results: dict[str, Any], batch_sizes: list[str], path: Path) -> None:
    """CPU-time ratio to onnxruntime fp32 per model and configuration, one panel per batch size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = list(results["models"])
    keys = [k for k in results["models"][models[0]]["timing"][batch_sizes[0]] if k != "fp32 | onnxruntime"]
    fig = Figure(figsize=(6 * len(batch_sizes), 0.5 * len(models) * len(keys) / 2 + 2.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(batch_sizes), squeeze=False)[0]
    h = 0.8 / len(keys)
    for ax, b in zip(axes, batch_sizes):
        for j, key in enumerate(keys):
            ys = np.arange(len(models)) + j * h
            vals = [results["models"][m]["timing"][b].get(key, {}).get("cpu_ms_ratio", np.nan) for m in models]
            err = [results["models"][m]["timing"][b].get(key, {}).get("cpu_ratio_spread", 0) / 2 * v
                   for m, v in zip(models, vals)]
            ax.barh(ys, vals, height=h, xerr=err, label=key.replace(" | ", " on "), capsize=2)
        ax.axvline(1.0, color="0.3", lw=1)
        if b in TARGET["ratio"]:
            ax.axvline(TARGET["ratio"][b], color="tab:red", ls="--", lw=1, label=f"target {TARGET['ratio'][b]}x (MobileNetV2)")
        ax.set_yticks(np.arange(len(models)) + 0.4 - h / 2, models, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"CPU time per batch of {b} / onnxruntime fp32 (lower is faster)")
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"fp32 and INT8 across runtimes, {results['threads']} thread(s): {results['machine_line']}", fontsize=9)
    fig.tight_layout()
    with _io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for r in args.runtimes:
        runtime_version(r)  # a missing OpenVINO: the install message now, not after the exports
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    work = tempfile.TemporaryDirectory(prefix="d2d-qlat-")
    trained = dict(t.split("=", 1) for t in args.trained)
    results: dict[str, Any] = {"threads": args.threads, "rounds": args.rounds, "block_seconds": args.block_seconds,
                               "versions": {r: runtime_version(r) for r in args.runtimes},
                               "machine": fingerprint(args.threads), "models": {}}
    results["machine_line"] = describe(results["machine"])
    for name in args.models + [f"{m} (trained)" for m in trained]:
        t0 = time.perf_counter()
        if name.endswith(" (trained)"):
            run = Path(trained[name[: -len(" (trained)")]]).expanduser()
            files = {"fp32": run / "export" / "student.onnx", "int8-default": run / "quantize" / "student.int8.onnx"}
        else:
            files = export_random(name, Path(work.name), args, args.variants)
        sess = sessions(files, args)
        timing = {}
        for b in args.batch_sizes:
            timing[b] = {f"{k[0]} | {k[1]}": v for k, v in time_model(sess, int(b), args).items()}
        results["models"][name] = {"files": {k: str(v) for k, v in files.items()}, "timing": timing}
        if name.endswith(" (trained)") and args.data:
            results["models"][name]["accuracy"] = trained_accuracy(run, args.data, args)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    lines = table(results, args.batch_sizes)
    lines += ["", f"{args.rounds} interleaved rounds of ~{args.block_seconds:g} s CPU per configuration and batch size; "
              f"cpu = process CPU ms per run (median over rounds, ± its spread), x ort32 = median per-round ratio to "
              f"onnxruntime fp32 of the same model; {args.threads} intra-op thread(s) in every runtime "
              f"({', '.join(f'{k} {v}' for k, v in results['versions'].items())}); {results['machine_line']}"]
    lines += thread_lines(results) + verdict(results, args)
    print("\n".join(lines))
    results["table"] = lines
    _io.write_json(args.out_dir / "results.json", results)
    _io.write_text(args.out_dir / "results.md", "```\n" + "\n".join(lines) + "\n```\n")
    plot(results, args.batch_sizes, args.out_dir / "quantize_latency.png")
    print(f"wrote {args.out_dir}/results.json, results.md, quantize_latency.png", file=sys.stderr)
    work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
