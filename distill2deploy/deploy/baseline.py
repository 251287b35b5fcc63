"""Latency/accuracy baselines for ``check``: one JSON file, one entry per model *role*.

A pipeline run writes ``exports/<run>/baseline.json`` with the roles ``teacher``, ``student`` and
``student.int8`` (the names its files and report use); a standalone model gets its file stem
(``resnet56.int8``). Each entry holds what a later check compares against: the per-round relative
latencies per batch size (see :mod:`.benchmark`), per-image top-1 results as a bitmask (for a paired
comparison on the same images), a hash of those images, the model's input shape and file hash, and
the machine it was measured on.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import _io
from ..errors import UserError
from .benchmark import REFERENCE_VERSION, measure_relative
from .evaluate import make_session, run_batched
from .machine import fingerprint
from .runtimes import DEFAULT_RUNTIME, Session
from .metadata import read_metadata
from .validate import model_key

FORMAT = "distill2deploy.baseline/1"


def empty_baseline() -> dict[str, Any]:
    return {"format": FORMAT, "reference": REFERENCE_VERSION, "roles": {}}


def load_baseline(path: str | os.PathLike[str], *, missing_ok: bool = False) -> dict[str, Any]:
    """Read and check a baseline file; every problem a user can fix is a :class:`UserError`."""
    p = Path(path)
    if not p.is_file():
        if missing_ok:
            return empty_baseline()
        raise UserError("baseline file not found", where=str(p),
                        fix="create it with: distill2deploy check MODEL.onnx --baseline " f"{p} --update-baseline")
    try:
        data = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"baseline is not valid JSON ({e})", where=str(p),
                        fix="restore it from version control, or rewrite it with --update-baseline") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("roles"), dict):
        raise UserError(f"not a distill2deploy baseline (expected \"format\": \"{FORMAT}\")", where=str(p),
                        fix="write one with: distill2deploy check MODEL.onnx --baseline FILE --update-baseline")
    broken = [r for r, e in data["roles"].items()
              if not isinstance(e, dict) or not {"latency", "machine", "input_shape", "model_sha256"} <= set(e)]
    if broken:
        raise UserError(f"baseline entries {broken} lack latency/machine/input_shape/model_sha256", where=str(p),
                        fix="re-record them with --update-baseline --role ROLE")
    if data.get("reference") != REFERENCE_VERSION:
        raise UserError(f"baseline was timed against reference workload {data.get('reference')!r}, this version "
                        f"uses {REFERENCE_VERSION!r}: relative latencies are not comparable", where=str(p),
                        fix="re-record it with --update-baseline")
    return data


def save_entry(path: str | os.PathLike[str], role: str, entry: dict[str, Any]) -> None:
    """Add or replace one role's entry, keeping the others."""
    data = load_baseline(path, missing_ok=True)
    write_baseline(path, {**data["roles"], role: entry})


def write_baseline(path: str | os.PathLike[str], entries: dict[str, dict[str, Any]]) -> None:
    """Write a baseline with these role entries: atomic, roles sorted (same content, same bytes)."""
    _io.write_json(path, {**empty_baseline(), "roles": dict(sorted(entries.items()))})


def select_role(baseline: dict[str, Any], model_path: str | os.PathLike[str], role: str | None,
                where: str) -> str:
    """The baseline entry a model is compared with: ``role`` if given, else the only entry, else the
    entry recorded for the same file name, else the entry recorded for the same file content."""
    roles = baseline["roles"]
    if role is not None:
        if role not in roles:
            raise UserError(f"no entry for role {role!r}; the baseline has {sorted(roles) or 'none'}", where=where,
                            fix="pick one with --role, or add this one with --update-baseline")
        return role
    if len(roles) == 1:
        return next(iter(roles))
    by_name = model_key(model_path)
    if by_name in roles:
        return by_name
    sha = _io.file_sha256(model_path)
    same = [r for r, e in roles.items() if e.get("model_sha256") == sha]
    if len(same) == 1:
        return same[0]
    raise UserError(f"cannot tell which entry {Path(model_path).name} belongs to; the baseline has roles "
                    f"{sorted(roles) or 'none'}", where=where, fix="pass --role ROLE")


def data_sha256(images_uint8: np.ndarray, labels: np.ndarray) -> str:
    """Identity of an evaluation set (raw pixels and labels): accuracy is compared on the same images only."""
    h = hashlib.sha256()
    for a in (np.ascontiguousarray(images_uint8), np.asarray(labels, np.int64)):
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def pack_bits(correct: np.ndarray) -> str:
    return base64.b64encode(np.packbits(np.asarray(correct, bool)).tobytes()).decode()


def unpack_bits(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8))[:n].astype(bool)


def input_shape(session: Session, input_size: int | None) -> list[int]:
    """(C, H, W) the model is run at: the graph's fixed dims, the metadata's size for dynamic ones."""
    shape = list(session.inputs[0].shape)[1:]
    if len(shape) != 3:
        raise UserError(f"expected an image model with NCHW input, got input shape {session.inputs[0].shape}")
    c = shape[0] if isinstance(shape[0], int) else 3
    hw = [d if isinstance(d, int) else input_size for d in shape[1:]]
    if any(d is None for d in hw):
        raise UserError("the model's input size is dynamic and its metadata has no input_size",
                        fix="export it with distill2deploy (it records input_size)")
    return [int(c), *(int(d) for d in hw)]


def accuracy_entry(correct: np.ndarray, data_hash: str) -> dict[str, Any]:
    correct = np.asarray(correct, bool)
    return {"top1": float(correct.mean()), "n": int(len(correct)), "data_sha256": data_hash,
            "correct": pack_bits(correct)}


def measure_model(path: str | os.PathLike[str], *, input_size: int | None, batch_sizes: Sequence[int],
                  rounds: int, threads: int | None, images: np.ndarray | None = None,
                  labels: np.ndarray | None = None, data_hash: str | None = None,
                  expect_shape: Sequence[int] | None = None, where: str | None = None,
                  plans: dict[str, dict[str, Any]] | None = None, progress: bool = True,
                  runtime: str = DEFAULT_RUNTIME) -> dict[str, Any]:
    """One baseline entry (or the "now" side of a check): latency rounds, and per-image top-1 when
    ``images`` (float32 NCHW, preprocessed) with ``labels`` are given. ``expect_shape`` (the
    baseline's input shape) is checked before any timing; ``plans`` (the baseline's timing plans per
    batch size) make the timing procedure the baseline's. ``runtime`` runs the model (the entry's
    machine records it: a check compares like with like)."""
    session = make_session(path, threads=threads, runtime=runtime)
    shape = input_shape(session, input_size)
    if expect_shape is not None and list(expect_shape) != shape:
        raise UserError(f"the baseline was recorded for input shape {list(expect_shape)} (C, H, W), "
                        f"{Path(path).name} takes {shape}", where=where,
                        fix="check the model against its own baseline, or re-record with --update-baseline")
    entry: dict[str, Any] = {"file": Path(path).name, "model_sha256": _io.file_sha256(path),
                             "bytes": Path(path).stat().st_size, "input_shape": shape,
                             "machine": fingerprint(threads, runtime), "rounds": int(rounds)}
    if images is not None:
        # the output validate scores (the metadata's output_name), so a baseline and validate agree
        logits = run_batched(session, images, 256, output_name=read_metadata(path, require=False).get("output_name"))
        entry["accuracy"] = accuracy_entry(logits.argmax(1) == np.asarray(labels).reshape(-1), data_hash or "")
    entry["latency"] = measure_relative(session, shape, batch_sizes=batch_sizes, rounds=rounds, threads=threads,
                                        progress=progress, plans=plans)
    return entry
