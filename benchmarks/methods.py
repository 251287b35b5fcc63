"""Evidence of learning: every distillation method from the same teacher, for the same budget, on real data.

The teacher is trained once with the pipeline's own teacher stage (from scratch, on CIFAR-10 as an
ImageFolder through the ``folder:`` source); then every student method runs the full pipeline
(distill -> export -> INT8 quantize -> validate in onnxruntime) from those same teacher weights,
with the same seed, schedule and data. Each run is one ordinary pipeline config, written under
``<out>/configs/`` and run as its own ``distill2deploy validate CONFIG --out RUN`` process, so every
row of the table is reproducible with one command, a crash costs one run (it is retried once; the
pipeline's stage cache resumes it), and rerunning this script reuses finished runs.

Full scale on a GPU (the defaults: full CIFAR-10, ResNet-56 teacher, 240 epochs, standard protocol)::

    python benchmarks/methods.py --tar ../shared/data/cifar10_jpeg.tar.gz

A small budget on a CPU (what benchmarks/README.md reports)::

    nice -n 5 python benchmarks/methods.py --preset cpu-small --tar ../shared/data/cifar10_jpeg.tar.gz

Writes ``<out>/results.json``, ``<out>/results.md`` and ``<out>/methods.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2470, 0.2435, 0.2616]
DEFAULT_DATA_DIR = Path.home() / ".cache" / "distill2deploy" / "cifar10_jpeg"

# name -> (registry method, the bundled config its options come from, changes to those options).
# Options are the shipped pipelines/methods/mobilenet_<method>.yaml ones, so this benchmarks what users run.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ce": ("ce", {}),
    "kd": ("kd", {}),
    "dkd": ("dkd", {}),
    # DML with the teacher as the peer: the same two networks as bidirectional ECKD, from the same weights.
    "dml": ("dml", {"peers": ["teacher"]}),
    # Classic DML: a from-scratch copy of the student as the peer (does not use the teacher).
    "dml_classic": ("dml", {"peers": []}),
    "fitnet": ("fitnet", {}),
    "at": ("at", {}),
    "fsp": ("fsp", {}),  # two-stage: its initialisation epochs scale with the schedule like warm-ups
    "reviewkd": ("reviewkd", {}),
    "multi_teacher": ("multi_teacher", {}),  # extra_teachers: the second teacher (set below)
    "kd_ec": ("kd_ec", {}),
    "eckd_r": ("eckd_r", {"bidirectional": True}),
    "eckd_r_oneway": ("eckd_r", {"bidirectional": False}),
    "eckd_f": ("eckd_f", {"bidirectional": True}),
}
DEFAULT_METHODS = ["ce", "kd", "dkd", "dml", "fitnet", "at", "fsp", "reviewkd", "multi_teacher", "kd_ec", "eckd_r",
                   "eckd_r_oneway", "eckd_f"]
DEFAULT_MULTI_SEED = ["ce", "kd", "eckd_r"]
# The methods issue #13 asks to rank, CE and KD first (their seeds decide whether the table can rank anything).
RANKED_METHODS = ["ce", "kd", "dkd", "reviewkd", "at", "fsp", "kd_ec", "eckd_r_oneway", "eckd_r", "eckd_f"]

# Preset values fill every argument left unset on the command line.
PRESETS: dict[str, dict[str, Any]] = {
    # The standard CIFAR protocol (CRD/DKD): 240 epochs, SGD 0.9, wd 5e-4, batch 64, x0.1 at 150/180/210.
    "full": dict(teacher_model="resnet56_cifar", teacher_epochs=240, teacher_train_subset=None, teacher_lr=0.05,
                 student_model="mobilenetv2_x0_5_cifar", epochs=240, train_subset=None, test_subset=None, lr=0.01,
                 milestones=[0.625, 0.75, 0.875], batch_size=64, num_workers=2, calib_samples=512,
                 validate_runs=200, validate_batch_sizes=[1, 64], threads=None),
    # Two shared CPU cores, about an hour: ResNet-20 teacher on 8k images, students 4 epochs on 5k, 2k test images.
    "cpu-small": dict(teacher_model="resnet20_cifar", teacher_epochs=8, teacher_train_subset=8000,
                      teacher_lr=0.05, student_model="mobilenetv2_x0_5_cifar", epochs=4, train_subset=5000,
                      test_subset=2000, lr=0.05, milestones=[0.75], batch_size=64, num_workers=0,
                      calib_samples=256, validate_runs=20, validate_batch_sizes=[1], threads=1),
    # Two shared CPU cores, about two hours, three seeds of every ranked method (what benchmarks/README.md
    # ranks). Every run trains on the same fixed 4k-image subset and is scored on the same fixed 2k test
    # images (--subset-seed), so the seed spread is the training's alone. The teacher (ResNet-20, 20k images)
    # sees five times the students' data: its soft labels carry knowledge the students' labels do not.
    "cpu-2h": dict(teacher_model="resnet20_cifar", teacher_epochs=8, teacher_train_subset=20000, teacher_lr=0.1,
                   student_model="mobilenetv2_x0_5_cifar", epochs=8, train_subset=4000, test_subset=2000, lr=0.05,
                   milestones=[0.5, 0.75], batch_size=64, num_workers=0, calib_samples=256, validate_runs=10,
                   validate_batch_sizes=[1], threads=1, teacher_threads=2, jobs=2, subset_seed=0,
                   methods=RANKED_METHODS, seeds=[0, 1, 2], multi_seed=RANKED_METHODS),
    # End-to-end check of this script in a few minutes (numbers mean nothing).
    "smoke": dict(teacher_model="resnet20_cifar", teacher_epochs=1, teacher_train_subset=500, teacher_lr=0.05,
                  student_model="mobilenetv2_x0_5_cifar", epochs=1, train_subset=500, test_subset=500, lr=0.05,
                  milestones=[0.75], batch_size=64, num_workers=0, calib_samples=64, validate_runs=5,
                  validate_batch_sizes=[1], threads=1),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Unset options take the preset's value; see the module docstring.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full", help="budget preset (default: full)")
    p.add_argument("--tar", type=Path, help="cifar10_jpeg.tar.gz: extracted once into --data-dir if that is empty")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help=f"ImageFolder with train/ and test/ (default {DEFAULT_DATA_DIR})")
    p.add_argument("--out", type=Path, help="benchmark directory (default exports/benchmarks/methods/<preset>)")
    p.add_argument("--methods", nargs="+", choices=list(VARIANTS), help=f"default: {' '.join(DEFAULT_METHODS)}")
    p.add_argument("--seeds", type=int, nargs="+",
                   help="student seeds; the first is used by every method, all by --multi-seed (default 0 1)")
    p.add_argument("--multi-seed", nargs="*", choices=list(VARIANTS),
                   help=f"methods run with every seed (default: {' '.join(DEFAULT_MULTI_SEED)})")
    p.add_argument("--jobs", type=int, help="student runs at a time (each with --threads threads; default 1)")
    p.add_argument("--teacher-seed", type=int, default=0, help="seed of the teacher's training (default 0)")
    p.add_argument("--second-teacher-seed", type=int, default=1,
                   help="seed of multi_teacher's extra teacher, trained the same way (default 1)")
    g = p.add_argument_group("schedule and data (default: the preset's)")
    g.add_argument("--teacher-model")
    g.add_argument("--teacher-epochs", type=int)
    g.add_argument("--teacher-train-subset", type=_int_or_none, help="images ('all' for the whole train split)")
    g.add_argument("--teacher-lr", type=float)
    g.add_argument("--student-model")
    g.add_argument("--epochs", type=int, help="student epochs")
    g.add_argument("--train-subset", type=_int_or_none, help="student training images ('all' for every one)")
    g.add_argument("--test-subset", type=_int_or_none, help="test images ('all' for every one)")
    g.add_argument("--lr", type=float, help="student SGD learning rate")
    g.add_argument("--milestones", type=float, nargs="+",
                   help="fractions of the schedule at which lr is multiplied by 0.1 (teacher and students)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--num-workers", type=int)
    g.add_argument("--calib-samples", type=int, help="INT8 calibration images")
    g.add_argument("--validate-runs", type=int, help="timed onnxruntime runs (latency is not the point here)")
    g.add_argument("--validate-batch-sizes", type=int, nargs="+")
    g.add_argument("--threads", type=int,
                   help="CPU threads per run (OMP_NUM_THREADS and onnxruntime's); on a shared CPU 1 avoids the "
                        "collapse of multi-threaded kernels when other jobs take cores (default: all)")
    p.add_argument("--teacher-threads", type=int, help="threads of the teacher's run (default: --threads)")
    p.add_argument("--subset-seed", type=int,
                   help="draw the train/test subsets once with this seed into a hard-linked ImageFolder that every "
                        "run shares (default: each run draws its own with its seed, so seeds differ in data too)")
    p.add_argument("--retries", type=int, default=1, help="reruns of a crashed run (cached stages resume)")
    p.add_argument("--dry-run", action="store_true", help="write the configs and print the commands only")
    p.add_argument("--report-only", action="store_true", help="tabulate the finished runs, train nothing")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None and not _was_given(argv, key):
            setattr(args, key, value)
    args.methods = args.methods or list(DEFAULT_METHODS)
    args.seeds = args.seeds or [0, 1]
    args.multi_seed = DEFAULT_MULTI_SEED if args.multi_seed is None else args.multi_seed
    args.jobs = max(1, args.jobs or 1)
    args.out = args.out or REPO / "exports" / "benchmarks" / "methods" / args.preset
    return args


def _int_or_none(text: str) -> int | None:
    return None if text.lower() in ("all", "none", "null") else int(text)


def _was_given(argv: list[str] | None, key: str) -> bool:
    """``--train-subset all`` sets None on purpose: do not let the preset overwrite it."""
    flag = "--" + key.replace("_", "-")
    return any(a == flag or a.startswith(flag + "=") for a in (sys.argv[1:] if argv is None else argv))


# ------------------------------------------------------------------------------------------ data
def ensure_data(data_dir: Path, tar: Path | None) -> Path:
    """The ImageFolder tree, extracted from ``tar`` once (into a temp dir, renamed when complete)."""
    from distill2deploy._io import atomic_dir
    from distill2deploy.errors import UserError

    data_dir = data_dir.expanduser().resolve()
    if (data_dir / "train").is_dir() and (data_dir / "test").is_dir():
        return data_dir
    if tar is None:
        raise UserError(f"no ImageFolder at {data_dir}", where="--data-dir",
                        fix="pass --tar ../shared/data/cifar10_jpeg.tar.gz to extract it there once")
    if not tar.is_file():
        raise UserError("file not found", where=f"--tar {tar}")
    print(f"extracting {tar} -> {data_dir} (once)", flush=True)
    with atomic_dir(data_dir) as tmp, tarfile.open(tar) as tf:
        tf.extractall(tmp, filter="data")
        if not ((tmp / "train").is_dir() and (tmp / "test").is_dir()):
            raise UserError("the archive has no train/ and test/ at its top level", where=str(tar))
    return data_dir


def subset_folder(data_dir: Path, train: int | None, test: int | None, seed: int) -> Path:
    """A stratified subset of the ImageFolder as hard links (no copies), drawn once and shared by every run.

    The draw is ``data.stratified_subset`` over the files in ImageFolder order (sorted class folders,
    sorted names): the images ``data.subset`` would pick with this seed, but fixed across run seeds.
    """
    import numpy as np

    from distill2deploy._io import atomic_dir
    from distill2deploy.data import stratified_subset

    target = data_dir.parent / f"{data_dir.name}-subsets" / f"train{train or 'all'}-test{test or 'all'}-seed{seed}"
    if (target / "train").is_dir() and (target / "test").is_dir():
        return target
    print(f"drawing the fixed subsets -> {target} (once)", flush=True)
    with atomic_dir(target) as tmp:
        for split, n in (("train", train), ("test", test)):
            files = sorted((data_dir / split).glob("*/*"))
            labels = np.array([f.parent.name for f in files])
            for i in stratified_subset(labels, n, seed):
                dst = tmp / split / files[i].parent.name / files[i].name
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(files[i], dst)
    return target


# --------------------------------------------------------------------------------------- configs
def _milestones(fractions: list[float], epochs: int) -> list[int]:
    return sorted({max(1, round(f * epochs)) for f in fractions if round(f * epochs) < epochs}) if epochs > 1 else []


def base_config(args: argparse.Namespace, data_dir: Path, seed: int, name: str) -> dict[str, Any]:
    fixed = args.subset_seed is not None  # data_dir already holds exactly the subsets
    return {
        "name": name,
        "seed": seed,
        "data": {"source": f"folder:{data_dir}",
                 "subset": {"train": None if fixed else args.train_subset, "test": None if fixed else args.test_subset},
                 "mean": CIFAR10_MEAN, "std": CIFAR10_STD, "num_workers": args.num_workers},
        "teacher": {"model": args.teacher_model, "pretrained": False},
        "student": {"model": args.student_model},
        "quantize": {"calib_samples": args.calib_samples, "calib_batch_size": min(32, args.calib_samples)},
        "validate": {"runs": args.validate_runs, "batch_sizes": args.validate_batch_sizes,
                     "warmup": min(20, args.validate_runs), "threads": args.threads},
    }


def teacher_config(args: argparse.Namespace, data_dir: Path, seed: int) -> dict[str, Any]:
    cfg = base_config(args, data_dir, seed, f"teacher_s{seed}")
    if args.subset_seed is None:
        cfg["data"]["subset"]["train"] = args.teacher_train_subset
    cfg["teacher"]["train"] = {"epochs": args.teacher_epochs, "lr": args.teacher_lr, "batch_size": args.batch_size,
                               "milestones": _milestones(args.milestones, args.teacher_epochs)}
    cfg["distill"] = {"method": "ce", "batch_size": args.batch_size}
    return cfg


def student_config(args: argparse.Namespace, data_dir: Path, variant: str, seed: int, teacher_pt: Path,
                   second_teacher_pt: Path | None) -> dict[str, Any]:
    from distill2deploy.config import bundled_pipelines

    method, changes = VARIANTS[variant]
    shipped = yaml.safe_load((bundled_pipelines() / "methods" / f"mobilenet_{method}.yaml").read_text())
    options = copy.deepcopy(shipped["distill"].get("options") or {})
    options.update(changes)
    # Warm-ups keep the shipped configs' fraction of the schedule (e.g. 20 of 240 epochs).
    for key in ("warmup_epochs", "init_epochs"):  # schedules in epochs shrink with the preset's epochs
        if key in options:
            options[key] = round(options[key] * args.epochs / shipped["distill"]["epochs"], 3)
    if method == "multi_teacher":
        options["extra_teachers"] = [{"model": args.teacher_model, "checkpoint": str(second_teacher_pt),
                                      "pretrained": False}]
    cfg = base_config(args, data_dir, seed, f"{variant}_s{seed}")
    cfg["teacher"].update(checkpoint=str(teacher_pt), train={"epochs": 0})
    cfg["distill"] = {"method": method, "options": options, "epochs": args.epochs, "batch_size": args.batch_size,
                      "lr": args.lr, "milestones": _milestones(args.milestones, args.epochs)}
    return cfg


# -------------------------------------------------------------------------------------- running
@dataclass
class Run:
    name: str
    kind: str  # "teacher" or a variant name
    seed: int
    config: Path
    run_dir: Path
    until: str
    command: list[str] = field(default_factory=list)
    status: str = "pending"
    wall_seconds: float = 0.0


def write_config(cfg: dict[str, Any], path: Path, check: bool = True) -> None:
    from distill2deploy import _io
    from distill2deploy.config import load_config

    _io.write_text(path, yaml.safe_dump(cfg, sort_keys=False))
    if check:
        load_config(str(path))  # validate now (options, files), not minutes into the run


def is_finished(run: Run) -> bool:
    """Every stage up to ``until`` has a manifest and the run was made from this very config."""
    from distill2deploy.config import config_hash, load_config

    stamp = run.run_dir / "config.sha256"
    if not (stamp.is_file() and (run.run_dir / run.until / "stage.json").is_file()):
        return False
    return stamp.read_text().strip() == config_hash(load_config(str(run.config))[0])


def execute(run: Run, log_dir: Path, retries: int, threads: int | None) -> None:
    log = log_dir / f"{run.name}.log"
    env = dict(os.environ, TQDM_MININTERVAL="30")  # a progress line every 30 s in the log, not every step
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    for attempt in range(retries + 1):
        if is_finished(run):
            run.status = "cached" if attempt == 0 else "done"
            break
        with open(log, "a") as fh:
            fh.write(f"\n$ {shlex.join(run.command)}  # attempt {attempt + 1}\n")
            fh.flush()
            rc = subprocess.run(run.command, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
        if rc == 0:
            run.status = "done"
            break
        run.status = f"failed (exit {rc}, see {log})"
        print(f"  {run.name}: exit {rc} on attempt {attempt + 1}, see {log}", flush=True)
    run.wall_seconds = time.perf_counter() - t0


# ------------------------------------------------------------------------------------- results
def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _epoch_seconds(metrics: Path) -> float | None:
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    secs = [r["epoch_seconds"] for r in rows if "epoch_seconds" in r]
    return statistics.median(secs) if secs else None


def collect(run: Run) -> dict[str, Any]:
    """One table row from the run's stage manifests (torch numbers) and validate.json (onnxruntime)."""
    teacher = _json(run.run_dir / "teacher" / "stage.json").get("summary", {})
    # Seconds the run's stages took when they ran (cached ones included): its cost, whatever invocation made it.
    stage_seconds = sum(_json(f).get("seconds", 0.0) for f in run.run_dir.glob("*/stage.json"))
    row: dict[str, Any] = {"run": run.name, "method": run.kind, "seed": run.seed, "status": run.status,
                           "wall_seconds": round(run.wall_seconds, 1), "stage_seconds": round(stage_seconds, 1),
                           "teacher_top1": teacher.get("test", {}).get("top1"),
                           "test_images": teacher.get("test_images")}
    if run.kind == "teacher":
        row.update(epochs=teacher.get("trained_epochs"), train_seconds=teacher.get("train_seconds"),
                   epoch_seconds=_epoch_seconds(run.run_dir / "teacher" / "metrics.jsonl"))
        return row
    distill = _json(run.run_dir / "distill" / "stage.json").get("summary", {})
    validate = _json(run.run_dir / "validate" / "validate.json")
    top1 = {k: v["accuracy"]["top1"] for k, v in validate.get("models", {}).items()}
    agreement = [v for k, v in validate.get("agreement", {}).items() if k.startswith("student.int8")]
    row.update(
        registry_method=distill.get("method"), epochs=distill.get("epochs"),
        # Networks trained alongside the student: a bidirectional teacher, DML peers.
        teacher_after_top1=distill.get("teacher_top1"),
        peers_after_top1={k[:-5]: v for k, v in distill.items() if k.endswith("_top1") and k not in
                          ("test_top1", "best_top1", "teacher_top1")} or None,
        student_torch_top1=distill.get("test_top1"), student_best_top1=distill.get("best_top1"),
        student_best_epoch=distill.get("best_epoch"),
        teacher_ort_top1=top1.get("teacher"), student_fp32_top1=top1.get("student"),
        student_int8_top1=top1.get("student.int8"),
        int8_fp32_agreement=agreement[0] if agreement else None,
        train_seconds=distill.get("train_seconds"),
        epoch_seconds=_epoch_seconds(run.run_dir / "distill" / "metrics.jsonl"))
    return row


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def _secs(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def spread(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean, sample std and range over seeds, per method run with more than one seed."""
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "teacher"):
        group = [r for r in rows if r["method"] == method and r.get("student_fp32_top1") is not None]
        if len(group) < 2:
            continue
        stats = {"seeds": [r["seed"] for r in group]}
        for key in ("student_fp32_top1", "student_best_top1", "student_int8_top1", "teacher_after_top1",
                    "student_best_epoch"):
            vals = [r[key] for r in group if r.get(key) is not None]
            if len(vals) >= 2:
                stats[key] = {"mean": statistics.mean(vals), "std": statistics.stdev(vals), "min": min(vals),
                              "max": max(vals), "values": vals}
        out[method] = stats
    return out


def _ms(v: dict[str, Any] | None, scale: float = 100.0, digits: int = 2) -> str:
    return "—" if v is None else f"{scale * v['mean']:.{digits}f} ± {scale * v['std']:.{digits}f}"


def summary(spreads: dict[str, dict[str, Any]]) -> str:
    """Mean ± sample std over seeds per method, and whether KD beats CE by more than twice the larger std."""
    lines = ["| method (seeds) | last epoch, fp32 (ORT) | best epoch (torch) | best at epoch | INT8 (ORT) "
             "| co-trained teacher after | vs CE (last) |", "|---|---|---|---|---|---|---|"]
    ce = spreads.get("ce", {}).get("student_fp32_top1")
    for m, s in spreads.items():
        last = s.get("student_fp32_top1")
        vs = "—" if ce is None or last is None or m == "ce" else f"{100 * (last['mean'] - ce['mean']):+.2f}"
        lines.append(f"| {m} ({', '.join(map(str, s['seeds']))}) | {_ms(last)} | {_ms(s.get('student_best_top1'))} "
                     f"| {_ms(s.get('student_best_epoch'), 1, 1)} | {_ms(s.get('student_int8_top1'))} "
                     f"| {_ms(s.get('teacher_after_top1'))} | {vs} |")
    kd = spreads.get("kd", {}).get("student_fp32_top1")
    if ce and kd:
        gap, bar = kd["mean"] - ce["mean"], 2 * max(kd["std"], ce["std"])
        lines += ["", f"KD − CE (last epoch): {100 * gap:+.2f} points; twice the larger std: {100 * bar:.2f} points "
                      f"→ {'KD beats CE beyond the seed spread' if gap > bar else 'NOT separated by this budget'}."]
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]], spreads: dict[str, dict[str, Any]], teachers: list[dict[str, Any]]) -> str:
    lines = ["| method | seed | teacher top-1 | teacher after | student fp32 (ORT) | student INT8 (ORT) "
             "| INT8 − fp32 | s/epoch | status |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        after = r.get("teacher_after_top1")
        if after is None and r.get("peers_after_top1"):
            after = next(iter(r["peers_after_top1"].values()))
        delta = (None if r.get("student_int8_top1") is None or r.get("student_fp32_top1") is None
                 else r["student_int8_top1"] - r["student_fp32_top1"])
        lines.append(f"| {r['method']} | {r['seed']} | {_pct(r.get('teacher_top1'))} | {_pct(after)} "
                     f"| {_pct(r.get('student_fp32_top1'))} | {_pct(r.get('student_int8_top1'))} "
                     f"| {'—' if delta is None else f'{100 * delta:+.2f}'} "
                     f"| {_secs(r.get('epoch_seconds'))} | {r['status']} |")
    if spreads:
        lines += ["", summary(spreads)]
    if teachers:
        lines += ["", "| teacher run | seed | epochs | top-1 (its own test subset) | s/epoch |", "|---|---|---|---|---|"]
        for t in teachers:
            lines.append(f"| {t['run']} | {t['seed']} | {t.get('epochs')} | {_pct(t.get('teacher_top1'))} "
                         f"| {_secs(t.get('epoch_seconds'))} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(dict.fromkeys(r["method"] for r in rows if r.get("student_fp32_top1") is not None))
    if not methods:
        return
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(methods) + 2), 4.2))
    x = np.arange(len(methods))
    series = (("student_fp32_top1", "last epoch, fp32 (ORT)"), ("student_best_top1", "best epoch (torch)"),
              ("student_int8_top1", "last epoch, INT8 (ORT)"))
    width = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        off = (i - (len(series) - 1) / 2) * width
        vals = [[100 * r[key] for r in rows if r["method"] == m and r.get(key) is not None] for m in methods]
        means = [np.mean(v) if v else np.nan for v in vals]
        stds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]  # mean ± sample std, as the table
        ax.bar(x + off, means, width, yerr=stds, capsize=3, label=label)
        for xi, v in zip(x, vals):  # every seed as a dot
            ax.scatter([xi + off] * len(v), v, color="k", s=6, zorder=3)
    t = [100 * r["teacher_top1"] for r in rows if r.get("teacher_top1") is not None and r["seed"] == rows[0]["seed"]]
    if t:
        ax.axhline(t[0], color="gray", ls="--", lw=1, label=f"teacher {t[0]:.2f}%")
    allv = [100 * r[k] for r in rows for k, _ in series if r.get(k) is not None]
    ax.set_ylim(max(0.0, min(allv) - 5), min(100.0, max(allv + t) + 3))
    ax.set_xticks(x, methods, rotation=30, ha="right")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    from distill2deploy.errors import UserError

    args = parse_args(argv)
    try:
        return run_benchmark(args, argv)
    except UserError as e:  # a bad argument or config: the message, not a traceback
        print(f"error: {e.format()}", file=sys.stderr)
        return 2


def run_benchmark(args: argparse.Namespace, argv: list[str] | None) -> int:
    from distill2deploy.errors import UserError

    t_start = time.perf_counter()
    data_dir = teacher_dir = ensure_data(args.data_dir, args.tar)
    if args.subset_seed is not None:
        teacher_dir = subset_folder(data_dir, args.teacher_train_subset, args.test_subset, args.subset_seed)
        data_dir = subset_folder(data_dir, args.train_subset, args.test_subset, args.subset_seed)
    if "multi_teacher" in args.methods and args.second_teacher_seed == args.teacher_seed:
        raise UserError("multi_teacher's second teacher needs its own seed", where="--second-teacher-seed",
                        fix=f"use a seed other than --teacher-seed {args.teacher_seed}")
    out = args.out.resolve()
    cfg_dir, log_dir, runs_dir = out / "configs", out / "logs", out / "runs"
    for d in (cfg_dir, log_dir, runs_dir):
        d.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "distill2deploy"]

    def make_run(name: str, kind: str, seed: int, cfg: dict[str, Any], until: str) -> Run:
        path, run_dir = cfg_dir / f"{name}.yaml", runs_dir / name
        write_config(cfg, path)
        return Run(name, kind, seed, path, run_dir, until, [*py, until, str(path), "--out", str(run_dir)])

    teacher_runs = [make_run(f"teacher_s{args.teacher_seed}", "teacher", args.teacher_seed,
                             teacher_config(args, teacher_dir, args.teacher_seed), "teacher")]
    teacher_pt = teacher_runs[0].run_dir / "teacher" / "teacher.pt"
    second_pt = None
    if "multi_teacher" in args.methods:
        s2 = args.second_teacher_seed
        teacher_runs.append(make_run(f"teacher_s{s2}", "teacher", s2, teacher_config(args, teacher_dir, s2), "teacher"))
        second_pt = teacher_runs[1].run_dir / "teacher" / "teacher.pt"
    # CE's and KD's seeds first (whether the table can rank anything rests on them), then the first seed of
    # every other method, so an interrupted benchmark still has one row per method, then the other seeds.
    first = [m for m in ("ce", "kd") if m in args.methods and m in args.multi_seed]
    plan = [(m, s) for s in args.seeds for m in first]
    plan += [(m, args.seeds[0]) for m in args.methods if m not in first]
    plan += [(m, s) for s in args.seeds[1:] for m in args.methods if m in args.multi_seed and m not in first]
    command = shlex.join([Path(sys.executable).name, *(sys.argv if argv is None else ["benchmarks/methods.py", *argv])])
    print(f"benchmark: {command}\nout: {out}\ndata: {data_dir}", flush=True)

    def student_run(variant: str, seed: int) -> Run:
        cfg = student_config(args, data_dir, variant, seed, teacher_pt, second_pt)
        return make_run(f"{variant}_s{seed}", variant, seed, cfg, "validate")

    if args.dry_run:  # configs are written; a student config is validated once its teachers exist
        for r in teacher_runs:
            print(shlex.join(r.command))
        for variant, seed in plan:
            cfg = student_config(args, data_dir, variant, seed, teacher_pt, second_pt)
            path = cfg_dir / f"{variant}_s{seed}.yaml"
            write_config(cfg, path, check=teacher_pt.is_file() and (second_pt is None or second_pt.is_file()))
            print(shlex.join([*py, "validate", str(path), "--out", str(runs_dir / f"{variant}_s{seed}")]))
        return 0

    done: list[Run] = []
    for r in teacher_runs:
        if not args.report_only:
            print(f"▶ {r.name}", flush=True)
            execute(r, log_dir, args.retries, args.teacher_threads or args.threads)
        else:
            r.status = "cached" if is_finished(r) else "missing"
        print(f"  {r.name}: {r.status} ({r.wall_seconds:.0f} s)", flush=True)
        done.append(r)
    if not teacher_pt.is_file():
        print(f"error: the teacher did not finish; see {log_dir / teacher_runs[0].name}.log", file=sys.stderr)
        return 1
    if second_pt is not None and not second_pt.is_file():
        print("multi_teacher skipped: its second teacher did not finish", flush=True)
        plan = [(m, s) for m, s in plan if m != "multi_teacher"]
    def one(variant: str, seed: int) -> Run:
        r = student_run(variant, seed)
        if args.report_only:
            r.status = "cached" if is_finished(r) else "missing"
        else:
            print(f"▶ {r.name}", flush=True)
            execute(r, log_dir, args.retries, args.threads)
        row = collect(r)
        print(f"  {r.name}: {r.status} ({r.wall_seconds:.0f} s) fp32 {_pct(row.get('student_fp32_top1'))} "
              f"int8 {_pct(row.get('student_int8_top1'))} best {_pct(row.get('student_best_top1'))} "
              f"s/epoch {row.get('epoch_seconds') or 0:.1f}", flush=True)
        return r

    # Runs are separate processes with --threads threads each: --jobs of them share the cores.
    with ThreadPoolExecutor(max_workers=1 if args.report_only else args.jobs) as pool:
        done += list(pool.map(lambda p: one(*p), plan))

    rows = [collect(r) for r in done]
    teachers = [r for r in rows if r["method"] == "teacher"]
    students = [r for r in rows if r["method"] != "teacher"]
    spreads = spread(students)
    table = markdown(students, spreads, teachers)
    wall = time.perf_counter() - t_start
    from distill2deploy import _io

    previous = _json(out / "results.json")
    trained_by = {"command": command, "wall_seconds": round(wall, 1)}
    if args.report_only and (previous.get("trained_by") or previous.get("command")):  # keep the training one
        trained_by = previous.get("trained_by") or {k: previous[k] for k in ("command", "wall_seconds")}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    title = (f"{args.student_model} students on CIFAR-10 ({args.train_subset or 'all'} train imgs, {args.epochs} ep); "
             f"{args.teacher_model} teacher ({args.teacher_train_subset or 'all'} imgs, {args.teacher_epochs} ep); "
             f"{args.test_subset or 'all'} test imgs")
    stages_min = sum(r.get("stage_seconds") or 0.0 for r in rows) / 60
    header = (f"# distill2deploy methods benchmark ({args.preset})\n\n`{trained_by['command']}`\n\n{title}. "
              f"Stage time of all runs: {stages_min:.1f} min; wall time of the training invocation: "
              f"{trained_by['wall_seconds'] / 60:.1f} min.\n\n")
    _io.write_text(out / "results.md", header + table)
    _io.write_json(out / "results.json", {"trained_by": trained_by, "tabulated_by": command, "settings": settings,
                                          "data_dir": str(data_dir), "stage_seconds": round(60 * stages_min, 1),
                                          "runs": students, "teachers": teachers, "spread": spreads,
                                          "commands": {r.name: shlex.join(r.command) for r in done}})
    plot(students, out / "methods.png", title)
    print("\n" + table)
    print(f"stage time of all runs {stages_min:.1f} min; wall time {wall / 60:.1f} min; wrote {out / 'results.md'}, "
          f"{out / 'results.json'}, {out / 'methods.png'}")
    return 0 if all(r.status in ("done", "cached") for r in done) else 1


if __name__ == "__main__":
    sys.exit(main())
