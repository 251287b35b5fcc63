"""``distill2deploy quantize``: a pipeline's student (given a config), or one ONNX file, to static INT8, calibrated
as the quantize stage does (:func:`~distill2deploy.deploy.quantize.calibration_inputs`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import _io
from ..config import PipelineConfig, QuantizeConfig
from ..errors import UserError
from ._common import is_onnx, require, threads
from .run import run_config

EXAMPLES = """examples:
  distill2deploy quantize mobilenet.yaml                 # the pipeline's quantize stage
  distill2deploy quantize resnet56.onnx --data npz:sample.npz --out resnet56.int8.onnx --calib-samples 480
  distill2deploy quantize resnet56.onnx --data npz:sample.npz --out resnet56.int8.onnx --search --max-drop 1.0"""


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    q, seed = QuantizeConfig(), PipelineConfig().seed
    p = sub.add_parser("quantize", parents=parents, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=EXAMPLES, help="INT8-quantize: a pipeline's student, or one ONNX file")
    p.add_argument("config", help="YAML config, or an .onnx file exported by distill2deploy")
    p.add_argument("--data", metavar="SOURCE", help="calibration data source (its train split)")
    p.add_argument("--calib-samples", type=int, default=q.calib_samples,
                   help=f"calibration images (default {q.calib_samples})")
    p.add_argument("--calib-batch-size", type=int, default=q.calib_batch_size,
                   help=f"calibration batch size (default {q.calib_batch_size})")
    p.add_argument("--seed", type=int, default=seed, help=f"seed of the calibration subset (default {seed}, as the "
                   "config's seed)")
    p.add_argument("--activation-type", choices=["uint8", "int8"], default=q.activation_type)
    p.add_argument("--calibrate-method", choices=["minmax", "entropy", "percentile"], default=q.calibrate_method)
    p.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel weight scales")
    p.add_argument("--search", action="store_true", help="search calibration, weight granularity and float nodes "
                   "on held-out training images and quantize.search_views unseen views of each; keep the fastest whose 95%% "
                   "bound of the drop is within --max-drop (config: quantize.search)")
    p.add_argument("--max-drop", type=float, default=None, metavar="POINTS",
                   help=f"with --search: top-1 points the INT8 model may lose against fp32 (default {q.max_drop})")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.max_drop is not None and not args.search:
        raise UserError("--max-drop is the budget of the search", where="--max-drop", fix="add --search")
    if args.max_drop is not None and args.max_drop < 0:
        raise UserError(f"--max-drop must be >= 0, got {args.max_drop}", where="--max-drop", fix="e.g. --max-drop 1.0")
    ignored = [flag for flag, value, default in (
        ("--calib-samples", args.calib_samples, QuantizeConfig().calib_samples),
        ("--calibrate-method", args.calibrate_method, QuantizeConfig().calibrate_method),
        ("--activation-type", args.activation_type, QuantizeConfig().activation_type),
        ("--per-tensor", args.per_tensor, False)) if value != default]
    if args.search and ignored:  # the search chooses these itself: a silently dropped flag would mislead
        raise UserError(f"{', '.join(ignored)} would be ignored: the search tries its own candidates", where="--search",
                        fix="drop those flags (the quantize.search_* config keys set the candidates), or drop --search")
    if not is_onnx(args.config):
        args.overrides = list(args.overrides) + (["quantize.search=true"] if args.search else []) + (
            [f"quantize.max_drop={args.max_drop}"] if args.max_drop is not None else [])
        return run_config(args, "quantize")
    require(args.data, "--data SOURCE", "quantize")
    require(args.out, "--out FILE.int8.onnx", "quantize")
    _io.check_writable(args.out, "--out")
    _io.refuse_overwrite(args.out, [args.config], "--out")
    from ..data import load_source
    from ..deploy.metadata import read_metadata
    from ..deploy.quantize import calibration_inputs, quantize_int8

    meta = read_metadata(args.config)
    train = load_source(args.data, need_train=True, num_classes=meta.get("num_classes"),
                        num_classes_key=f"num_classes in the metadata of {args.config}").train
    if args.search:
        from ..config import ValidateConfig
        from ..deploy.quantize_search import search_from_config

        q = QuantizeConfig(calib_batch_size=args.calib_batch_size,
                           max_drop=QuantizeConfig().max_drop if args.max_drop is None else args.max_drop)
        info = search_from_config(args.config, Path(args.out), images=train.images, labels=train.labels, q=q,
                                  mean=meta["mean"], std=meta["std"], input_size=meta["input_size"], seed=args.seed,
                                  threads=threads(args), batch_sizes=ValidateConfig().batch_sizes)
        print(json.dumps(info, indent=2))
        return 0
    calib = calibration_inputs(train, samples=args.calib_samples, batch_size=args.calib_batch_size, seed=args.seed,
                               mean=meta["mean"], std=meta["std"], input_size=meta["input_size"],
                               batch_key="--calib-batch-size")
    info = quantize_int8(args.config, Path(args.out), calib, calib_batch_size=args.calib_batch_size,
                         activation_type=args.activation_type, per_channel=not args.per_tensor,
                         calibrate_method=args.calibrate_method, threads=threads(args))
    print(json.dumps(info, indent=2))
    return 0
