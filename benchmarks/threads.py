"""Training step time by PyTorch intra-op thread count: the measurement behind ``threads: 1``.

Run by hand (nothing asserts on time):

    python benchmarks/threads.py                      # threads 1, 2 and every core
    python benchmarks/threads.py --threads 1 2 4 8    # a bigger machine

One KD :class:`~distill2deploy.training.step.TrainStep` (MobileNetV2-x0.5 student, ResNet-56 teacher,
batch 64, CPU) is timed at each thread count, *interleaved* in rounds (``torch.set_num_threads``
switches between them), so background load from other processes hits every setting alike. The
table reports the median step time, the spread of the rounds, and the ratio to one thread, with
the machine's load average before and after: on cores shared with other jobs more threads can be
much slower than one, on idle cores they help.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from train_throughput import interleaved, make_step, table  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=sorted({1, 2, cores}))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting and round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians are reported)")
    p.add_argument("--student", default="mobilenetv2_x0_5_cifar")
    p.add_argument("--teacher", default="resnet56_cifar")
    args = p.parse_args(argv)
    # what make_step reads
    args.num_classes, args.channels_last, args.compile = 100, False, False
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["ACCELERATE_USE_CPU"] = "true"
    import distill2deploy  # noqa: F401  (registers the *_cifar models)
    from distill2deploy.config import DistillConfig
    from distill2deploy.training.processes import make_accelerator

    accelerator = make_accelerator(DistillConfig())
    step = make_step(args, accelerator, "kd", {})
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(args.batch_size, 3, 32, 32, generator=g), torch.randint(0, 100, (args.batch_size,), generator=g)

    def run(n: int):  # noqa: ANN202
        torch.set_num_threads(n)
        return step(x, y, 0.5).loss

    load0 = os.getloadavg()
    timings = interleaved({f"{n} thread{'s' if n > 1 else ''}": (lambda n=n: run(n)) for n in args.threads},
                          steps=args.steps, warmup=args.warmup, repeats=args.repeats, device=torch.device("cpu"))
    load1 = os.getloadavg()
    base = timings[next(iter(timings))].median
    rows = [[label, f"{1e3 * t.median:.0f}", f"±{100 * t.spread:.0f}%", f"{t.median / base:.2f}x"]
            for label, t in timings.items()]
    print(f"KD step, {args.student} <- {args.teacher}, batch {args.batch_size}, {len(os.sched_getaffinity(0))} cores, "
          f"{args.repeats} rounds x {args.steps} steps; load average {load0[0]:.1f} before, {load1[0]:.1f} after")
    print(table(rows, ["setting", "ms/step", "spread", "vs first"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
