"""A fingerprint of the machine a latency figure was measured on.

Relative latencies (model time / reference-workload time, see :mod:`.benchmark`) cancel a slower
or busier machine, but not a different *kind* of machine: INT8 kernels use VNNI/AMX where the CPU
has them, and another onnxruntime release may pick other kernels. A baseline therefore records
what it ran on, and ``check`` says which of these differ instead of silently comparing.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import onnxruntime as ort

from .runtimes import DEFAULT_RUNTIME, runtime_version

#: CPU flags that change which onnxruntime kernels run (SIMD width, int8 dot products, matrix units).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "i8mm")


def _cpuinfo() -> tuple[str | None, set[str]]:
    """CPU model name and feature flags from /proc/cpuinfo (Linux); (None, empty) elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, set()
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def fingerprint(threads: int | None, runtime: str = DEFAULT_RUNTIME) -> dict[str, Any]:
    """What a latency measurement depends on besides the model: CPU, cores, ISA, runtime, threads.

    ``onnxruntime`` is always recorded (the reference workload of ``check`` runs in it); ``runtime``
    names the one that ran the model, with its version under its own name when it is another.
    """
    model, flags = _cpuinfo()
    fp = {
        "cpu": model or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "isa": sorted(f for f in ISA_FLAGS if f in flags),
        "onnxruntime": ort.__version__,
        "threads": threads,
        "runtime": runtime,
    }
    if runtime != "onnxruntime":
        fp[runtime] = runtime_version(runtime)
    return fp


def differences(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (empty when the machines match)."""
    out = []
    then = {"runtime": DEFAULT_RUNTIME, **then}  # fingerprints written before runtimes were recorded
    for key in ("cpu", "arch", "cores", "runtime", "onnxruntime", "openvino", "threads"):
        if then.get(key) != now.get(key):
            out.append(f"{key}: baseline {then.get(key)!r}, now {now.get(key)!r}")
    lost = sorted(set(then.get("isa", [])) - set(now.get("isa", [])))
    gained = sorted(set(now.get("isa", [])) - set(then.get("isa", [])))
    if lost or gained:
        out.append("ISA flags: " + ", ".join([*(f"-{f}" for f in lost), *(f"+{f}" for f in gained)]))
    return out


def describe(fp: dict[str, Any]) -> str:
    """One line for reports: 'Intel Xeon ..., 2 cores, avx512_vnni, onnxruntime 1.32.0, 1 thread'."""
    isa = [f for f in fp.get("isa", []) if "vnni" in f or "amx" in f or f in ("avx512f", "avx2", "asimddp")]
    threads = fp.get("threads")
    t = "onnxruntime's default threads" if threads is None else f"{threads} thread{'s' * (threads != 1)}"
    runtime = fp.get("runtime", DEFAULT_RUNTIME)
    return (f"{fp.get('cpu')} ({fp.get('arch')}), {fp.get('cores')} cores, ISA {'/'.join(isa) or 'baseline'}, "
            f"{runtime} {fp.get(runtime)}, {t}")
