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

# The teacher -> student pairs of the published CIFAR-100 tables that this project registers, and the file
# each teacher has in the benchmark's zoo of pretrained teachers (RepDistiller / mdistiller `cifar_teachers`,
# <dir>/<name>_vanilla/ckpt_epoch_240.pth, a dict with a "model" state dict).
STANDARD_PAIRS = ["resnet56_cifar:resnet20_cifar", "resnet110_cifar:resnet32_cifar", "resnet32x4_cifar:resnet8x4_cifar",
                  "wrn_40_2_cifar:wrn_16_2_cifar", "vgg13_bn_cifar:mobilenetv2_x0_5_cifar",
                  "resnet32x4_cifar:shufflenetv1_cifar", "resnet32x4_cifar:shufflenetv2_cifar"]
ZOO_NAMES = {"resnet56_cifar": "resnet56", "resnet110_cifar": "resnet110", "resnet32x4_cifar": "resnet32x4",
             "wrn_40_2_cifar": "wrn_40_2", "vgg13_bn_cifar": "vgg13"}
# The protocol's lr for these students (by name prefix) instead of --lr.
LOW_LR_STUDENTS = {"mobilenetv2": 0.01, "shufflenet": 0.01}

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
    # ranks). WRN-16-2 teacher -> ResNet-20 student (2.6x fewer parameters; both train well at 16x16, where
    # MobileNetV2-x0.5 stalls near 16 % train top-1) on CIFAR-10 downscaled to 16x16 (ResNet-20 is 4x faster
    # per image than at 32x32), so that 2000 images x 20 epochs converge; students stop after distill (torch
    # top-1 every epoch, no export). Every run trains on the same fixed 2k-image subset and is scored on the
    # same fixed 2k test images (--subset-seed), so the seed spread is the training's alone. The teacher sees
    # ten times the students' data (20k images): its soft labels carry knowledge the students' labels do not.
    "cpu-2h": dict(teacher_model="wrn_16_2_cifar", teacher_epochs=8, teacher_train_subset=20000, teacher_lr=0.1,
                   teacher_batch_size=64, student_model="resnet20_cifar", epochs=20, train_subset=2000,
                   test_subset=2000, lr=0.05, milestones=[0.5, 0.75], batch_size=32, num_workers=0,
                   calib_samples=256, validate_runs=10, validate_batch_sizes=[1], threads=1, teacher_threads=1,
                   jobs=2, subset_seed=0, input_size=16, crop_padding=2, until="distill", methods=RANKED_METHODS,
                   seeds=[0, 1, 2], multi_seed=RANKED_METHODS),
    # The published CIFAR-100 tables (CRD, DKD, ReviewKD): their teacher -> student pairs, the zoo's pretrained
    # teachers (--teacher-checkpoints), 240 epochs, batch 64, SGD 0.05 (0.01 for MobileNetV2 and ShuffleNet
    # students), x0.1 at 150/180/210, three seeds, every method. About 7 pairs x 10 methods x 3 seeds of GPU runs.
    "gpu-standard": dict(source="cifar100", pairs=STANDARD_PAIRS, teacher_epochs=0, teacher_train_subset=None,
                         teacher_lr=0.05, epochs=240, train_subset=None, test_subset=None, lr=0.05,
                         lr_overrides=LOW_LR_STUDENTS, milestones=[0.625, 0.75, 0.875], batch_size=64, num_workers=4,
                         calib_samples=512, validate_runs=50, validate_batch_sizes=[1, 64], threads=None, jobs=4,
                         methods=RANKED_METHODS, seeds=[0, 1, 2], multi_seed=RANKED_METHODS),
    # About ten minutes of one H200 (not measured here: no GPU was lent to this project yet): full CIFAR-10
    # from the JPEG tar given with --tar, augmentation on the GPU, batch 512 with the lr scaled linearly,
    # bf16, eight runs at a time; a ResN-20 teacher trained first, then three seeds of every ranked method.
    "gpu-10min": dict(teacher_model="resnet20_cifar", teacher_epochs=15, teacher_train_subset=None, teacher_lr=0.4,
                      student_model="mobilenetv2_x0_5_cifar", epochs=15, train_subset=None, test_subset=None, lr=0.2,
                      milestones=[0.5, 0.75], batch_size=512, num_workers=2, calib_samples=512, validate_runs=20,
                      validate_batch_sizes=[1, 64], threads=2, jobs=8, on_device=True, mixed_precision="bf16",
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
    p.add_argument("--source", help="'cifar100' for the standard protocol (downloaded by the pipeline); default: the "
                                    "CIFAR-10 ImageFolder of --data-dir / --tar")
    p.add_argument("--pairs", nargs="+", metavar="TEACHER:STUDENT",
                   help="teacher -> student pairs (default: --teacher-model:--student-model)")
    p.add_argument("--teacher-checkpoints", type=Path, metavar="DIR",
                   help="pretrained teachers in the zoo layout DIR/<name>_vanilla/ckpt_epoch_240.pth instead of "
                        "training them (the gpu-standard preset needs it)")
    p.add_argument("--teacher-threads", type=int, help="threads of the teacher's run (default: --threads)")
    p.add_argument("--subset-seed", type=int,
                   help="draw the train/test subsets once with this seed into a hard-linked ImageFolder that every "
                        "run shares (default: each run draws its own with its seed, so seeds differ in data too)")
    p.add_argument("--until", choices=["distill", "validate"],
                   help="last stage of a student run: 'distill' skips ONNX export, INT8 and onnxruntime scoring "
                        "(default: validate)")
    p.add_argument("--input-size", type=int, help="data.input_size of every run (default: the pipeline's 32)")
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
    args.pairs = [_pair(p) for p in (args.pairs or [f"{args.teacher_model}:{args.student_model}"])]
    for key, default in (("lr_overrides", {}), ("on_device", False), ("mixed_precision", None),
                         ("input_size", None), ("crop_padding", None), ("until", "validate"), ("teacher_batch_size", args.batch_size)):
        if getattr(args, key, None) is None:
            setattr(args, key, default)
    args.out = args.out or REPO / "exports" / "benchmarks" / "methods" / args.preset
    return args


@dataclass(frozen=True)
class Pair:
    teacher: str
    student: str

    @property
    def label(self) -> str:
        return f"{self.teacher.removesuffix('_cifar')}-{self.student.removesuffix('_cifar')}"


def _pair(text: str) -> Pair:
    teacher, sep, student = text.partition(":")
    if not (sep and teacher and student):
        raise SystemExit(f"error: --pairs {text}: expected TEACHER:STUDENT, e.g. resnet56_cifar:resnet20_cifar")
    return Pair(teacher, student)


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


def base_config(args: argparse.Namespace, data_dir: Path, seed: int, name: str, pair: Pair) -> dict[str, Any]:
    fixed = args.subset_seed is not None  # data_dir already holds exactly the subsets
    data: dict[str, Any] = {"source": f"folder:{data_dir}",
                            "subset": {"train": None if fixed else args.train_subset,
                                       "test": None if fixed else args.test_subset},
                            "mean": CIFAR10_MEAN, "std": CIFAR10_STD, "num_workers": args.num_workers}
    if args.source == "cifar100":  # the pipeline's own CIFAR-100 (downloaded once); its mean/std are the defaults
        data = {"source": "cifar100", "subset": data["subset"], "num_workers": args.num_workers}
    if args.on_device or args.crop_padding is not None:  # the random crop's padding scales with the input
        data["augment"] = {k: v for k, v in (("on_device", args.on_device or None),
                                             ("crop_padding", args.crop_padding)) if v is not None}
    if args.input_size:
        data["input_size"] = args.input_size
    return {
        "name": name,
        "seed": seed,
        "data": data,
        "teacher": {"model": pair.teacher, "pretrained": False},
        "student": {"model": pair.student},
        "quantize": {"calib_samples": args.calib_samples, "calib_batch_size": min(32, args.calib_samples)},
        "validate": {"runs": args.validate_runs, "batch_sizes": args.validate_batch_sizes,
                     "warmup": min(20, args.validate_runs), "threads": args.threads},
    }


def _distill(args: argparse.Namespace, **section: Any) -> dict[str, Any]:
    if args.mixed_precision:  # the teacher stage trains under distill.mixed_precision too
        section["mixed_precision"] = args.mixed_precision
    return section


def zoo_checkpoint(directory: Path, teacher: str) -> Path:
    from distill2deploy.errors import UserError

    if teacher not in ZOO_NAMES:
        raise UserError(f"the zoo has no pretrained {teacher}", where="--pairs",
                        fix=f"pair one of {', '.join(ZOO_NAMES)} or drop --teacher-checkpoints to train it")
    path = directory.expanduser() / f"{ZOO_NAMES[teacher]}_vanilla" / "ckpt_epoch_240.pth"
    if not path.is_file():
        raise UserError(f"no pretrained {teacher} at {path}", where="--teacher-checkpoints",
                        fix="download the zoo's cifar_teachers (RepDistiller's scripts/fetch_pretrained_teachers.sh) "
                            "into that directory")
    return path


def teacher_config(args: argparse.Namespace, data_dir: Path, seed: int, pair: Pair, name: str) -> dict[str, Any]:
    cfg = base_config(args, data_dir, seed, name, pair)
    if args.subset_seed is None:
        cfg["data"]["subset"]["train"] = args.teacher_train_subset
    if args.teacher_checkpoints:  # scored on the test split and saved as teacher.pt, not trained
        cfg["teacher"].update(checkpoint=str(zoo_checkpoint(args.teacher_checkpoints, pair.teacher)),
                              train={"epochs": 0})
    else:
        cfg["teacher"]["train"] = {"epochs": args.teacher_epochs, "lr": args.teacher_lr,
                                   "batch_size": args.teacher_batch_size,
                                   "milestones": _milestones(args.milestones, args.teacher_epochs)}
    cfg["distill"] = _distill(args, method="ce", batch_size=args.teacher_batch_size)
    return cfg


def student_config(args: argparse.Namespace, data_dir: Path, variant: str, seed: int, pair: Pair, name: str,
                   teacher_pt: Path, second_teacher_pt: Path | None) -> dict[str, Any]:
    from distill2deploy.config import bundled_pipelines

    method, changes = VARIANTS[variant]
    family = "shufflenet" if pair.student.startswith("shufflenet") else "mobilenet"
    shipped = yaml.safe_load((bundled_pipelines() / "methods" / f"{family}_{method}.yaml").read_text())
    options = copy.deepcopy(shipped["distill"].get("options") or {})
    options.update(changes)
    # Warm-ups keep the shipped configs' fraction of the schedule (e.g. 20 of 240 epochs).
    for key in ("warmup_epochs", "init_epochs"):  # schedules in epochs shrink with the preset's epochs
        if key in options:
            options[key] = round(options[key] * args.epochs / shipped["distill"]["epochs"], 3)
    if method == "multi_teacher":
        options["extra_teachers"] = [{"model": pair.teacher, "checkpoint": str(second_teacher_pt),
                                      "pretrained": False}]
    lr = next((v for k, v in args.lr_overrides.items() if pair.student.startswith(k)), args.lr)
    cfg = base_config(args, data_dir, seed, name, pair)
    cfg["teacher"].update(checkpoint=str(teacher_pt), train={"epochs": 0})
    cfg["distill"] = _distill(args, method=method, options=options, epochs=args.epochs, batch_size=args.batch_size,
                              lr=lr, milestones=_milestones(args.milestones, args.epochs))
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
    from distill2deploy.config import load_config
    from distill2deploy.config_keys import config_hash

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
        group = [r for r in rows if r["method"] == method and r.get("student_torch_top1") is not None]
        if len(group) < 2:
            continue
        stats = {"seeds": [r["seed"] for r in group]}
        for key in ("student_torch_top1", "student_best_top1", "student_fp32_top1", "student_int8_top1",
                    "teacher_after_top1", "student_best_epoch"):
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
    lines = ["| method (seeds) | last epoch | best epoch | best at epoch | INT8 (ORT) "
             "| co-trained teacher after | vs CE (last) |", "|---|---|---|---|---|---|---|"]
    def ce_of(method: str) -> dict[str, Any] | None:  # the CE row of the same pair ("pair/kd" -> "pair/ce")
        prefix = method.rpartition("/")[0]
        return spreads.get(f"{prefix}/ce" if prefix else "ce", {}).get("student_torch_top1")

    for m, s in spreads.items():
        last, ce = s.get("student_torch_top1"), ce_of(m)
        vs = "—" if ce is None or last is None or m.endswith("ce") else f"{100 * (last['mean'] - ce['mean']):+.2f}"
        lines.append(f"| {m} ({', '.join(map(str, s['seeds']))}) | {_ms(last)} | {_ms(s.get('student_best_top1'))} "
                     f"| {_ms(s.get('student_best_epoch'), 1, 1)} | {_ms(s.get('student_int8_top1'))} "
                     f"| {_ms(s.get('teacher_after_top1'))} | {vs} |")
    for m in [m for m in spreads if m == "kd" or m.endswith("/kd")]:
        kd, ce = spreads[m].get("student_torch_top1"), ce_of(m)
        if kd and ce:
            gap, bar = kd["mean"] - ce["mean"], 2 * max(kd["std"], ce["std"])
            lines += ["", f"{m.removesuffix('kd')}KD − CE (last epoch): {100 * gap:+.2f} points; twice the larger "
                          f"std: {100 * bar:.2f} points → "
                          f"{'KD beats CE beyond the seed spread' if gap > bar else 'NOT separated by this budget'}."]
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]], spreads: dict[str, dict[str, Any]], teachers: list[dict[str, Any]]) -> str:
    lines = ["| method | seed | teacher top-1 | teacher after | student last | student best (epoch) "
             "| student fp32 (ORT) | student INT8 (ORT) | INT8 − fp32 | s/epoch | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        after = r.get("teacher_after_top1")
        if after is None and r.get("peers_after_top1"):
            after = next(iter(r["peers_after_top1"].values()))
        delta = (None if r.get("student_int8_top1") is None or r.get("student_fp32_top1") is None
                 else r["student_int8_top1"] - r["student_fp32_top1"])
        lines.append(f"| {r['method']} | {r['seed']} | {_pct(r.get('teacher_top1'))} | {_pct(after)} "
                     f"| {_pct(r.get('student_torch_top1'))} | {_pct(r.get('student_best_top1'))} "
                     f"({r.get('student_best_epoch') or '—'}) | {_pct(r.get('student_fp32_top1'))} | {_pct(r.get('student_int8_top1'))} "
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

    methods = list(dict.fromkeys(r["method"] for r in rows if r.get("student_torch_top1") is not None))
    if not methods:
        return
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(methods) + 2), 4.2))
    x = np.arange(len(methods))
    series = tuple((k, label) for k, label in (("student_torch_top1", "last epoch"), ("student_best_top1", "best epoch"),
                                               ("student_int8_top1", "last epoch, INT8 (ORT)"))
                   if any(r.get(k) is not None for r in rows))
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
    data_dir = teacher_dir = Path("cifar100")
    if args.source != "cifar100":
        data_dir = teacher_dir = ensure_data(args.data_dir, args.tar)
    if args.subset_seed is not None and args.source != "cifar100":
        teacher_dir = subset_folder(data_dir, args.teacher_train_subset, args.test_subset, args.subset_seed)
        data_dir = subset_folder(data_dir, args.train_subset, args.test_subset, args.subset_seed)
    if "multi_teacher" in args.methods and args.second_teacher_seed == args.teacher_seed:
        raise UserError("multi_teacher's second teacher needs its own seed", where="--second-teacher-seed",
                        fix=f"use a seed other than --teacher-seed {args.teacher_seed}")
    if not args.teacher_epochs and not args.teacher_checkpoints:
        raise UserError("the teachers would be neither trained nor loaded", where=f"--preset {args.preset}",
                        fix="pass --teacher-checkpoints DIR (the zoo's cifar_teachers) or --teacher-epochs N")
    if "multi_teacher" in args.methods and args.teacher_checkpoints:
        raise UserError("multi_teacher needs a second teacher of the same architecture; the zoo has one",
                        where="--methods multi_teacher", fix="drop multi_teacher or --teacher-checkpoints")
    out = args.out.resolve()
    cfg_dir, log_dir, runs_dir = out / "configs", out / "logs", out / "runs"
    for d in (cfg_dir, log_dir, runs_dir):
        d.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "distill2deploy"]
    several = len(args.pairs) > 1  # run names carry the pair only when there is more than one

    def make_run(name: str, kind: str, seed: int, cfg: dict[str, Any], until: str, check: bool = True) -> Run:
        path, run_dir = cfg_dir / f"{name}.yaml", runs_dir / name
        write_config(cfg, path, check)
        return Run(name, kind, seed, path, run_dir, until, [*py, until, str(path), "--out", str(run_dir)])

    # One teacher run per teacher architecture (and seed), shared by every pair it teaches.
    teacher_runs: dict[tuple[str, int], Run] = {}
    for pair in args.pairs:
        for seed in [args.teacher_seed] + ([args.second_teacher_seed] if "multi_teacher" in args.methods else []):
            name = f"teacher_{pair.teacher.removesuffix('_cifar')}_s{seed}" if several else f"teacher_s{seed}"
            if (pair.teacher, seed) not in teacher_runs:
                cfg = teacher_config(args, teacher_dir, seed, pair, name)
                teacher_runs[pair.teacher, seed] = make_run(name, "teacher", seed, cfg, "teacher")

    def teacher_pts(pair: Pair) -> tuple[Path, Path | None]:
        second = teacher_runs.get((pair.teacher, args.second_teacher_seed)) if "multi_teacher" in args.methods else None
        pt = teacher_runs[pair.teacher, args.teacher_seed].run_dir / "teacher" / "teacher.pt"
        return pt, None if second is None else second.run_dir / "teacher" / "teacher.pt"

    # CE's and KD's seeds first (whether the table can rank anything rests on them), then the first seed of
    # every other method, so an interrupted benchmark still has one row per method, then the other seeds.
    first = [m for m in ("ce", "kd") if m in args.methods and m in args.multi_seed]
    order = [(m, s) for s in args.seeds for m in first]
    order += [(m, args.seeds[0]) for m in args.methods if m not in first]
    order += [(m, s) for s in args.seeds[1:] for m in args.methods if m in args.multi_seed and m not in first]
    plan = [(pair, m, s) for pair in args.pairs for m, s in order]
    command = shlex.join([Path(sys.executable).name, *(sys.argv if argv is None else ["benchmarks/methods.py", *argv])])
    print(f"benchmark: {command}\nout: {out}\ndata: {data_dir}", flush=True)

    def student_run(pair: Pair, variant: str, seed: int, check: bool = True) -> Run:
        name = f"{pair.label}__{variant}_s{seed}" if several else f"{variant}_s{seed}"
        pt, second = teacher_pts(pair)
        cfg = student_config(args, data_dir, variant, seed, pair, name, pt, second)
        return make_run(name, f"{pair.label}/{variant}" if several else variant, seed, cfg, args.until, check)

    if args.dry_run:  # configs are written; a student config is validated once its teachers exist
        for r in teacher_runs.values():
            print(shlex.join(r.command))
        for pair, variant, seed in plan:
            pt, second = teacher_pts(pair)
            print(shlex.join(student_run(pair, variant, seed,
                                         check=pt.is_file() and (second is None or second.is_file())).command))
        return 0

    done: list[Run] = []
    for r in teacher_runs.values():
        if not args.report_only:
            print(f"▶ {r.name}", flush=True)
            execute(r, log_dir, args.retries, args.teacher_threads or args.threads)
        else:
            r.status = "cached" if is_finished(r) else "missing"
        print(f"  {r.name}: {r.status} ({r.wall_seconds:.0f} s)", flush=True)
        done.append(r)
    missing = [r for r in teacher_runs.values() if not (r.run_dir / "teacher" / "teacher.pt").is_file()]
    if missing:
        print(f"error: teachers did not finish: {', '.join(r.name for r in missing)}; see {log_dir}",
              file=sys.stderr)
        return 1

    def one(pair: Pair, variant: str, seed: int) -> Run:
        r = student_run(pair, variant, seed)
        if args.report_only:
            r.status = "cached" if is_finished(r) else "missing"
        else:
            print(f"▶ {r.name}", flush=True)
            execute(r, log_dir, args.retries, args.threads)
        row = collect(r)
        print(f"  {r.name}: {r.status} ({r.wall_seconds:.0f} s) last {_pct(row.get('student_torch_top1'))} "
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
    dataset = "CIFAR-100" if args.source == "cifar100" else "CIFAR-10"
    teachers_from = ("pretrained (zoo)" if args.teacher_checkpoints else
                     f"({args.teacher_train_subset or 'all'} imgs, {args.teacher_epochs} ep)")
    title = (f"{', '.join(p.label for p in args.pairs)} on {dataset}: students {args.train_subset or 'all'} train "
             f"imgs, {args.epochs} ep; teacher {teachers_from}; "
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
