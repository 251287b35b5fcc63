"""Latency relative to a fixed reference workload, timed in interleaved rounds (asv/pyperf style).

Absolute milliseconds on a shared CI runner move by 2-10x with the load on the machine, so a gate
on them flakes. Here every round times the model AND a fixed reference network (a small conv net
built in-process from seeded weights, so it is the same everywhere) alternately, run for run, in
the same process and thread settings. Load that slows one slows the other, and the per-round ratio
``median(model) / median(reference)`` stays put. Many short rounds give a *distribution* of
ratios, which :mod:`.regression` compares with a rank test instead of trusting one number.
"""
from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from tqdm.auto import tqdm

from ..errors import UserError
from .runtimes import OnnxRuntimeSession, Session, session_options

#: Changing the reference graph changes every relative latency: bump this so old baselines are refused.
REFERENCE_VERSION = "resnetlike32-v1"
_REF_INPUT = (3, 32, 32)
#: (channels, stride) of the reference's stages: a ResNet-like chain of 3x3 convs, ~125 MFLOP and
#: 4.7 MB of weights per image, like the CIFAR ResNets. Both matter: a reference that fits in L2
#: while the model streams its weights from L3 would not slow down with cache contention as the
#: model does (measured here: ResNet-56 at batch 1 moved 2.8 -> 11 ms while a 0.3 MB reference
#: stayed put).
_REF_STAGES = ((32, 1), (64, 2), (128, 2), (256, 2))


def reference_model() -> onnx.ModelProto:
    """The reference workload: a stem conv, then per stage conv(stride) + conv with a residual add."""
    rng = np.random.default_rng(0)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def conv(x: str, cin: int, cout: int, stride: int, out: str) -> str:
        i = len(inits) // 2
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (9 * cin))).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")])
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [out], pads=[1, 1, 1, 1], strides=[stride] * 2))
        return out

    def relu(x: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [f"{x}_r"]))
        return f"{x}_r"

    prev, cin = relu(conv("input", _REF_INPUT[0], _REF_STAGES[0][0], 1, "stem")), _REF_STAGES[0][0]
    for k, (c, stride) in enumerate(_REF_STAGES):
        h = relu(conv(prev, cin, c, stride, f"s{k}a"))
        h = conv(h, c, c, 1, f"s{k}b")
        if stride == 1 and cin == c:
            nodes.append(helper.make_node("Add", [h, prev], [f"s{k}_add"]))
            h = f"s{k}_add"
        prev, cin = relu(h), c
    fc = (rng.standard_normal((10, cin)) / np.sqrt(cin)).astype(np.float32)
    inits += [numpy_helper.from_array(fc, "fc_w"), numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "reference", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *_REF_INPUT])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="distill2deploy")
    model.ir_version = 8
    return model


def block_timer(session: Session, feed: np.ndarray,
                clock: Callable[[], float]) -> Callable[[int, bool], tuple[float, float]]:
    """(wall seconds, ``clock`` seconds) per run, timing ``n`` back-to-back runs as one block, after
    one untimed run when ``warm`` (it refills caches the other network's block evicted)."""

    def run(n: int, warm: bool = False) -> tuple[float, float]:
        if warm:
            session.run(feed)
        w0, c0 = time.perf_counter(), clock()
        for _ in range(n):
            session.run(feed)
        return (time.perf_counter() - w0) / n, (clock() - c0) / n
    return run


def _plan(t_m: float, t_r: float, block_seconds: float, round_seconds: float) -> dict[str, Any]:
    """Runs per block (model, reference), blocks per round, and whether blocks start with a warm run."""
    block = max(block_seconds, t_m, t_r)
    n_m, n_r = max(1, round(block / t_m)), max(1, round(block / t_r))
    return {"runs_per_block": [n_m, n_r], "blocks_per_round": max(1, round(round_seconds / (2 * block))),
            "warm": n_m > 1 or n_r > 1}


def measure_relative(
    session: Session,
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    rounds: int = 15,
    threads: int | None = 1,
    round_seconds: float = 0.15,
    block_seconds: float = 0.02,
    progress: bool = True,
    seed: int = 0,
    plans: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per batch size: ``relative`` (one model/reference ratio per round) and absolute p50/p99 in ms.

    ``session`` runs the model; ``input_shape`` is its (C, H, W). Model and reference are timed in
    *blocks of equal duration* (at least ``block_seconds``, several runs each when one run is
    shorter), alternating block by block. Equal durations matter on a loaded machine: a 2 ms run
    often fits in one scheduler time slice while a 7 ms run is nearly always preempted, so timing
    runs of different lengths would skew the ratio with the load (measured here: 3x). A round is
    about ``round_seconds`` of alternating blocks (at least one pair); its ratio is
    ``median(model block) / median(reference block)``, per run.

    With one thread, onnxruntime runs every op on the calling thread (so does OpenVINO's infer
    request with ``INFERENCE_NUM_THREADS`` 1: measured here, its thread CPU time equals the process's),
    and the ratio is taken on
    that thread's *CPU time* (``clock: "thread_cpu"``): time spent waiting for a core while other
    jobs run is not the model's cost. Measured here under load, this cut the round-to-round spread
    at batch 64 from 18-28% (wall clock) to 4-7%. With more threads the work is spread over
    onnxruntime's pool and wall time is used (``clock: "wall"``). Absolute p50/p99 are wall time.

    The block sizes (``plan``: runs per block, blocks per round, a warm-up run at the start of
    short blocks) are chosen from the CPU time of a few runs and returned with the figures; a check
    passes the baseline's ``plans`` back so that both sides time exactly the same procedure (with
    plans picked per process, ResNet-44's batch-1 ratio moved by 18% between processes, because
    the cold first run of a block weighs more in a shorter block).
    """
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or min(batch_sizes) < 1:
        raise UserError(f"batch sizes must be positive integers, got {batch_sizes}", fix="e.g. --batch-sizes 1 64")
    if int(rounds) < 5:
        raise UserError(f"rounds must be >= 5 for a significance test, got {rounds}", fix="e.g. --rounds 20")
    # The reference always runs in onnxruntime: it is the yardstick, whichever runtime runs the model.
    ref = OnnxRuntimeSession(ort.InferenceSession(reference_model().SerializeToString(), session_options(threads),
                                                  providers=["CPUExecutionProvider"]))
    cpu_clock = threads == 1
    clock = time.thread_time if cpu_clock else time.perf_counter
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, Any]] = {}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed run is noise, as in pyperf
    try:
        with tqdm(total=len(batch_sizes) * rounds, desc="latency rounds", unit="round", disable=not progress,
                  leave=False) as bar:
            for bs in batch_sizes:
                x_m = rng.standard_normal((bs, *input_shape), dtype=np.float32)
                run_m = block_timer(session, x_m, clock)
                run_r = block_timer(ref, rng.standard_normal((bs, *_REF_INPUT), dtype=np.float32), clock)
                run_m(3), run_r(3)  # warm-up: first runs allocate arenas and pick kernels
                plan = (plans or {}).get(str(bs))
                if plan is None:
                    t_m = float(np.median([run_m(1)[1] for _ in range(3)]))
                    t_r = float(np.median([run_r(1)[1] for _ in range(3)]))
                    plan = _plan(t_m, t_r, block_seconds, round_seconds)
                (n_m, n_r), pairs, warm = plan["runs_per_block"], plan["blocks_per_round"], plan["warm"]
                ratios, model_s, ref_s = [], [], []
                for _ in range(int(rounds)):
                    tm, tr = [], []
                    for _ in range(pairs):
                        tm.append(run_m(n_m, warm))
                        tr.append(run_r(n_r, warm))
                    ratios.append(float(np.median([c for _, c in tm]) / np.median([c for _, c in tr])))
                    model_s += [w for w, _ in tm]
                    ref_s += [w for w, _ in tr]
                    bar.update()
                    bar.set_postfix_str(f"bs={bs}")
                ms = np.asarray(model_s) * 1e3
                p50, p99 = np.percentile(ms, [50, 99])
                out[str(bs)] = {"relative": [round(r, 6) for r in ratios], "clock": "thread_cpu" if cpu_clock else "wall",
                                "p50_ms": float(p50), "p99_ms": float(p99),
                                "reference_p50_ms": float(np.median(ref_s) * 1e3),
                                "plan": plan}
    finally:
        if gc_was_enabled:
            gc.enable()
    return out
