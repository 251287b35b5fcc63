"""Command line: ``python -m distill2deploy`` / ``distill2deploy``. Thin: parse, then call the library."""
from __future__ import annotations

import argparse
import sys

from .commands import check, export, quantize, run, serving, validate
from .errors import UserError

EXAMPLES = """examples:
  distill2deploy pipeline quickstart.yaml
  distill2deploy pipeline mobilenet.yaml -o data.source=npz:cifar100_sample.npz -o distill.epochs=30
  distill2deploy pipeline mobilenet.yaml --force quantize
  distill2deploy export --model resnet56_cifar --checkpoint resnet56.pth --out resnet56.onnx
  distill2deploy quantize resnet56.onnx --data cifar100 --out resnet56.int8.onnx
  distill2deploy validate resnet56.onnx resnet56.int8.onnx --data cifar100 --json results.json
  distill2deploy serve resnet56.onnx --port 8000
  distill2deploy predict resnet56.onnx cat.jpg --top-k 3
  distill2deploy check resnet56.int8.onnx --baseline baseline.json --data cifar100   # CI gate: exit 1 on regression"""


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
                                     "INT8 and validate it in onnxruntime.", epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = [_global_options(False)]
    run.add_parsers(sub, common)
    export.add_parser(sub, common)
    quantize.add_parser(sub, common)
    validate.add_parser(sub, common)
    serving.add_parsers(sub, common)
    check.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)  # every subcommand lives in its own module (commands/)
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
