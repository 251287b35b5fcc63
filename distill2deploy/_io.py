"""Atomic artifact writes and content hashes.

Every file the pipeline produces goes through these helpers so a killed run never leaves a
half-written artifact that a later run would mistake for a finished one, and the same content always
gives the same bytes (caches downstream are keyed by those bytes' hashes).

A temp file is created beside its target with the mode the umask allows (``mkstemp`` would make it
0600, unreadable for a server running as another user), written, ``fsync``-ed, renamed over the
target, and the directory is ``fsync``-ed so the rename survives a power cut.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import UserError


def _temp_name(path: Path, suffix: str = ".tmp") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; fsync it and rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _temp_name(path)
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask decides the mode
    try:
        yield tmp_path
        _fsync_file(tmp_path)
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def replace_dir(new: Path, path: Path) -> None:
    """Put directory ``new`` at ``path``, replacing what was there (two renames: old aside, new in).

    A kill between the renames leaves ``path`` missing and the old one at ``.<name>.old``;
    :func:`recover_dir` puts it back.
    """
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)


def recover_dir(path: Path) -> None:
    """Undo a :func:`replace_dir` killed between its renames (the old directory comes back)."""
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():
        os.replace(old, path)
    elif old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory; it replaces ``path`` (whole) only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def scratch_dir(beside: str | os.PathLike[str], prefix: str) -> Iterator[Path]:
    """A temporary directory next to ``beside`` (not in /tmp), removed afterwards even on failure.

    Intermediate files of an export or quantization then live on the output's file system and
    inside the run directory, where a killed run's leftovers are found and the space is the user's.
    Libraries that make their own temp directories (onnxruntime's quantizer has no ``dir``
    argument) are pointed at it through :data:`tempfile.tempdir` while the block runs.
    """
    parent = Path(beside).parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}-", dir=parent))
    saved = tempfile.tempdir
    tempfile.tempdir = str(tmp)
    try:
        yield tmp
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode())


def save_torch(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` whose bytes depend only on ``obj``.

    ``torch.save`` to a file names the archive's records after the file, so the same weights saved
    through a randomly named temp file would hash differently each time and invalidate every cache
    downstream. Saved to a buffer, the records are always under ``archive/``.
    """
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None``: JSON has no NaN or Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """Strict JSON (``allow_nan=False``) of :func:`json_safe` ``(obj)``."""
    return json.dumps(json_safe(obj), allow_nan=False, default=str, **kw)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, dumps(obj, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike[str], obj: Any) -> None:
    """Append one line; a torn last line (killed mid-write) is skipped by :func:`read_jsonl`."""
    with open(path, "a") as f:
        f.write(dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20, limit: int | None = None) -> str:
    """SHA-256 of a file (of its first ``limit`` bytes when given)."""
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as f:
        while block := f.read(chunk if left is None else min(chunk, left)):
            h.update(block)
            if left is not None:
                left -= len(block)
    return h.hexdigest()


def tree_files(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under a directory."""
    p = Path(path)
    return {str(f.relative_to(p)): file_sha256(f) for f in sorted(q for q in p.rglob("*") if q.is_file())}


def obj_sha256(obj: Any) -> str:
    """Hash of a JSON-able object, independent of dict ordering."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------ output checks
def check_writable(path: str | os.PathLike[str], flag: str, *, directory: bool = False) -> Path:
    """Fail before any work when ``path`` cannot be written: its parent missing or read-only, or a
    directory where a file is wanted (or the reverse). ``flag`` (a CLI flag or config key) is named
    in the message."""
    p = Path(path)
    if directory:
        if p.exists() and not p.is_dir():
            raise UserError(f"{p} exists and is not a directory", where=flag,
                            fix=f"give {flag} a directory path (a run directory), or move the file away")
        probe = next((q for q in [p, *p.parents] if q.exists()), Path("."))
    else:
        if p.is_dir():
            raise UserError(f"{p} is a directory", where=flag, fix=f"give {flag} a file path, e.g. {p / 'model.onnx'}")
        probe = p.parent if str(p.parent) else Path(".")
        if not probe.is_dir():
            raise UserError(f"the directory {probe} does not exist", where=flag,
                            fix=f"create it first (mkdir -p {probe}) or choose another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UserError(f"{p} is not writable (no write permission on {p if p.exists() else probe})",
                        where=flag, fix=f"choose a writable {flag}, or change the permissions")
    return p


def refuse_overwrite(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None], flag: str) -> None:
    """An output must never replace one of the inputs it is computed from (by path or same file)."""
    o = Path(out)
    for i in inputs:
        if i is None:
            continue
        src = Path(i)
        same = o.resolve() == src.resolve()
        if not same and o.exists() and src.exists():
            same = os.path.samefile(o, src)
        if same:
            raise UserError(f"the output {o} is the input {src}: writing it would destroy the input", where=flag,
                            fix=f"give {flag} another file name")
