"""Step time per process: 2 processes on one machine vs 2 "machines" (one process each) on loopback.

Run by hand (nothing here asserts on time):

    OMP_NUM_THREADS=1 python benchmarks/multinode.py                # KD, ResNet-56 -> MobileNetV2-x0.5
    OMP_NUM_THREADS=1 python benchmarks/multinode.py --repeats 3 --epochs 3

Both layouts run the real CLI (``distill2deploy distill``) under ``accelerate launch`` with gloo on
CPU, the same config and global batch: ``one machine`` is ``--num_machines 1 --num_processes 2``;
``two machines`` is two launchers, ``--num_machines 2 --machine_rank 0|1`` meeting on
127.0.0.1, each with its own run directory (so machine 1 also receives the teacher weights from
rank 0 and keeps its own checkpoint). The layouts alternate ``--repeats`` times so background load
hits both alike. A process's step time is its epoch's training time (``images_per_second`` in
``metrics.jsonl``, evaluation excluded) over the epoch's steps; the table reports the median over
rounds of the last epoch (the first pays for warm-up) and the whole command's wall time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--mixed_precision", "no", "--dynamo_backend", "no"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=SHARED / "data" / "cifar100_sample.npz")
    p.add_argument("--teacher", default="resnet56_cifar")
    p.add_argument("--teacher-weights", type=Path, default=SHARED / "weights" / "cifar100_resnet56.pth")
    p.add_argument("--method", default="kd")
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--train-images", type=int, default=448)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _cli(args: argparse.Namespace, run_dir: Path) -> list[str]:
    return ["-m", "distill2deploy", "distill", "quickstart", "--out", str(run_dir),
            "-o", f"data.source=npz:{args.data}", "-o", f"teacher.model={args.teacher}",
            "-o", f"teacher.checkpoint={args.teacher_weights}", "-o", f"data.subset.train={args.train_images}",
            "-o", "data.subset.test=128", "-o", "data.num_workers=0", "-o", f"distill.epochs={args.epochs}",
            "-o", f"distill.batch_size={args.batch_size}", "-o", f"distill.method={args.method}"]


def run(args: argparse.Namespace, layout: str, root: Path) -> tuple[float, list[dict]]:
    """One run of ``layout``; returns its wall time and rank 0's metrics rows."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    run_dirs = [Path(tempfile.mkdtemp(prefix=f"{layout.replace(' ', '_')}-", dir=root)) for _ in range(2)]
    port = _port()
    if layout == "one machine":
        cmds = [[*LAUNCH, "--num_machines", "1", "--main_process_port", port, *_cli(args, run_dirs[0])]]
    else:
        cmds = [[*LAUNCH, "--num_machines", "2", "--machine_rank", str(m), "--main_process_ip", "127.0.0.1",
                 "--main_process_port", port, *_cli(args, run_dirs[m])] for m in (0, 1)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            sys.exit(f"{layout} failed:\n{out[-3000:]}")
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dirs[0] / "distill" / "metrics.jsonl").read_text().splitlines()]
    return wall, rows


def step_ms(row: dict, batch_size: int) -> float:
    steps = math.ceil(row["train_images"] / batch_size)
    return 1000 * row["train_images"] / row["images_per_second"] / steps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    layouts = ["one machine", "two machines"]
    results: dict[str, dict[str, list[float]]] = {k: {"step_ms": [], "wall_s": []} for k in layouts}
    print(f"{args.method}: {args.teacher} -> quickstart student, {args.train_images} images, global batch "
          f"{args.batch_size}, {args.epochs} epochs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, "
          f"{args.repeats} interleaved rounds", flush=True)
    with tempfile.TemporaryDirectory(prefix="d2d-multinode-") as tmp:
        for r in range(args.repeats):
            for layout in layouts:
                wall, rows = run(args, layout, Path(tmp))
                assert rows[-1]["processes"] == 2
                ms = step_ms(rows[-1], args.batch_size)
                results[layout]["step_ms"].append(ms)
                results[layout]["wall_s"].append(wall)
                print(f"  round {r + 1}: {layout}: {ms:.0f} ms/step, command {wall:.1f} s", flush=True)
    base = statistics.median(results["one machine"]["step_ms"])
    print(f"\n{'layout':<14} {'step ms/process':>16} {'per round':>20} {'x one machine':>14} {'command s':>10}")
    for layout in layouts:
        t = results[layout]
        med = statistics.median(t["step_ms"])
        rounds = "/".join(f"{v:.0f}" for v in t["step_ms"])
        print(f"{layout:<14} {med:>16.0f} {rounds:>20} {med / base:>14.2f} {statistics.median(t['wall_s']):>10.1f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
