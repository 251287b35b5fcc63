"""``distill2deploy validate``: a pipeline's models (given a config or run directory), or ONNX files, measured
in onnxruntime as the validate stage does (each model preprocessed as its metadata records)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import _io
from ..config import ValidateConfig
from ..deploy.runtimes import RUNTIMES
from ..errors import UserError
from ._common import is_onnx, require, threads
from .run import print_verdicts, run_config

EXAMPLES = """examples:
  distill2deploy validate mobilenet.yaml                 # the pipeline's validate stage
  distill2deploy validate exports/mobilenet -o validate.runs=500   # a run directory (its config.yaml)
  distill2deploy validate resnet56.onnx resnet56.int8.onnx --data npz:sample.npz --json results.json
  distill2deploy validate r56.onnx r56.int8.onnx --data npz:sample.npz --runtime onnxruntime openvino"""


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    v = ValidateConfig()
    p = sub.add_parser("validate", parents=parents, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=EXAMPLES, help="accuracy and latency in onnxruntime: a pipeline's models, or ONNX files")
    p.add_argument("config", nargs="+", help="YAML config, a run directory, or one or more .onnx files")
    p.add_argument("--data", metavar="SOURCE", help="data source (its test split)")
    p.add_argument("--json", metavar="OUT.json", help="write the results as JSON")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=list(v.batch_sizes))
    p.add_argument("--runs", type=int, default=v.runs, help=f"timed runs per batch size (default {v.runs})")
    p.add_argument("--warmup", type=int, default=v.warmup)
    p.add_argument("--root", help="root for the 'cifar100' source (default $D2D_DATA)")
    p.add_argument("--runtime", nargs="+", choices=RUNTIMES, metavar="RUNTIME",
                   help="runtimes to measure in (onnxruntime, openvino), side by side; the first is the reference "
                   "(default onnxruntime; with a config: validate.runtimes)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if not all(is_onnx(p) for p in args.config):
        if len(args.config) != 1 or any(is_onnx(p) for p in args.config):
            raise UserError("give either one YAML config or one or more .onnx files", where="validate")
        args.config = args.config[0]
        return run_config(args, "validate")
    require(args.data, "--data SOURCE", "validate")
    if args.json:
        _io.check_writable(args.json, "--json")
        _io.refuse_overwrite(args.json, args.config, "--json")
    from ..data import load_source
    from ..deploy.metadata import read_metadata
    from ..deploy.validate import per_model_inputs, validate_models

    metas = [read_metadata(p) for p in args.config]  # fail early, before any timing, on a file without our metadata
    data = load_source(args.data, root=args.root, need_train=False, num_classes=metas[0].get("num_classes"),
                       num_classes_key=f"num_classes in the metadata of {args.config[0]}")
    result = validate_models([Path(p) for p in args.config], per_model_inputs(data.test.images), data.test.labels,
                             batch_sizes=args.batch_sizes, warmup=args.warmup, runs=args.runs,
                             threads=threads(args), class_names=data.class_names, named=data.named,
                             runtimes=args.runtime or ["onnxruntime"])
    runtimes = {result["settings"]["runtime"]: result["models"], **result.get("runtimes", {})}
    for runtime, models in runtimes.items():
        for stem, m in models.items():
            lat = " ".join(f"p50@bs{bs} {v['p50']:.3f} ms" for bs, v in m["latency_ms"].items())
            print(f"{stem} [{runtime}]: top-1 {100 * m['accuracy']['top1']:.2f}% top-5 "
                  f"{100 * m['accuracy']['top5']:.2f}% (n={m['accuracy']['n']}) {lat} "
                  f"size {result['models'][stem]['bytes'] / 1e6:.2f} MB")
    print_verdicts(result)
    if args.json:
        _io.write_json(args.json, result)
    return 0
