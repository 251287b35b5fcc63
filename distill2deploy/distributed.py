"""Several processes on one machine or many: agree before acting, and give each machine what it reads.

Why this module exists: a multi-process run used to assume one run directory seen by every
process. On cloud machines without a shared filesystem, each machine has its own ``--out``; the
ranks outside rank 0's machine then found no teacher weights and no manifests, and a rank that hit
a problem of its own (a missing file) died with a traceback while the others died on a closed
connection. The design, all of it a no-op in a single process:

* **One writer.** The global main process (rank 0) alone writes artifacts, manifests and metrics,
  in its run directory, as before.
* **Run-directory layout, detected once** (:func:`check_start`): each machine's local main process
  writes a token file with a random value into its run directory; each then reports which tokens
  it can read. Every machine sees every token: *shared* (one machine, NFS, ...), nothing changes.
  Every machine sees only its own: *per machine*; anything in between is refused.
* **Per machine**, each machine's local main process keeps in its own run directory what its ranks
  read: the outputs of a stage that a later all-process stage needs (the teacher's weights), which
  rank 0 sends over the process group when they are missing or differ from the manifest's SHA-256
  (:func:`mirror_outputs`), and its own copy of the training checkpoint (Accelerate's
  ``save_on_each_node``, see :func:`writes_checkpoint`), so a resumed run finds it on every machine.
* **Decisions that depend on the disk are rank 0's** (is a stage cached? its manifest) and are
  broadcast (:func:`on_main`); those every rank must take alike (the config, a stage's inputs, the
  data, the checkpoint to resume from) are compared across ranks (:func:`check_same`).
* **Failures stop every rank together** (:func:`agree`): a step that may fail on some ranks only runs
  in a block after which the ranks exchange their status, so every rank raises the same
  :class:`~distill2deploy.errors.UserError` (exit code 2), naming the machine and the cause.
  Training itself is not wrapped: its collectives already tie the ranks together, so its inputs
  (data, teacher weights, checkpoint) are checked before it starts.
"""
from __future__ import annotations

import contextlib
import hashlib
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import _io
from .errors import UserError

T = TypeVar("T")
TOKEN_GLOB = ".d2d-machine-*.token"


@dataclass(frozen=True)
class Place:
    """Where a process runs, for messages: its machine is the one of rank ``rank - local_rank``."""

    rank: int
    local_rank: int
    host: str

    @property
    def leader(self) -> int:
        return self.rank - self.local_rank

    def describe(self, places: list[Place]) -> str:
        leaders = sorted({p.leader for p in places})
        return f"machine {leaders.index(self.leader)} ({self.host}), rank {self.rank}"


def _group() -> Any:
    """``torch.distributed`` when this run has several processes, else None (every helper is then a no-op)."""
    import torch.distributed as dist

    from .training.processes import process_state

    process_state()  # joins the process group of a launched run (idempotent)
    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _here() -> Place:
    from .training.processes import process_state

    state = process_state()
    return Place(state.process_index, state.local_process_index, socket.gethostname())


def _gather(obj: Any) -> list[tuple[Place, Any]]:
    dist = _group()
    if dist is None:
        return [(_here(), obj)]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, (_here(), obj))
    return out


@contextlib.contextmanager
def agree(what: str) -> Iterator[None]:
    """Run the body on every rank, then stop every rank with the same message if it failed on any.

    The body must not run collectives itself (a rank that failed early would not join them). A bug
    (not a :class:`UserError`) keeps its traceback on the rank where it happened; the others stop
    with a message that points there.
    """
    if _group() is None:
        yield
        return
    error: Exception | None = None
    report = None
    try:
        yield
    except UserError as e:
        error, report = e, (e.what, e.where, e.fix)
    except Exception as e:  # noqa: BLE001  (reported to every rank, then re-raised here)
        error, report = e, (f"{type(e).__name__}: {e}", None, "see the traceback printed by that rank")
    statuses = _gather(report)
    failed = [(place, r) for place, r in statuses if r is not None]
    if not failed:
        return
    if error is not None and not isinstance(error, UserError):
        raise error
    places = [p for p, _ in statuses]
    place, (msg, where, fix) = failed[0]
    more = f" (and on {len(failed) - 1} more rank{'s' if len(failed) > 2 else ''})" if len(failed) > 1 else ""
    raise UserError(f"{msg}{more}", where=f"{what}, {place.describe(places)}" + (f": {where}" if where else ""),
                    fix=fix) from None


def on_main(what: str, fn: Callable[[], T]) -> T:
    """``fn()`` run by rank 0 only and its result broadcast: rank 0's run directory decides."""
    dist = _group()
    if dist is None:
        return fn()
    box: list[Any] = [None]
    with agree(what):
        if dist.get_rank() == 0:
            box[0] = fn()
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_same(what: str, value: Any, fix: str, show: Callable[[Any], str] = str) -> None:
    """Stop every rank when ranks hold different ``value``s, listing what each machine holds.

    ``show`` runs on each rank, so it may name that rank's own paths.
    """
    statuses = _gather((value, show(value)))
    if all(v == statuses[0][1][0] for _, (v, _) in statuses):
        return
    places = [p for p, _ in statuses]
    seen: dict[str, list[str]] = {}
    for place, (_, shown) in statuses:
        seen.setdefault(shown, []).append(place.describe(places))
    listing = "; ".join(f"{', '.join(where)}: {v}" for v, where in seen.items())
    raise UserError(f"the processes disagree on {what} ({listing})", where="multi-process run", fix=fix)


def agreed(what: str, fn: Callable[[], T], fix: str) -> T:
    """``fn()`` on every rank, stopping all of them if it fails on any or gives different values."""
    value: Any = None
    with agree(what):
        value = fn()
    check_same(what, value, fix, show=lambda v: str(v)[:12])
    return value


# ------------------------------------------------------------------------------ the run directory
def check_start(cfg_sha256: str, run_dir: Path, command: Any = None) -> bool:
    """Check that every rank runs the same config and command (stage, --force) and find whether the
    run directory is shared.

    Returns True when every machine sees the same run directory (always, for one process), False
    when each machine has its own.
    """
    dist = _group()
    if dist is None:
        return True
    from . import __version__

    check_same("the config", {"config_sha256": cfg_sha256, "distill2deploy": __version__},
               fix="start every machine with the same config file, -o overrides and package version "
                   "(paths such as data.source must be the same on every machine)",
               show=lambda v: f"config {v['config_sha256'][:12]}, distill2deploy {v['distill2deploy']}")
    check_same("the command", command, fix="run the same command with the same --force options on every machine")
    here = _here()
    lead = here.local_rank == 0
    token = uuid.uuid4().hex
    mine = run_dir / f".d2d-machine-{here.rank}.token"
    with agree("checking the run directory"):
        if lead:
            try:
                _io.write_text(mine, token)
            except OSError as e:
                raise UserError(f"cannot write to the run directory {run_dir} ({e.strerror or e})", where="--out",
                                fix="give a directory this machine can write to") from None
    tokens = {place.rank: t for place, t in _gather(token if lead else None) if t is not None}
    seen = None
    if lead:
        seen = sorted(r for r, t in tokens.items() if _read(run_dir / f".d2d-machine-{r}.token") == t)
    views = [(place, s) for place, s in _gather(seen) if s is not None]
    if lead:
        mine.unlink(missing_ok=True)
    machines = sorted(tokens)
    if all(s == machines for _, s in views):
        return True
    if all(s == [place.rank] for place, s in views):
        return False
    places = [p for p, _ in views]
    listing = "; ".join(f"{p.describe(places)} sees the run directories of "
                        f"{', '.join(f'machine {machines.index(r)}' for r in s)}" for p, s in views)
    raise UserError(f"the run directory is shared by some machines but not by all ({listing})", where="--out",
                    fix="give every machine the same shared run directory, or each its own unshared one")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def manages_run_dir(state: Any, *, shared: bool) -> bool:
    """Whether this process (an Accelerate ``PartialState`` or ``Accelerator``) manages a run directory:
    the global main process when every machine sees the same one (``shared``), else each machine's
    local main process for its own copy. The one rule for the run lock, a stage's work directory and
    the training checkpoint."""
    return state.is_main_process or (not shared and state.is_local_main_process)


def writes_checkpoint(accelerator: Any) -> bool:
    """Whether this process manages the training checkpoint directory on its machine: machines keep their
    own copy when Accelerate saves on each node (``save_on_each_node``)."""
    return manages_run_dir(accelerator, shared=not accelerator.project_configuration.save_on_each_node)


def check_resume(state: dict[str, Any] | None, key: str, version: int, ckpt_dir: Path) -> bool:
    """Whether to resume from ``ckpt_dir``: the same answer, at the same position, on every rank."""
    ok = state is not None and state.get("key") == key and state.get("version") == version
    where = (state["next_epoch"], state["next_step"]) if ok else None
    check_same("the checkpoint to resume from", where,
               fix=f"every machine needs the same checkpoint at {ckpt_dir} (under its own run directory): copy "
                   "it there from the machine of rank 0, or delete it on every machine to start over",
               show=lambda w: f"none usable at {ckpt_dir}" if w is None else
               f"{ckpt_dir} at epoch {w[0]}, step {w[1]}")
    return ok


# ------------------------------------------------------------------------------ data and files
def data_fingerprint(source: Any) -> str:
    """SHA-256 of what training reads: class names, then every split's arrays (shape, dtype, bytes)."""
    h = hashlib.sha256("\n".join(source.class_names).encode())
    for split in (source.train, source.test):
        if split is None:
            h.update(b"-")
            continue
        for arr in (split.images, split.labels):
            h.update(f"{arr.shape}{arr.dtype}".encode())
            h.update(memoryview(arr).cast("B") if arr.flags.c_contiguous else arr.tobytes())
    return h.hexdigest()


def load_training_data(ctx: Any) -> None:
    """Every rank loads the training data, each machine's local main first (a download or a decode
    happens once per machine), and all of them must hold the same images."""
    if _group() is None or getattr(ctx, "_data_agreed", False):  # checked once per run, not per stage
        return
    lead = _here().local_rank == 0
    with agree("loading the data (data.source)"):
        if lead:
            ctx.data(need_train=True)
    with agree("loading the data (data.source)"):
        if not lead:
            ctx.data(need_train=True)
    check_same("the training data", data_fingerprint(ctx.data(need_train=True)),
               fix="give every machine the same data at the same path (data.source, data.root)",
               show=lambda v: f"sha256 {v[:12]}")
    ctx._data_agreed = True


def mirror_outputs(ctx: Any, stage: str) -> None:
    """On a machine with its own run directory, put there the stage's outputs its ranks read.

    Rank 0 sends each file that some machine lacks or holds with another SHA-256 than the manifest's.
    """
    dist = _group()
    if dist is None or ctx.run_dir_shared:
        return
    here = _here()
    outputs = ctx.manifests[stage]["outputs"]
    need: list[str] = []
    if here.local_rank == 0 and here.rank != 0:
        for name, out in outputs.items():
            f = ctx.run_dir / out["path"]
            if not (f.is_file() and f.stat().st_size == out["bytes"] and _io.file_sha256(f) == out["sha256"]):
                need.append(name)
    wanted = sorted({name for _, names in _gather(need) for name in names})
    for name in wanted:
        out = outputs[name]
        box: list[Any] = [(ctx.run_dir / out["path"]).read_bytes() if here.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        if name in need:
            with _io.atomic_path(ctx.run_dir / out["path"]) as tmp:
                tmp.write_bytes(box[0])
                if _io.file_sha256(tmp) != out["sha256"]:
                    raise RuntimeError(f"{stage} output {name!r} arrived with another SHA-256")

