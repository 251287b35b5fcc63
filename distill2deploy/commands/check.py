"""``distill2deploy check``: gate CI on a model's latency and accuracy against a baseline.

Exit codes: 0 within budget (or baseline written), 1 a figure regressed, 2 bad input (through
:class:`~distill2deploy.errors.UserError`: missing or corrupt baseline, another input shape,
unreadable model, other images).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..deploy.runtimes import DEFAULT_RUNTIME, RUNTIMES
from ..errors import UserError

EXAMPLES = """examples:
  distill2deploy check student.int8.onnx --baseline baseline.json --update-baseline --data cifar100
  distill2deploy check student.int8.onnx --baseline baseline.json --data cifar100 --json check.json
  distill2deploy check exports/mobilenet/quantize/student.int8.onnx --baseline exports/mobilenet/baseline.json
  distill2deploy check resnet56.onnx --baseline exports/baselines/resnet56_cifar100_sample.json --role resnet56

exit codes: 0 within budget, 1 regression, 2 bad input.
latency is timed relative to a fixed reference network in interleaved rounds, so a busier or slower
runner cancels out; a figure regresses when its change exceeds the budget with confidence (p < --alpha)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                       help="fail (exit 1) when a model's latency or accuracy regressed against a baseline")
    p.add_argument("model", help="the .onnx model to check")
    p.add_argument("--baseline", required=True, metavar="BASELINE.json", help="baseline file (roles -> figures)")
    p.add_argument("--role", help="baseline entry to compare with (default: the only one, or the one recorded "
                   "for this file name or content); with --update-baseline: the entry to write (default: file stem)")
    p.add_argument("--data", metavar="SOURCE", help="also compare top-1 on this source's test split")
    p.add_argument("--root", help="root for the 'cifar100' source (default $D2D_DATA)")
    p.add_argument("--max-slowdown", type=float, default=0.10, help="latency budget as a fraction (default 0.10)")
    p.add_argument("--max-drop", type=float, default=0.5, help="top-1 budget in points (default 0.5)")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="significance level of 'beyond budget' (default 0.05)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="default: the baseline's (1 64 when writing one)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per batch size (default 15)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: the baseline's, or 1)")
    p.add_argument("--runtime", choices=RUNTIMES, help="runtime that runs the model (default: the baseline's, or "
                   "onnxruntime; the reference workload always runs in onnxruntime)")
    p.add_argument("--update-baseline", action="store_true", help="measure and write this role's entry "
                   "(atomically), then exit 0")
    p.add_argument("--json", metavar="OUT.json", help="also write the figures and verdicts as JSON")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    p.set_defaults(handler=run)


def _check_args(args: argparse.Namespace) -> None:
    if not 0 < args.max_slowdown < 10 or args.max_drop < 0 or not 0 < args.alpha < 1:
        raise UserError(f"budgets out of range: --max-slowdown {args.max_slowdown}, --max-drop {args.max_drop}, "
                        f"--alpha {args.alpha}", where="check",
                        fix="use e.g. --max-slowdown 0.10 (10%) --max-drop 0.5 (points) --alpha 0.05")
    if args.rounds < 5:
        raise UserError(f"--rounds {args.rounds} is too few for a significance test", where="check",
                        fix="use --rounds 10 or more")


def _load_data(args: argparse.Namespace, meta: dict[str, Any]) -> tuple[Any, Any, str]:
    from ..data import load_source, preprocess
    from ..deploy.baseline import data_sha256
    from ..deploy.validate import check_classes

    src = load_source(args.data, root=args.root, need_train=False)
    check_classes(meta, src.class_names, src.named, Path(args.model))  # as validate: refuse other classes
    test = src.test
    images = preprocess(test.images, mean=meta["mean"], std=meta["std"], input_size=meta["input_size"])
    return images, test.labels, data_sha256(test.images, test.labels)


def run(args: argparse.Namespace) -> int:
    """Validate the inputs (exit 2 before any timing), measure, then record or compare."""
    from ..deploy import baseline as bl
    from ..deploy.metadata import read_metadata
    from ..deploy.validate import model_key

    _check_args(args)
    model = Path(args.model)
    meta = read_metadata(model, require=bool(args.data))  # unreadable model: UserError before anything else
    base = bl.load_baseline(args.baseline, missing_ok=args.update_baseline)
    if args.update_baseline:
        role, then = args.role or model_key(model), None
    else:
        role = bl.select_role(base, model, args.role, where=str(args.baseline))
        then = base["roles"][role]
    threads = args.threads if args.threads is not None else (then["machine"]["threads"] if then else 1)
    if then and threads != then["machine"]["threads"]:
        raise UserError(f"the baseline entry {role!r} was timed with {then['machine']['threads']} thread(s), "
                        f"not {threads}: relative latencies depend on the thread count", where=str(args.baseline),
                        fix=f"drop --threads (or pass --threads {then['machine']['threads']}), or re-record "
                        "the baseline with --update-baseline --threads N")
    runtime = args.runtime or (then["machine"].get("runtime", DEFAULT_RUNTIME) if then else DEFAULT_RUNTIME)
    if then and runtime != then["machine"].get("runtime", DEFAULT_RUNTIME):
        raise UserError(f"the baseline entry {role!r} was timed on {then['machine'].get('runtime', DEFAULT_RUNTIME)}, "
                        f"not {runtime}: relative latencies of two runtimes are not comparable", where=str(args.baseline),
                        fix="drop --runtime, or record a baseline for this runtime with --update-baseline --role "
                        f"{role}.{runtime} --runtime {runtime}")
    batch_sizes = args.batch_sizes or ([int(b) for b in then["latency"]] if then else [1, 64])
    if then:
        missing = [b for b in batch_sizes if str(b) not in then["latency"]]
        if missing:
            raise UserError(f"the baseline entry {role!r} has no latency at batch size(s) {missing}",
                            where=str(args.baseline), fix=f"use --batch-sizes {' '.join(then['latency'])}, "
                            "or re-record it with --update-baseline --batch-sizes ...")
    data = _load_data(args, meta) if args.data else (None, None, None)
    if then and args.data:
        acc = then.get("accuracy")
        if acc is None:
            raise UserError(f"the baseline entry {role!r} has no accuracy to compare with", where=str(args.baseline),
                            fix="re-record it with --update-baseline --data SOURCE, or drop --data")
        if acc["data_sha256"] != data[2]:
            raise UserError(f"--data {args.data} is not the image set the baseline's accuracy was measured on "
                            f"({acc['n']} images)", where=str(args.baseline),
                            fix="pass the same --data as when the baseline was written")
    print(f"check {model.name} (role {role!r}) on {runtime}: {args.rounds} rounds at batch size(s) "
          f"{', '.join(map(str, batch_sizes))}, {threads} thread(s), timed against the reference workload",
          file=sys.stderr)
    now = bl.measure_model(model, input_size=meta.get("input_size"), batch_sizes=batch_sizes, rounds=args.rounds,
                           threads=threads, images=data[0], labels=data[1], data_hash=data[2],
                           expect_shape=then["input_shape"] if then else None, where=str(args.baseline),
                           plans={bs: v["plan"] for bs, v in then["latency"].items()} if then else None,
                           progress=sys.stderr.isatty(), runtime=runtime)
    if args.update_baseline:
        return _record(args, role, now)
    return _compare(args, role, then, now, threads, batch_sizes)


def _record(args: argparse.Namespace, role: str, now: dict[str, Any]) -> int:
    """--update-baseline: write this role's entry and show what was recorded."""
    from .. import _io
    from ..deploy import baseline as bl
    from ..deploy.regression import format_table

    bl.save_entry(args.baseline, role, now)
    rows = [[f"latency @bs{bs} (x reference)", f"{_median(v['relative']):.3f}", f"p50 {v['p50_ms']:.3f} ms",
             f"p99 {v['p99_ms']:.3f} ms"] for bs, v in now["latency"].items()]
    if "accuracy" in now:
        rows.append([f"top-1 ({now['accuracy']['n']} images)", f"{100 * now['accuracy']['top1']:.2f}%", "", ""])
    print(format_table(rows, ["figure", "recorded", "absolute (wall)", ""]))
    print(f"baseline {args.baseline}: wrote role {role!r}")
    if args.json:
        _io.write_json(args.json, {"model": args.model, "baseline": str(args.baseline), "role": role,
                                   "updated": True, "entry": now})
    return 0


def _compare(args: argparse.Namespace, role: str, then: dict[str, Any], now: dict[str, Any], threads: int,
             batch_sizes: list[int]) -> int:
    """Verdict per figure, the table, the JSON; 1 when any figure regressed."""
    from .. import _io
    from ..deploy import baseline as bl
    from ..deploy import regression as rg
    from ..deploy.machine import differences

    moved = differences(then["machine"], now["machine"])
    for line in moved:
        print(f"warning: not the baseline's machine: {line}; relative latency cancels speed and load, "
              "not a different CPU or runtime", file=sys.stderr)
    figures, rows = {}, []
    for bs in batch_sizes:
        r = rg.compare_latency(then["latency"][str(bs)]["relative"], now["latency"][str(bs)]["relative"],
                               max_slowdown=args.max_slowdown, alpha=args.alpha)
        r["p50_ms"] = [then["latency"][str(bs)]["p50_ms"], now["latency"][str(bs)]["p50_ms"]]
        figures[f"latency_bs{bs}"] = r
        rows.append(rg.latency_row(f"latency @bs{bs} (x reference)", r))
    if args.data:
        acc = then["accuracy"]
        r = rg.compare_accuracy(bl.unpack_bits(acc["correct"], acc["n"]),
                                bl.unpack_bits(now["accuracy"]["correct"], now["accuracy"]["n"]),
                                max_drop=args.max_drop, alpha=args.alpha)
        figures["top1"] = r
        rows.append(rg.accuracy_row(f"top-1 ({r['n']} images)", r))
    failed = [k for k, r in figures.items() if r["verdict"] == rg.REGRESSION]
    print(rg.format_table(rows))
    print(f"{'FAIL' if failed else 'PASS'}: {', '.join(failed) + ' regressed' if failed else 'within budget'} "
          f"({Path(args.model).name} vs {args.baseline} [{role}])")
    if args.json:
        _io.write_json(args.json, {"model": args.model, "baseline": str(args.baseline), "role": role,
                                   "passed": not failed, "regressed": failed, "figures": figures,
                                   "machine": now["machine"], "machine_differences": moved,
                                   "settings": {"rounds": args.rounds, "threads": threads, "alpha": args.alpha,
                                                "batch_sizes": batch_sizes,
                                                "runtime": now["machine"]["runtime"]}})
    return 1 if failed else 0


def _median(xs: list[float]) -> float:
    import numpy as np

    return float(np.median(xs))
