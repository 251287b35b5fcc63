"""Does bidirectional ECKD keep a pretrained teacher intact? The co-trained teacher's test top-1, epoch by epoch.

Each variant is one ordinary ``distill2deploy distill`` run of the same config (same data, seed,
teacher weights and schedule) with different ``distill.options``, in its own run directory under
``--out`` (the teacher stage is copied, not retrained, so every variant starts from the same
weights; a later invocation with the same ``--out`` reuses it and tabulates every finished variant). The table gives the teacher's test top-1 before training (the teacher stage's figure)
and after every epoch, and the student's; a PNG plots the teacher's curves.

On the CIFAR-100 sample beside the repository, with the pretrained ResNet-56 (what the issue measured)::

    python benchmarks/eckd_teacher.py --threads 1 -- quickstart \\
        -o data.source=npz:../shared/data/cifar100_sample.npz \\
        -o teacher.checkpoint=../shared/weights/cifar100_resnet56.pth -o distill.epochs=4 -o distill.lr=0.01

Everything after ``--`` is the config and its overrides, as for ``distill2deploy distill``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# name -> distill.options (bidirectional ECKD-R throughout; the thesis's formula first)
VARIANTS: dict[str, dict[str, Any]] = {
    # control: the co-trained teacher on its own label CE only (no heads, no EC): plain fine-tuning
    "teacher_ce_only": {"bidirectional": True, "use_levels": False, "use_ec": False, "teacher_lr_scale": 1.0},
    "thesis": {"bidirectional": True, "teacher_lr_scale": 1.0},
    "probe": {"bidirectional": True, "teacher_probe_epochs": 1.0, "teacher_lr_scale": 1.0},
    "teacher_lr/10": {"bidirectional": True, "teacher_lr_scale": 0.1},
    "mean_levels": {"bidirectional": True, "level_reduction": "mean", "teacher_lr_scale": 1.0},
    "safeguard": {"bidirectional": True, "teacher_probe_epochs": 1.0, "teacher_lr_scale": 0.1,
                  "level_reduction": "mean"},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "exports" / "benchmarks" / "eckd_teacher")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--method", choices=["eckd_r", "eckd_f"], default="eckd_r")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per run (default 1: shared cores)")
    p.add_argument("config", nargs=argparse.REMAINDER, help="-- CONFIG [-o KEY=VALUE ...]")
    args = p.parse_args(argv)
    args.config = [a for a in args.config if a != "--"]
    if not args.config:
        p.error("give the config after --, e.g. -- quickstart -o distill.epochs=4")
    return args


def run_variant(args: argparse.Namespace, name: str, teacher_dir: Path | None) -> Path:
    run_dir = args.out / name.replace("/", "_")
    if teacher_dir is not None and not (run_dir / "teacher").exists():
        shutil.copytree(teacher_dir, run_dir / "teacher")  # same weights, cached: never retrained
    options = json.dumps(VARIANTS[name])
    cmd = [sys.executable, "-m", "distill2deploy", "distill", *args.config, "--out", str(run_dir),
           "-o", f"distill.method={args.method}", "-o", f"distill.options={options}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return run_dir


def collect(run_dir: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
    teacher = json.loads((run_dir / "teacher" / "stage.json").read_text())["summary"]["test"]["top1"]
    return {"start": teacher, "teacher": [r.get("test_teacher_top1") for r in rows],
            "student": [r["test_top1"] for r in rows]}


def table(results: dict[str, dict[str, Any]]) -> str:
    epochs = max(len(r["teacher"]) for r in results.values())
    head = "| variant | teacher before | " + " | ".join(f"teacher ep{e + 1}" for e in range(epochs)) + \
        " | change | student last |"
    lines = [head, "|" + "---|" * (epochs + 4)]
    for name, r in results.items():
        cells = [f"{100 * t:.2f}" if t is not None else "-" for t in r["teacher"]]
        change = 100 * (r["teacher"][-1] - r["start"]) if r["teacher"][-1] is not None else float("nan")
        lines.append(f"| {name} | {100 * r['start']:.2f} | " + " | ".join(cells) +
                     f" | {change:+.2f} | {100 * r['student'][-1]:.2f} |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in results.items():
        ys = [100 * r["start"]] + [100 * t for t in r["teacher"] if t is not None]
        ax.plot(range(len(ys)), ys, marker="o", label=name)
    epochs = max(len(r["teacher"]) for r in results.values())
    ax.set_xticks(range(epochs + 1))
    ax.set_xlabel("epoch (0 = the teacher stage's weights)")
    ax.set_ylabel("co-trained teacher test top-1 (%)")
    ax.set_title("Bidirectional ECKD: the teacher under co-training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    teacher_dir = next((d / "teacher" for d in sorted(args.out.iterdir()) if (d / "teacher" / "stage.json").is_file()),
                       None)
    for name in args.variants:
        run_dir = run_variant(args, name, teacher_dir)
        teacher_dir = teacher_dir or run_dir / "teacher"
    # every finished variant under --out, also those of earlier invocations (same teacher, same config)
    results = {name: collect(args.out / name.replace("/", "_")) for name in VARIANTS
               if (args.out / name.replace("/", "_") / "distill" / "stage.json").is_file()}
    text = table(results)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "eckd_teacher.png")
    print(text)
    print(f"\nwritten: {args.out / 'results.md'}, {args.out / 'eckd_teacher.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
