"""Command line: ``python -m distill2deploy`` / ``distill2deploy``. Thin: parse, then call the library."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import _io
from .commands import check, serving
from .errors import UserError

STAGE_CMDS = ("teacher", "distill", "export", "quantize", "validate", "report")

EXAMPLES = {
    None: """examples:
  distill2deploy pipeline quickstart.yaml
  distill2deploy pipeline mobilenet.yaml -o data.source=npz:cifar100_sample.npz -o distill.epochs=30
  distill2deploy pipeline mobilenet.yaml --force quantize
  distill2deploy export --model resnet56_cifar --checkpoint resnet56.pth --out resnet56.onnx
  distill2deploy quantize resnet56.onnx --data cifar100 --out resnet56.int8.onnx
  distill2deploy validate resnet56.onnx resnet56.int8.onnx --data cifar100 --json results.json
  distill2deploy serve resnet56.onnx --port 8000
  distill2deploy predict resnet56.onnx cat.jpg --top-k 3
  distill2deploy check resnet56.int8.onnx --baseline baseline.json --data cifar100   # CI gate: exit 1 on regression""",
    "pipeline": """examples:
  distill2deploy pipeline quickstart.yaml            # ./quickstart.yaml or the bundled pipelines/quickstart.yaml
  distill2deploy pipeline mobilenet.yaml -o distill.method=ce -o seed=1 --out exports/mbv2_ce_seed1
  accelerate launch -m distill2deploy pipeline mobilenet.yaml   # many GPUs""",
    "teacher": "example:\n  distill2deploy teacher mobilenet.yaml -o teacher.checkpoint=resnet56.pth",
    "distill": "example:\n  distill2deploy distill mobilenet.yaml -o distill.epochs=10",
    "export": """examples:
  distill2deploy export mobilenet.yaml                   # the pipeline's export stage
  distill2deploy export --model resnet56_cifar --checkpoint resnet56.pth --num-classes 100 --out resnet56.onnx
  distill2deploy export --model resnet56_cifar --checkpoint resnet56.pth --data npz:sample.npz --out r56.onnx""",
    "quantize": """examples:
  distill2deploy quantize mobilenet.yaml                 # the pipeline's quantize stage
  distill2deploy quantize resnet56.onnx --data npz:sample.npz --out resnet56.int8.onnx --calib-samples 480
  distill2deploy quantize resnet56.onnx --data npz:sample.npz --out resnet56.int8.onnx --search --max-drop 1.0""",
    "validate": """examples:
  distill2deploy validate mobilenet.yaml                 # the pipeline's validate stage
  distill2deploy validate exports/mobilenet -o validate.runs=500   # a run directory (its config.yaml)
  distill2deploy validate resnet56.onnx resnet56.int8.onnx --data npz:sample.npz --json results.json""",
    "report": """examples:
  distill2deploy report mobilenet.yaml       # rewrite report.md/json and plots of a finished run
  distill2deploy report exports/mbv2_ce_seed1   # a run directory: its saved config.yaml and location""",
}


def _global_options(defaults: bool) -> argparse.ArgumentParser:
    """Options accepted before or after the subcommand (SUPPRESS keeps the subparser from resetting them)."""
    p = argparse.ArgumentParser(add_help=False)
    d = {} if defaults else {"default": argparse.SUPPRESS}
    p.add_argument("-o", "--override", dest="overrides", action="append", metavar="KEY.PATH=VALUE",
                   help="override a config key (repeatable), e.g. -o distill.epochs=5", **({"default": []} if defaults else d))
    p.add_argument("--out", metavar="PATH", help="run directory (default exports/<config name>/); "
                   "for standalone export/quantize: the output .onnx file", **({"default": None} if defaults else d))
    p.add_argument("--force", action="append", metavar="STAGE", help="rerun this stage even if cached (repeatable)",
                   **({"default": []} if defaults else d))
    p.add_argument("--debug", action="store_true", help="show full tracebacks", **({"default": False} if defaults else d))
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads per process for PyTorch and onnxruntime "
                   "(the config key 'threads'; default 1: shared cores do not collapse; serve: per model, default "
                   "CPUs - 1; export-triton: intra_op_thread_count per instance)",
                   **({"default": None} if defaults else d))
    return p


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="distill2deploy", parents=[_global_options(True)], formatter_class=fmt,
                                     description="Distil a timm classifier into a small student, quantize it to "
                                     "INT8 and validate it in onnxruntime.", epilog=EXAMPLES[None])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = [_global_options(False)]

    p = sub.add_parser("pipeline", parents=common, formatter_class=fmt, epilog=EXAMPLES["pipeline"],
                       help="run every stage of a pipeline config (cached stages are skipped)")
    p.add_argument("config", help="YAML config: a path, or the name of a bundled pipeline")

    for name, text in (("teacher", "build/fine-tune the teacher and record its accuracy"),
                       ("distill", "train the student (runs the teacher stage first if needed)"),
                       ("report", "write report.md/report.json and plots for a run")):
        p = sub.add_parser(name, parents=common, formatter_class=fmt, epilog=EXAMPLES[name], help=text)
        p.add_argument("config", help="YAML config, or a run directory (uses its saved config.yaml)")

    p = sub.add_parser("export", parents=common, formatter_class=fmt, epilog=EXAMPLES["export"],
                       help="export ONNX: a pipeline's models, or one timm model (--model)")
    p.add_argument("config", nargs="?", help="YAML config (omit when using --model)")
    p.add_argument("--model", help="timm model name (standalone export)")
    p.add_argument("--checkpoint", help="weights to load (strict)")
    p.add_argument("--num-classes", type=int, default=100, help="classifier size (default 100)")
    p.add_argument("--input-size", type=int, default=32, help="input side in pixels (default 32)")
    p.add_argument("--data", metavar="SOURCE", help="data source: class names and parity check on its test images")
    p.add_argument("--mean", type=float, nargs=3, help="normalisation mean recorded in metadata (default CIFAR-100)")
    p.add_argument("--std", type=float, nargs=3, help="normalisation std recorded in metadata (default CIFAR-100)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")

    p = sub.add_parser("quantize", parents=common, formatter_class=fmt, epilog=EXAMPLES["quantize"],
                       help="INT8-quantize: a pipeline's student, or one ONNX file")
    p.add_argument("config", help="YAML config, or an .onnx file exported by distill2deploy")
    p.add_argument("--data", metavar="SOURCE", help="calibration data source (its train split)")
    p.add_argument("--calib-samples", type=int, default=512, help="calibration images (default 512)")
    p.add_argument("--calib-batch-size", type=int, default=32, help="calibration batch size (default 32)")
    p.add_argument("--activation-type", choices=["uint8", "int8"], default="uint8")
    p.add_argument("--calibrate-method", choices=["minmax", "entropy", "percentile"], default="minmax")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel weight scales")
    p.add_argument("--search", action="store_true", help="search calibration, weight granularity and float nodes "
                   "on held-out training images; keep the fastest within --max-drop (config: quantize.search)")
    p.add_argument("--max-drop", type=float, default=None, metavar="POINTS",
                   help="with --search: top-1 points the INT8 model may lose against fp32 (default 1.0)")

    p = sub.add_parser("validate", parents=common, formatter_class=fmt, epilog=EXAMPLES["validate"],
                       help="accuracy and latency in onnxruntime: a pipeline's models, or ONNX files")
    p.add_argument("config", nargs="+", help="YAML config, a run directory, or one or more .onnx files")
    p.add_argument("--data", metavar="SOURCE", help="data source (its test split)")
    p.add_argument("--json", metavar="OUT.json", help="write the results as JSON")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--runs", type=int, default=200, help="timed runs per batch size (default 200)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--root", help="root for the 'cifar100' source (default $D2D_DATA)")
    serving.add_parsers(sub, common)
    check.add_parser(sub)
    return parser


def _is_onnx(path: str | None) -> bool:
    return bool(path) and str(path).endswith(".onnx")


def _run_config(args: argparse.Namespace, until: str) -> int:
    from .config import load_config
    from .pipeline import run_pipeline

    overrides = list(args.overrides) + ([f"threads={args.threads}"] if args.threads is not None else [])
    cfg, _ = load_config(args.config, overrides)
    out = args.out or (args.config if Path(args.config).is_dir() else None)  # a run directory: reuse it
    force = list(args.force) + (["report"] if args.command == "report" else [])
    ctx = run_pipeline(cfg, Path(out) if out else None, until=until, force=force)
    if ctx.is_main and until in ("validate", "report"):
        _print_int8(json.loads(ctx.output("validate", "results").read_text()))
    if ctx.is_main and until == "report":
        print(f"report: {ctx.run_dir / 'report.md'}")
    return 0


def _threads(args: argparse.Namespace) -> int:
    from ._threads import DEFAULT_THREADS

    threads = DEFAULT_THREADS if args.threads is None else args.threads
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}", where="--threads", fix="e.g. --threads 1")
    return threads


def _check_range(value: int, flag: str) -> None:
    from .config import MAX_INPUT_SIZE, MIN_INPUT_SIZE

    if not MIN_INPUT_SIZE <= value <= MAX_INPUT_SIZE:
        raise UserError(f"{value} is out of range", where=flag, fix=f"use {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE}")


def _print_int8(result: dict) -> None:
    from .deploy.int8_report import int8_lines, int8_summary

    for line in int8_lines(int8_summary(result), result.get("settings", {})):
        print(line)


def _require(value: object, flag: str, command: str) -> None:
    if value is None:
        raise UserError(f"{flag} is required", where=command, fix=f"see: distill2deploy {command} --help")


def _cmd_export(args: argparse.Namespace) -> int:
    if args.config and not args.model:
        return _run_config(args, "export")
    _require(args.model, "--model NAME (or a config)", "export")
    _require(args.out, "--out FILE.onnx", "export")
    threads = _threads(args)
    _io.check_writable(args.out, "--out")
    _io.refuse_overwrite(args.out, [args.checkpoint], "--out")
    _check_range(args.input_size, "--input-size")
    from ._threads import use_threads
    from .config import MIN_OPSET, max_opset
    from .models import CIFAR100_MEAN, CIFAR100_STD
    from .data import load_source, preprocess
    from .deploy.export import export_onnx
    from .deploy.metadata import build_metadata
    from .models.factory import create_model

    if not MIN_OPSET <= args.opset <= max_opset():
        raise UserError(f"opset {args.opset} is outside what the exporter writes", where="--opset",
                        fix=f"use --opset {MIN_OPSET}..{max_opset()}")
    use_threads(threads)
    mean, std = args.mean or list(CIFAR100_MEAN), args.std or list(CIFAR100_STD)
    class_names = [f"class_{i}" for i in range(args.num_classes)]
    parity = None
    if args.data:
        src = load_source(args.data, need_train=False, num_classes=args.num_classes, num_classes_key="--num-classes")
        if src.num_classes != args.num_classes:
            raise UserError(f"--data has {src.num_classes} classes but --num-classes is {args.num_classes}",
                            where="export", fix=f"pass --num-classes {src.num_classes}")
        class_names = src.class_names
        parity = preprocess(src.test.images[:1024], mean=mean, std=std, input_size=args.input_size)
    model = create_model(args.model, num_classes=args.num_classes, checkpoint=args.checkpoint,
                         pretrained=args.checkpoint is None)
    cfg_hash = _io.obj_sha256({"model": args.model, "checkpoint": _io.file_sha256(args.checkpoint)
                               if args.checkpoint else None, "mean": mean, "std": std, "size": args.input_size})
    meta = build_metadata(model_name=args.model, class_names=class_names, mean=mean, std=std,
                          input_size=args.input_size, config_hash=cfg_hash)
    info = export_onnx(model.eval(), Path(args.out), input_size=args.input_size, opset=args.opset, metadata=meta,
                       parity_inputs=parity, threads=threads)
    print(json.dumps(info, indent=2))
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    if args.max_drop is not None and not args.search:
        raise UserError("--max-drop is the budget of the search", where="--max-drop", fix="add --search")
    if args.max_drop is not None and args.max_drop < 0:
        raise UserError(f"--max-drop must be >= 0, got {args.max_drop}", where="--max-drop", fix="e.g. --max-drop 1.0")
    if not _is_onnx(args.config):
        args.overrides = list(args.overrides) + (["quantize.search=true"] if args.search else []) + (
            [f"quantize.max_drop={args.max_drop}"] if args.max_drop is not None else [])
        return _run_config(args, "quantize")
    _require(args.data, "--data SOURCE", "quantize")
    _require(args.out, "--out FILE.int8.onnx", "quantize")
    _io.check_writable(args.out, "--out")
    _io.refuse_overwrite(args.out, [args.config], "--out")
    from .data import load_source, preprocess, stratified_subset
    from .deploy.metadata import read_metadata
    from .deploy.quantize import quantize_int8

    meta = read_metadata(args.config)
    train = load_source(args.data, need_train=True, num_classes=meta.get("num_classes"),
                        num_classes_key=f"num_classes in the metadata of {args.config}").train
    bs = args.calib_batch_size
    n = min(args.calib_samples, len(train.labels)) // bs * bs
    if n == 0:
        raise UserError(f"the calibration set has {len(train.labels)} images, fewer than one batch of {bs}",
                        where="quantize", fix="lower --calib-batch-size")
    if args.search:
        from .config import QuantizeConfig, ValidateConfig
        from .deploy.quantize_search import search_from_config

        q = QuantizeConfig(calib_batch_size=bs, max_drop=1.0 if args.max_drop is None else args.max_drop)
        info = search_from_config(args.config, Path(args.out), images=train.images, labels=train.labels, q=q,
                                  mean=meta["mean"], std=meta["std"], input_size=meta["input_size"], seed=0,
                                  threads=_threads(args), batch_sizes=ValidateConfig().batch_sizes)
        print(json.dumps(info, indent=2))
        return 0
    idx = stratified_subset(train.labels, n, 0)
    calib = preprocess(train.images[idx], mean=meta["mean"], std=meta["std"], input_size=meta["input_size"])
    info = quantize_int8(args.config, Path(args.out), calib, calib_batch_size=bs,
                         activation_type=args.activation_type, per_channel=not args.per_tensor,
                         calibrate_method=args.calibrate_method, threads=_threads(args))
    print(json.dumps(info, indent=2))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    if not all(_is_onnx(p) for p in args.config):
        if len(args.config) != 1 or any(_is_onnx(p) for p in args.config):
            raise UserError("give either one YAML config or one or more .onnx files", where="validate")
        args.config = args.config[0]
        return _run_config(args, "validate")
    _require(args.data, "--data SOURCE", "validate")
    if args.json:
        _io.check_writable(args.json, "--json")
        _io.refuse_overwrite(args.json, args.config, "--json")
    from .data import load_source, preprocess
    from .deploy.validate import validate_models
    from .deploy.metadata import read_metadata

    metas = [read_metadata(p) for p in args.config]  # fail early, before any timing, on a file without our metadata
    data = load_source(args.data, root=args.root, need_train=False, num_classes=metas[0].get("num_classes"),
                       num_classes_key=f"num_classes in the metadata of {args.config[0]}")
    test = data.test
    cache: dict[str, object] = {}

    def images(meta: dict) -> object:  # each model gets the preprocessing its metadata records
        key = json.dumps([meta["mean"], meta["std"], meta["input_size"]])
        if key not in cache:
            cache[key] = preprocess(test.images, mean=meta["mean"], std=meta["std"], input_size=meta["input_size"])
        return cache[key]

    result = validate_models([Path(p) for p in args.config], images, test.labels, batch_sizes=args.batch_sizes,
                             warmup=args.warmup, runs=args.runs, threads=_threads(args),
                             class_names=data.class_names, named=data.named)
    for stem, m in result["models"].items():
        lat = " ".join(f"p50@bs{bs} {v['p50']:.3f} ms" for bs, v in m["latency_ms"].items())
        print(f"{stem}: top-1 {100 * m['accuracy']['top1']:.2f}% top-5 {100 * m['accuracy']['top5']:.2f}% "
              f"(n={m['accuracy']['n']}) {lat} size {m['bytes'] / 1e6:.2f} MB")
    _print_int8(result)
    if args.json:
        _io.write_json(args.json, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "handler"):  # subcommands in their own module (commands/)
            return args.handler(args)
        if args.command == "pipeline":
            return _run_config(args, "report")
        if args.command in ("teacher", "distill", "report"):
            return _run_config(args, args.command)
        return {"export": _cmd_export, "quantize": _cmd_quantize, "validate": _cmd_validate}[args.command](args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e.format()}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk, a missing directory, permissions: the user's to fix
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}\n  fix: check that the path exists, is writable and that the disk "
              "has space (see --out / --json), then rerun the same command", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
