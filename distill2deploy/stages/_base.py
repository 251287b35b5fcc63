"""Stages (Olive-style passes): declared inputs, cached outputs, atomic manifests.

A stage's cache key is the hash of the config it reads plus the content hashes of its
upstream stages' outputs. Its manifest (``<run>/<stage>/stage.json``) is written last, so a stage
counts as done only when every output exists with the recorded hash.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from .. import __version__, _io
from .._schema import to_dict
from ..config import PipelineConfig, config_dict
from ..data import DataSource, load_source, subset_source
from ..errors import UserError

MANIFEST = "stage.json"


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
        from ..trainer import make_accelerator

        return make_accelerator(self.cfg.distill, save_on_each_node=not self.run_dir_shared)

    @property
    def is_main(self) -> bool:
        from ..trainer import process_state  # joins a multi-process CPU launch with gloo (see there)

        return process_state().is_main_process

    def data(self, need_train: bool = True) -> DataSource:
        key = "_data_train" if need_train else "_data_test"
        if not hasattr(self, key):
            d = self.cfg.data
            src = load_source(d.source, root=d.root, download=d.download, need_train=need_train)
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

    def data_key(self) -> dict[str, Any]:
        """The parts of ``data`` that change what a model sees (not worker counts)."""
        d = config_dict(self.cfg)["data"]
        d.pop("num_workers", None)
        return d


class Stage:
    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    #: training stages run in every process under ``accelerate launch``; the rest on the main one only
    all_processes: ClassVar[bool] = False

    def key_inputs(self, ctx: RunContext) -> dict[str, Any]:
        raise NotImplementedError

    def run(self, ctx: RunContext, stage_dir: Path) -> StageResult:
        raise NotImplementedError

    # --- caching ---------------------------------------------------------------------
    def cache_key(self, ctx: RunContext) -> str:
        upstream = {dep: ctx.manifests[dep]["outputs_sha256"] for dep in self.needs if dep in ctx.manifests}
        return _io.obj_sha256({"stage": self.name, "version": __version__, "inputs": to_dict(self.key_inputs(ctx)),
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

    def write_manifest(self, ctx: RunContext, key: str, result: StageResult, seconds: float) -> dict[str, Any]:
        outputs = {}
        for name, path in result.outputs.items():
            outputs[name] = {"path": str(Path(path).resolve().relative_to(ctx.run_dir.resolve())),
                             "bytes": Path(path).stat().st_size, "sha256": _io.file_sha256(path)}
        manifest = {"stage": self.name, "key": key, "outputs": outputs,
                    "outputs_sha256": _io.obj_sha256({k: v["sha256"] for k, v in outputs.items()}),
                    "summary": result.summary, "seconds": round(seconds, 3),
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _io.write_json(ctx.run_dir / self.name / MANIFEST, manifest)
        return manifest


def require_file(path: str | None, where: str) -> str | None:
    """Fail early, naming the config key, when a configured file does not exist."""
    if path is not None and not Path(path).is_file():
        raise UserError(f"file not found: {path}", where=where, fix="check the path (relative paths are resolved "
                        "from the directory you run the command in)")
    return path
