"""CPU latency and throughput of ONNX models in onnxruntime (or OpenVINO, see :mod:`.runtimes`).

Percentiles rather than a mean are the headline: on a shared machine a few runs get preempted, and
p50 is what a steady-state deployment sees. Each run is timed on its own with
``time.perf_counter`` so that p90/p99 describe tail latency, not averages over runs.

When several models are compared (fp32 vs int8), their timed runs are *interleaved* in rounds
rather than measured one model after the other: background load on a shared machine then hits
all models alike and their ratio stays meaningful even when the absolute numbers drift.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..errors import UserError
from .machine import fingerprint
from .runtimes import make_session


def spread(values: Sequence[float]) -> float:
    """(max - min) / median of per-round figures: how much they moved while the load changed."""
    x = np.asarray(values, dtype=float)
    return float((x.max() - x.min()) / np.median(x))


def _stats_ms(rounds_s: list[list[float]]) -> dict[str, Any]:
    """Percentiles over all runs, plus each round's p50 and their spread ((max - min) / median):
    the run-to-run movement that tells a reader whether the load changed while timing."""
    ms = np.concatenate([np.asarray(r) for r in rounds_s if r]) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    per_round = [float(np.median(r) * 1e3) for r in rounds_s if r]
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(ms.mean()),
            "round_p50": per_round, "round_spread": spread(per_round)}


def _chunks(total: int, rounds: int) -> list[int]:
    rounds = max(1, min(rounds, total))
    base, extra = divmod(total, rounds)
    return [base + (i < extra) for i in range(rounds)]


def measure_latency_many(
    paths: Sequence[str | os.PathLike[str]],
    *,
    input_sizes: Sequence[int],
    batch_sizes: Iterable[int] = (1, 64),
    warmup: int = 20,
    runs: int = 200,
    threads: int | None = None,
    progress: bool = True,
    rounds: int = 10,
    seed: int = 0,
    runtimes: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """:func:`measure_latency` for several models at once, timed runs interleaved in ``rounds``.

    ``runtimes`` gives each path's runtime (default: onnxruntime for all); the same file may be
    listed once per runtime, so runtimes are compared under the same load. Returns one result per
    path, in order.
    """
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or min(batch_sizes) < 1:
        raise UserError(f"batch sizes must be positive integers, got {batch_sizes}")
    if int(runs) < 1 or int(warmup) < 0:
        raise UserError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    runtimes = list(runtimes) if runtimes is not None else ["onnxruntime"] * len(paths)
    if len(input_sizes) != len(paths) or len(runtimes) != len(paths):
        raise ValueError("one input size and one runtime per model are needed")
    runs, warmup = int(runs), int(warmup)
    sessions, feeds_shape = [], []
    for path, size, runtime in zip(paths, input_sizes, runtimes):
        session = make_session(path, threads=threads, runtime=runtime)
        shape = session.inputs[0].shape
        fixed = [d for d in shape[2:] if isinstance(d, int)]
        if any(d != size for d in fixed):
            raise UserError(f"input_size {size} does not match the model input {shape}",
                            where=os.fspath(path), fix="use the input_size from the model's metadata")
        chans = shape[1] if isinstance(shape[1], int) else 3
        sessions.append(session)
        feeds_shape.append((chans, int(size), int(size)))

    rng = np.random.default_rng(seed)
    times = {(m, bs): [] for m in range(len(paths)) for bs in batch_sizes}
    names = ", ".join(os.path.basename(os.fspath(p)) for p in paths)
    total = len(batch_sizes) * len(paths) * (warmup + runs)
    with tqdm(total=total, desc=f"latency {names}", unit="run", disable=not progress, leave=False) as bar:
        for bs in batch_sizes:
            # Random normal = the scale of normalised images; the same tensor for every model.
            feeds = [rng.standard_normal((bs, *shape), dtype=np.float32) for shape in feeds_shape]
            for session, feed in zip(sessions, feeds):
                for _ in range(warmup):
                    session.run(feed)
                    bar.update()
            for chunk in _chunks(runs, rounds):
                for m, (session, feed) in enumerate(zip(sessions, feeds)):
                    out: list[float] = []
                    times[(m, bs)].append(out)
                    for _ in range(chunk):
                        t0 = time.perf_counter()
                        session.run(feed)
                        out.append(time.perf_counter() - t0)
                    bar.update(chunk)
                    bar.set_postfix_str(f"bs={bs}")

    results = []
    for m, runtime in enumerate(runtimes):
        lat = {str(bs): _stats_ms(times[(m, bs)]) for bs in batch_sizes}
        machine = fingerprint(threads, runtime)
        results.append({
            "latency_ms": lat,
            # from p50, not total time: a few preempted runs must not halve the headline figure
            "throughput_ips": {str(bs): float(bs * 1e3 / lat[str(bs)]["p50"]) for bs in batch_sizes},
            "settings": {"warmup": warmup, "runs": runs, "rounds": rounds, "threads": threads,
                         "runtime": runtime,
                         "provider": "CPUExecutionProvider" if runtime == "onnxruntime" else "CPU", "onnxruntime": machine["onnxruntime"],
                         "cpu": machine["cpu"], "cpu_count": os.cpu_count(), "machine": machine},
        })
    return results


def measure_latency(
    path: str | os.PathLike[str],
    *,
    input_size: int,
    batch_sizes: Iterable[int] = (1, 64),
    warmup: int = 20,
    runs: int = 200,
    threads: int | None = None,
    progress: bool = True,
    seed: int = 0,
    runtime: str = "onnxruntime",
) -> dict[str, Any]:
    """Time ``runs`` single inferences per batch size after ``warmup`` untimed ones.

    Returns ``{"latency_ms": {"<bs>": {"p50", "p90", "p99", "mean", "round_p50", "round_spread"}},
    "throughput_ips": {"<bs>": images/s}, "settings": {...}}`` with throughput = bs / p50.
    ``threads=None`` keeps onnxruntime's default intra-op thread count (one per physical core).
    """
    return measure_latency_many([path], input_sizes=[input_size], batch_sizes=batch_sizes,
                                warmup=warmup, runs=runs, threads=threads, progress=progress,
                                seed=seed, runtimes=[runtime])[0]
