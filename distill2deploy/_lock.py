"""One run at a time per run directory: an exclusive ``flock`` on ``<run>/.lock`` held for the whole run.

Two pipelines on the same ``--out`` would interleave their stages' temp files, checkpoints and
renames and leave a directory whose manifests describe neither run. The kernel releases a ``flock``
when its process dies, so a run killed with ``kill -9`` never blocks the next one; the owner record
it leaves in the lock file (pid, host, command) is reported as a stale lock when the next run takes
over. The file is removed when a run ends, so a finished run directory holds no trace of the lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

LOCK_NAME = ".lock"


def _owner_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _read_owner(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 1 << 16)
    try:
        return json.loads(data) if data.strip() else None
    except ValueError:
        return {"command": data[:200].decode(errors="replace")}


def describe_owner(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another process (it has not written its details yet)"
    return (f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started', '?')}: "
            f"{owner.get('command', '?')}")


class RunLock:
    """A held lock; :meth:`release` (or leaving :func:`locked`) removes the file and unlocks."""

    def __init__(self, path: Path, fd: int, stale: dict[str, Any] | None) -> None:
        self.path, self.fd, self.stale = path, fd, stale

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Take the lock or raise a :class:`UserError` naming the process that holds it."""
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run directory ({e.strerror})", where=str(run_dir),
                            fix="choose a writable --out directory") from None
        if not run_dir.is_dir():
            raise UserError("the run directory path is a file", where=str(run_dir),
                            fix="give --out a directory path, or move the file away")
        path = run_dir / LOCK_NAME
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise UserError(f"cannot write in the run directory ({e.strerror})", where=str(run_dir),
                                fix="choose a writable --out directory, or fix its permissions") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise UserError(f"another run is using this run directory: {describe_owner(owner)}",
                                where=str(run_dir),
                                fix="wait for it to finish (or stop it), or give this run another --out") from None
            # A run that was releasing may have unlinked the file we opened: lock the current one.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read_owner(fd)  # a record with nobody holding the lock: its run was killed
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(_owner_record()) + "\n").encode())
        return cls(path, fd, stale)

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still locked: nobody can take a lock on a file about to vanish
        os.close(self.fd)
        self.fd = -1


@contextlib.contextmanager
def locked(run_dir: Path, *, per_machine: bool = True) -> Iterator[None]:
    """Hold the run directory's lock for the block, in the one process per machine that writes.

    Under a multi-process launch the local main process takes the lock (only the global main one
    when every machine shares the run directory: ``per_machine=False``) and every process learns
    whether it succeeded (a collective), so the others fail with it instead of waiting forever.
    """
    from .distributed import manages_run_dir
    from .training.processes import process_state

    state = process_state()
    lock: RunLock | None = None
    error: UserError | None = None
    if manages_run_dir(state, shared=not per_machine):
        try:
            lock = RunLock.acquire(run_dir)
        except UserError as e:
            error = e
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        if any(gather_object([error is not None])) and error is None:
            if lock is not None:
                lock.release()
            raise UserError("a process of this launch could not lock its run directory (see its message)",
                            where=str(run_dir))
    if error is not None:
        raise error
    try:
        if lock is not None and lock.stale is not None:
            print(f"note: a previous run ended without releasing {lock.path} ({describe_owner(lock.stale)}); "
                  "it was killed, its checkpoints are resumed where they match", file=sys.stderr)
        yield
    finally:
        if lock is not None:
            lock.release()
