"""Stages (Olive-style passes): declared inputs, cached outputs, atomic manifests.

A stage's cache key is derived, not hand-picked: each stage declares the config it reads
(:attr:`Stage.reads`: sections, or dotted keys where it reads only part of one) and the files the config
names (:meth:`Stage.key_files`), and the key is the hash of exactly those plus the content hashes of its
upstream stages' outputs. Changing a section reruns the stages that read it and, through their outputs,
their dependants; nothing else. Its manifest (``<run>/<stage>/stage.json``) is written last, so a stage
counts as done only when every output exists with the recorded hash.

A stage builds its outputs in a work directory of its own (``<run>/.work/<stage>-<key>``) and the
finished directory replaces ``<run>/<stage>`` only when the stage has succeeded: a rerun that fails
(a bad option, a diverging loss, a full disk) leaves the previous results untouched. A killed
training stage's work directory keeps its checkpoints, so rerunning the same command resumes it.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from .. import __version__, _io
from ..config import CIFAR100_MEAN, CIFAR100_STD, PipelineConfig
from ..config_keys import config_slice
from ..data import DataSource, load_source, subset_source, warn_default_stats
from ..errors import UserError

MANIFEST = "stage.json"
WORK = ".work"


@dataclass
class StageResult:
    outputs: dict[str, Path]  # name -> file written by the stage
    summary: dict[str, Any] = field(default_factory=dict)


class RunContext:
    """What every stage of one run shares: config, run directory, data, process state."""

    def __init__(self, cfg: PipelineConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.manifests: dict[str, dict[str, Any]] = {}
        #: False when each machine of a multi-machine run has its own run directory (see distributed.py)
        self.run_dir_shared = True

    @cached_property
    def accelerator(self):  # noqa: ANN201  (accelerate is imported lazily: slow to import)
        from ..training.processes import make_accelerator

        return make_accelerator(self.cfg.distill, save_on_each_node=not self.run_dir_shared)

    @property
    def is_main(self) -> bool:
        from ..training.processes import process_state  # joins a multi-process CPU launch with gloo (see there)

        return process_state().is_main_process

    def keeps_work(self, stage: "Stage") -> bool:
        """Whether this process manages ``stage``'s work directory on its machine: the main process, and
        for the training stages each machine's first process when machines keep their own run
        directory (its checkpoints live there, so a rerun resumes or restarts alike on every machine)."""
        from ..distributed import manages_run_dir
        from ..training.processes import process_state

        # only the training stages run in every process; the others' work is the main process's alone
        return manages_run_dir(process_state(), shared=self.run_dir_shared or not stage.all_processes)

    def data(self, need_train: bool = True) -> DataSource:
        key = "_data_train" if need_train else "_data_test"
        if not hasattr(self, key):
            d = self.cfg.data
            src = load_source(d.source, root=d.root, download=d.download, need_train=need_train,
                              num_classes=d.num_classes)
            if d.num_classes is not None and src.named and d.num_classes != src.num_classes:
                raise UserError(f"the data has {src.num_classes} class names but data.num_classes is {d.num_classes}",
                                where="data.num_classes", fix=f"set data.num_classes: {src.num_classes}, or remove it")
            warn_default_stats(src.train or src.test, d.mean, d.std, defaults=(CIFAR100_MEAN, CIFAR100_STD))
            src = subset_source(src, d.subset.train if need_train else None, d.subset.test, self.cfg.seed)
            setattr(self, key, src)
        return getattr(self, key)

    def output(self, stage: str, name: str) -> Path:
        try:
            return self.run_dir / self.manifests[stage]["outputs"][name]["path"]
        except KeyError:
            raise RuntimeError(f"stage {stage!r} has no output {name!r}") from None

    def has_output(self, stage: str, name: str) -> bool:
        return name in self.manifests.get(stage, {}).get("outputs", {})


class Stage:
    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    #: the config this stage's outputs depend on: top-level sections (``"data"``) or dotted keys
    #: (``"distill.mixed_precision"``); the cache key covers exactly these (see config_slice)
    reads: ClassVar[tuple[str, ...]] = ()
    #: training stages run in every process under ``accelerate launch``; the rest on the main one only
    all_processes: ClassVar[bool] = False

    def key_files(self, ctx: RunContext) -> dict[str, Any]:
        """Content hashes of the files the config names (a path's bytes, not its name, are the input)."""
        return {}

    def run(self, ctx: RunContext, stage_dir: Path) -> StageResult:
        raise NotImplementedError

    # --- work directories --------------------------------------------------------------
    #: files of a finished run that let a rerun with the same key resume instead of starting over
    resume_files: ClassVar[tuple[str, ...]] = ()
    #: the trainer's checkpoint among them: its key decides whether a finished stage's files are reused
    checkpoint_dir: ClassVar[str] = "checkpoints/last"

    def resume_key(self, ctx: RunContext, key: str) -> str:
        """The key a finished stage's checkpoint must carry for its resume files to be reused: the stage's
        cache key, unless the training is only part of the stage (quantize's QAT has a key of its own)."""
        return key

    def work_dir(self, ctx: RunContext, key: str) -> Path:
        return ctx.run_dir / WORK / f"{self.name}-{key[:16]}"

    def prepare_work(self, ctx: RunContext, key: str, *, fresh: bool) -> Path:
        """The directory :meth:`run` writes to. Unless ``fresh`` (``--force``), the finished stage's
        resume files are copied in when its checkpoint has this key: a deleted output is then rebuilt
        from the checkpoint instead of by retraining."""
        work = self.work_dir(ctx, key)
        if not ctx.keeps_work(self):
            return work
        if work.exists() and not self.resume_files:  # a killed run's partial outputs: nothing to resume
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        for junk in work.glob(".*"):  # temp files and scratch folders of a killed run
            if junk.is_dir():
                shutil.rmtree(junk)
            else:
                junk.unlink()
        done = ctx.run_dir / self.name
        if fresh or not self.resume_files or any((work / f).exists() for f in self.resume_files):
            return work
        if _checkpoint_key(done / self.checkpoint_dir) == self.resume_key(ctx, key):
            for f in self.resume_files:
                src = done / f
                if src.is_dir():
                    shutil.copytree(src, work / f)
                elif src.is_file():
                    (work / f).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, work / f)
        return work

    def publish(self, ctx: RunContext, work: Path) -> None:
        """Swap the finished work directory in as ``<run>/<stage>``; drop work left by other configs."""
        _io.replace_dir(work, ctx.run_dir / self.name)
        for other in (ctx.run_dir / WORK).glob(f"{self.name}-*"):
            shutil.rmtree(other, ignore_errors=True)
        _remove_if_empty(ctx.run_dir / WORK)

    def abandon(self, ctx: RunContext, work: Path) -> None:
        """After a failure: keep a work directory only when it holds a checkpoint to resume from."""
        if work.exists() and not (work / self.checkpoint_dir).parent.exists():
            shutil.rmtree(work, ignore_errors=True)
            _remove_if_empty(ctx.run_dir / WORK)

    # --- caching ---------------------------------------------------------------------
    def cache_key(self, ctx: RunContext) -> str:
        upstream = {dep: ctx.manifests[dep]["outputs_sha256"] for dep in self.needs if dep in ctx.manifests}
        return _io.obj_sha256({"stage": self.name, "version": __version__,
                               "config": config_slice(ctx.cfg, self.reads), "files": self.key_files(ctx),
                               "upstream": upstream})

    def cached_manifest(self, ctx: RunContext, key: str) -> dict[str, Any] | None:
        path = ctx.run_dir / self.name / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
        except ValueError:
            return None
        if manifest.get("key") != key:
            return None
        for out in manifest.get("outputs", {}).values():
            f = ctx.run_dir / out["path"]
            if not f.is_file() or f.stat().st_size != out["bytes"] or _io.file_sha256(f) != out["sha256"]:
                return None
        return manifest

    def write_manifest(self, ctx: RunContext, key: str, result: StageResult, seconds: float,
                       work: Path | None = None) -> dict[str, Any]:
        """Write ``stage.json`` into ``work`` (default: the stage directory), with output paths as they
        will be once ``work`` is published as ``<run>/<stage>``."""
        work = work if work is not None else ctx.run_dir / self.name
        outputs = {}
        for name, path in result.outputs.items():
            p = Path(path).resolve()
            rel = (Path(self.name) / p.relative_to(work.resolve()) if p.is_relative_to(work.resolve())
                   else p.relative_to(ctx.run_dir.resolve()))
            outputs[name] = {"path": str(rel), "bytes": p.stat().st_size, "sha256": _io.file_sha256(p)}
        manifest = {"stage": self.name, "key": key, "outputs": outputs,
                    "outputs_sha256": _io.obj_sha256({k: v["sha256"] for k, v in outputs.items()}),
                    "summary": result.summary, "seconds": round(seconds, 3),
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _io.write_json(work / MANIFEST, manifest)
        return manifest


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _checkpoint_key(ckpt_dir: Path) -> str | None:
    """The key a finished training stage's last checkpoint was written under."""
    from ..training.checkpoint import read_state  # the trainer owns its state file's name and format

    state = read_state(ckpt_dir)
    return state.get("key") if isinstance(state, dict) else None


def file_sha256(path: str | None, where: str) -> str | None:
    """The content hash of a configured file (None when not configured; ``~`` is the home directory). A
    missing file fails here, naming the config key, before any work."""
    if path is None:
        return None
    if not Path(path).expanduser().is_file():
        raise UserError(f"file not found: {path}", where=where, fix="check the path (relative paths are resolved "
                        "from the directory you run the command in; ~ is your home directory)")
    return _io.file_sha256(Path(path).expanduser())
