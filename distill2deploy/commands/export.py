"""``distill2deploy export``: a pipeline's models (given a config), or one timm model (``--model``), to ONNX
through the export stage's own function (:func:`~distill2deploy.deploy.export.export_classifier`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import _io
from ..config import ExportConfig
from ..errors import UserError
from ._common import check_input_size, require, threads
from .run import run_config

EXAMPLES = """examples:
  distill2deploy export mobilenet.yaml                   # the pipeline's export stage
  distill2deploy export --model resnet56_cifar --checkpoint resnet56.pth --num-classes 100 --out resnet56.onnx
  distill2deploy export --model resnet56_cifar --checkpoint resnet56.pth --data npz:sample.npz --out r56.onnx
  distill2deploy export --model shufflenetv2_cifar --random-init --num-classes 10 --out sv2.onnx   # latency only"""


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    defaults = ExportConfig()
    p = sub.add_parser("export", parents=parents, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=EXAMPLES, help="export ONNX: a pipeline's models, or one timm model (--model)")
    p.add_argument("config", nargs="?", help="YAML config (omit when using --model)")
    p.add_argument("--model", help="timm model name (standalone export)")
    p.add_argument("--checkpoint", help="weights to load (strict)")
    p.add_argument("--random-init", action="store_true",
                   help="export with timm's random initialisation (no --checkpoint, no pretrained weights): "
                   "a graph for latency benchmarks, its predictions are meaningless")
    p.add_argument("--num-classes", type=int, default=100, help="classifier size (default 100)")
    p.add_argument("--input-size", type=int, default=32, help="input side in pixels (default 32)")
    p.add_argument("--data", metavar="SOURCE", help="data source: class names and parity check on its test images")
    p.add_argument("--parity-samples", type=int, default=defaults.parity_samples,
                   help=f"test images of --data for the PyTorch-vs-onnxruntime parity check (default "
                   f"{defaults.parity_samples}, as export.parity_samples)")
    p.add_argument("--mean", type=float, nargs=3, help="normalisation mean recorded in metadata (default CIFAR-100)")
    p.add_argument("--std", type=float, nargs=3, help="normalisation std recorded in metadata (default CIFAR-100)")
    p.add_argument("--opset", type=int, default=defaults.opset, help=f"ONNX opset (default {defaults.opset})")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.config and not args.model:
        if args.random_init:
            raise UserError("--random-init is for a standalone export (--model NAME)", where="export --random-init",
                            fix="drop --random-init: a pipeline exports the weights it trained")
        return run_config(args, "export")
    require(args.model, "--model NAME (or a config)", "export")
    require(args.out, "--out FILE.onnx", "export")
    if args.random_init and args.checkpoint:
        raise UserError("--random-init and --checkpoint exclude each other", where="export",
                        fix="drop --random-init to export the checkpoint's weights")
    n_threads = threads(args)
    _io.check_writable(args.out, "--out")
    _io.refuse_overwrite(args.out, [args.checkpoint], "--out")
    check_input_size(args.input_size, "--input-size")
    if args.parity_samples < 1:
        raise UserError(f"--parity-samples must be >= 1, got {args.parity_samples}", where="--parity-samples",
                        fix="e.g. --parity-samples 256")
    from .._threads import use_threads
    from ..config import MIN_OPSET, max_opset
    from ..config_checks import check_normalization
    from ..data import load_source
    from ..deploy.export import export_classifier
    from ..models import CIFAR100_MEAN, CIFAR100_STD

    if not MIN_OPSET <= args.opset <= max_opset():
        raise UserError(f"opset {args.opset} is outside what the exporter writes", where="--opset",
                        fix=f"use --opset {MIN_OPSET}..{max_opset()}")
    use_threads(n_threads)
    mean, std = args.mean or list(CIFAR100_MEAN), args.std or list(CIFAR100_STD)
    check_normalization(mean, std, where="--mean/--std")
    class_names, test_images = [f"class_{i}" for i in range(args.num_classes)], None
    if args.data:
        src = load_source(args.data, need_train=False, num_classes=args.num_classes, num_classes_key="--num-classes")
        if src.num_classes != args.num_classes:
            raise UserError(f"--data has {src.num_classes} classes but --num-classes is {args.num_classes}",
                            where="export", fix=f"pass --num-classes {src.num_classes}")
        class_names, test_images = src.class_names, src.test.images
    model = _standalone_model(args)
    cfg_hash = _io.obj_sha256({"model": args.model, "checkpoint": _io.file_sha256(args.checkpoint)
                               if args.checkpoint else None, "mean": mean, "std": std, "size": args.input_size,
                               **({"init": "random"} if args.random_init else {})})
    info = export_classifier(model, Path(args.out), model_name=args.model, class_names=class_names, mean=mean,
                             std=std, input_size=args.input_size, opset=args.opset, config_hash=cfg_hash,
                             test_images=test_images, parity_samples=args.parity_samples, threads=n_threads)
    print(json.dumps(info, indent=2))
    return 0


def _standalone_model(args: argparse.Namespace) -> object:
    """The model of a standalone export: --checkpoint's weights, timm's pretrained ones, or (--random-init)
    a seeded random initialisation; a model without pretrained weights needs one of the two flags."""
    from ..models.factory import check_model_name, create_model, has_pretrained, random_init_model

    check_model_name(args.model, "--model")
    if args.random_init:
        return random_init_model(args.model, num_classes=args.num_classes)
    if args.checkpoint is None and not has_pretrained(args.model):
        raise UserError(f"no pretrained weights are registered for {args.model!r}", where="export --model",
                        fix="pass --checkpoint FILE with trained weights, or --random-init to export randomly "
                        "initialised weights (for latency benchmarks only)")
    return create_model(args.model, num_classes=args.num_classes, checkpoint=args.checkpoint,
                        pretrained=args.checkpoint is None)
