"""Training checkpoints: written whole or not at all, verified before a resume.

``checkpoints/last`` is an Accelerate ``save_state`` directory -- models, optimizers, schedulers,
scaler, per-process RNG states -- plus :data:`STATE_FILE`, the data position and the hashes of
every file, written to a temp dir and renamed, so a killed run resumes from the last complete
one. A resume refuses (and training restarts) when a file changed since it was written.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import gather_object

from .. import _io, distributed

STATE_FILE = "trainer_state.json"
STATE_VERSION = 3  # 3: the state records the hashes of the checkpoint's files and of metrics.jsonl


def recover_checkpoint(ckpt_dir: Path) -> None:
    """A kill between the two renames of :func:`save_checkpoint` leaves no ``last``: take the new
    checkpoint if its state file (written last, atomically) is there, else the previous one."""
    if ckpt_dir.exists():
        return
    partial, old = ckpt_dir.with_name(ckpt_dir.name + ".partial"), ckpt_dir.with_name(ckpt_dir.name + ".old")
    for candidate in (partial, old):
        if (candidate / STATE_FILE).is_file():
            candidate.rename(ckpt_dir)
            return


def read_state(ckpt_dir: Path) -> dict[str, Any] | None:
    f = ckpt_dir / STATE_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError:
        return None


def checkpoint_problem(ckpt_dir: Path, metrics_path: Path, state: dict[str, Any]) -> str | None:
    """Why the checkpoint (or the metrics it continues) cannot be trusted, or None when every file still
    has the hash recorded when it was written: a damaged checkpoint would otherwise load silently, and
    edited metrics would be certified as the run's history."""
    recorded = state.get("files", {})
    found = {k: v for k, v in _io.tree_files(ckpt_dir).items() if k != STATE_FILE}
    changed = sorted(k for k in set(recorded) | set(found) if recorded.get(k) != found.get(k))
    if changed:
        return f"{', '.join(changed[:3])} changed since it was written (corrupted or edited)"
    size = state.get("metrics_bytes", 0)
    have = metrics_path.stat().st_size if metrics_path.is_file() else 0
    if have < size or (size and _io.file_sha256(metrics_path, limit=size) != state.get("metrics_sha256")):
        return f"{metrics_path} changed since the checkpoint was written (corrupted or edited)"
    return None


def save_checkpoint(accelerator: Accelerator, ckpt_dir: Path, metrics_path: Path, state: dict[str, Any]) -> None:
    """Accelerate state into a temp dir, renamed over the previous checkpoint only when complete.

    The state file (written last) records the hash of every file of the checkpoint and the length and
    hash of ``metrics.jsonl`` at this point, which a resume verifies and truncates the metrics to.
    ``safe_serialization=False``: safetensors refuses channels_last (non-contiguous) weights.
    """
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".partial")
    if distributed.writes_checkpoint(accelerator) and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if distributed.writes_checkpoint(accelerator):  # metrics.jsonl exists on the global main's machine only
        size = metrics_path.stat().st_size if metrics_path.is_file() else 0
        _io.write_json(tmp / STATE_FILE, {**state, "files": _io.tree_files(tmp), "metrics_bytes": size,
                                          "metrics_sha256": _io.file_sha256(metrics_path) if size else None})
        old = ckpt_dir.with_name(ckpt_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if ckpt_dir.exists():
            ckpt_dir.rename(old)
        tmp.rename(ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def resume_state(accelerator: Accelerator, ckpt_dir: Path, metrics_path: Path, key: str, desc: str
                 ) -> dict[str, Any] | None:
    """The state of the checkpoint to resume from, loaded into ``accelerator``; or None, after removing a
    checkpoint of another config (``key``) or a damaged one, and the metrics it continued.

    Every rank joins the gather (a machine may lack the checkpoint that rank 0 has); the main process
    checks the hashes, which cover ``metrics.jsonl``, only it writes. Rows a killed run appended to
    the metrics after its last checkpoint are cut off.
    """
    if distributed.writes_checkpoint(accelerator):
        recover_checkpoint(ckpt_dir)
    accelerator.wait_for_everyone()
    state = read_state(ckpt_dir)
    resume = state is not None and state.get("key") == key and state.get("version") == STATE_VERSION
    problem = checkpoint_problem(ckpt_dir, metrics_path, state) if resume and accelerator.is_main_process else None
    problems = [p for p in (gather_object([problem]) if accelerator.num_processes > 1 else [problem]) if p]
    if problems:
        accelerator.print(f"[{desc}] warning: not resuming from {ckpt_dir}: {problems[0]}; training from scratch",
                          file=sys.stderr)
    resume = distributed.check_resume(state if resume and not problems else None, key, STATE_VERSION, ckpt_dir)
    if resume:
        accelerator.load_state(str(ckpt_dir))
        if accelerator.is_main_process and metrics_path.exists():
            os.truncate(metrics_path, state["metrics_bytes"])
    elif distributed.writes_checkpoint(accelerator):  # another config's, or damaged: not resumable
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        metrics_path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return state if resume else None
