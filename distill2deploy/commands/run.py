"""``pipeline``, ``teacher``, ``distill``, ``report``, and ``export``/``quantize``/``validate`` given a config:
run the pipeline's stages up to one (cached stages are skipped)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

EXAMPLES = {
    "pipeline": """examples:
  distill2deploy pipeline quickstart.yaml            # ./quickstart.yaml or the bundled pipelines/quickstart.yaml
  distill2deploy pipeline mobilenet.yaml -o distill.method=ce -o seed=1 --out exports/mbv2_ce_seed1
  accelerate launch -m distill2deploy pipeline mobilenet.yaml   # many GPUs""",
    "teacher": "example:\n  distill2deploy teacher mobilenet.yaml -o teacher.checkpoint=resnet56.pth",
    "distill": "example:\n  distill2deploy distill mobilenet.yaml -o distill.epochs=10",
    "report": """examples:
  distill2deploy report mobilenet.yaml       # rewrite report.md/json and plots of a finished run
  distill2deploy report exports/mbv2_ce_seed1   # a run directory: its saved config.yaml and location""",
}


def add_parsers(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("pipeline", parents=parents, formatter_class=fmt, epilog=EXAMPLES["pipeline"],
                       help="run every stage of a pipeline config (cached stages are skipped)")
    p.add_argument("config", help="YAML config: a path, or the name of a bundled pipeline")
    p.set_defaults(handler=lambda args: run_config(args, "report"))
    for name, text in (("teacher", "build/fine-tune the teacher and record its accuracy"),
                       ("distill", "train the student (runs the teacher stage first if needed)"),
                       ("report", "write report.md/report.json and plots for a run")):
        p = sub.add_parser(name, parents=parents, formatter_class=fmt, epilog=EXAMPLES[name], help=text)
        p.add_argument("config", help="YAML config, or a run directory (uses its saved config.yaml)")
        p.set_defaults(handler=lambda args, until=name: run_config(args, until))


def run_config(args: argparse.Namespace, until: str) -> int:
    """Run the stages of ``args.config`` up to ``until``; a run directory is reused as the output."""
    from ..config import load_config
    from ..pipeline import run_pipeline

    overrides = list(args.overrides) + ([f"threads={args.threads}"] if args.threads is not None else [])
    if getattr(args, "runtime", None):
        overrides.append(f"validate.runtimes=[{', '.join(args.runtime)}]")
    cfg, _ = load_config(args.config, overrides)
    out = args.out or (args.config if Path(args.config).is_dir() else None)  # a run directory: reuse it
    force = list(args.force) + (["report"] if args.command == "report" else [])
    ctx = run_pipeline(cfg, Path(out) if out else None, until=until, force=force)
    if ctx.is_main and until in ("validate", "report"):
        print_verdicts(json.loads(ctx.output("validate", "results").read_text()))
    if ctx.is_main and until == "report":
        print(f"report: {ctx.run_dir / 'report.md'}")
    return 0


def print_verdicts(result: dict[str, Any]) -> None:
    """The terminal's answers to "is INT8 worth it?" and, with several runtimes, "which runtime to deploy
    on?" (the figures that open report.md)."""
    from ..deploy.int8_report import int8_lines, int8_summary
    from ..deploy.runtime_report import runtime_lines, runtime_summary

    for line in [*int8_lines(int8_summary(result), result.get("settings", {})), *runtime_lines(runtime_summary(result))]:
        print(line)
