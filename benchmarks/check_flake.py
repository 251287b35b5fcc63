"""How often does ``distill2deploy check`` give the right verdict on a loaded machine? Prints a table.

Three scenarios, each run ``--runs`` times against one baseline recorded once for ResNet-44:

- ``unchanged``: the same ResNet-44 ONNX file; every run should pass (exit 0);
- ``slower``: ResNet-56 (about 1.27x the compute) under the same file name; every run should fail (exit 1);
- ``accuracy``: ResNet-44 with seeded Gaussian noise (0.15 std of each conv weight) on its conv weights,
  under the same file name: the same compute, 6 points less top-1 on the 400-image sample; every run
  should fail. (ResNet-20 in the slot, 2.75 points less on those 400 images, is *not* a drop beyond a
  0.5-point budget with confidence: its paired 95% interval is [-6.75, +1.25] points.)

Run it while other work loads the machine (that is the point)::

    python benchmarks/check_flake.py --runs 20 --data npz:../shared/data/cifar100_sample.npz \\
        --weights ../shared/weights --workdir /tmp/check_flake

Each check is a fresh ``python -m distill2deploy check`` process, as in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCENARIOS = {"unchanged": ("resnet44", 0), "slower": ("resnet56", 1), "accuracy": ("resnet44_noisy", 1)}


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "distill2deploy", *args], capture_output=True, text=True, env=env)


def export(model: str, weights: Path, data: str, out: Path) -> None:
    if out.is_file():
        return
    r = cli("export", "--model", f"{model}_cifar", "--checkpoint", str(weights / f"cifar100_{model}.pth"),
            "--data", data, "--out", str(out))
    if r.returncode != 0:
        sys.exit(f"export of {model} failed:\n{r.stderr[-2000:]}")


def add_weight_noise(src: Path, out: Path, sigma: float = 0.15, seed: int = 0) -> None:
    """A model as a botched training run leaves it: same graph and compute, worse weights."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model, rng = onnx.load(str(src)), np.random.default_rng(seed)
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.ndim == 4:
            noisy = a + sigma * a.std() * rng.standard_normal(a.shape)
            t.CopyFrom(numpy_helper.from_array(noisy.astype(a.dtype), t.name))
    onnx.save(model, str(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--data", default="npz:../shared/data/cifar100_sample.npz")
    ap.add_argument("--weights", type=Path, default=Path("../shared/weights"))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/check_flake"))
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    args = ap.parse_args()

    models = args.workdir / "models"
    models.mkdir(parents=True, exist_ok=True)
    for name in ("resnet44", "resnet56"):
        export(name, args.weights, args.data, models / f"{name}.onnx")
    if not (models / "resnet44_noisy.onnx").is_file():
        add_weight_noise(models / "resnet44.onnx", models / "resnet44_noisy.onnx")
    baseline = args.workdir / "baseline.json"
    if not baseline.is_file():
        r = cli("check", str(models / "resnet44.onnx"), "--baseline", str(baseline), "--data", args.data,
                "--update-baseline")
        if r.returncode != 0:
            sys.exit(f"recording the baseline failed:\n{r.stderr[-2000:]}")
    rows = []
    results: dict[str, list] = {s: [] for s in args.scenarios}
    for i in range(args.runs):  # scenarios interleaved, so each sees the same mix of load
        for s in args.scenarios:
            model, _ = SCENARIOS[s]
            slot = args.workdir / s / "resnet44.onnx"  # the baseline's file name, whatever the content
            slot.parent.mkdir(exist_ok=True)
            shutil.copyfile(models / f"{model}.onnx", slot)
            out = args.workdir / s / f"check{i}.json"
            t0 = time.perf_counter()
            r = cli("check", str(slot), "--baseline", str(baseline), "--data", args.data, "--json", str(out))
            secs = time.perf_counter() - t0
            figures = json.loads(out.read_text())["figures"] if out.is_file() else {}
            results[s].append((r.returncode, secs, figures))
            print(f"run {i + 1}/{args.runs} {s}: exit {r.returncode} in {secs:.1f}s " + " ".join(
                f"{k} {100 * v['change']:+.1f}%" if "change" in v else f"{k} {v['change_pts']:+.2f}pts"
                for k, v in figures.items()), file=sys.stderr, flush=True)
    for s in args.scenarios:
        codes = [c for c, _, _ in results[s]]
        expected = SCENARIOS[s][1]
        changes = {k: [f.get("change", 0) * 100 if "change" in f else f["change_pts"] for _, _, fs in results[s]
                       for kk, f in fs.items() if kk == k] for k in (results[s][0][2] if results[s] else {})}
        spread = " ".join(f"{k} {min(v):+.1f}..{max(v):+.1f}" for k, v in changes.items())
        rows.append([s, SCENARIOS[s][0], f"exit {expected}", f"{sum(c == expected for c in codes)}/{len(codes)}",
                     " ".join(f"{c}:{codes.count(c)}" for c in sorted(set(codes))),
                     f"{statistics.median(t for _, t, _ in results[s]):.1f}", spread])
    head = ["scenario", "model in slot", "expected", "right", "exit codes", "median s", "change range (% / pts)"]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"\n{args.runs} runs per scenario, 1 onnxruntime thread, load average {os.getloadavg()[0]:.1f} at the end "
          f"on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
