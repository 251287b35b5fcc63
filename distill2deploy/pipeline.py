"""Run the stages in order, skipping those whose cache key and outputs are unchanged."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import yaml

from . import _io, distributed
from ._lock import locked
from ._threads import use_threads
from .config import PipelineConfig, config_dict
from .config_keys import config_hash
from .errors import UserError, suggest
from .stages import STAGE_NAMES, STAGES, RunContext


def default_run_dir(cfg: PipelineConfig) -> Path:
    return Path("exports") / (cfg.name or "run")


def run_pipeline(cfg: PipelineConfig, run_dir: Path | None = None, *, until: str | None = None,
                 force: list[str] | None = None) -> RunContext:
    """Run every stage up to ``until`` (default: all). ``force`` names stages to rerun regardless of cache."""
    force = list(force or [])
    for name in [*force, *([until] if until else [])]:
        if name not in STAGE_NAMES:
            hint = suggest(name, STAGE_NAMES)
            raise UserError(f"unknown stage '{name}'" + (f" ({hint})" if hint else ""),
                            fix=f"stages are: {', '.join(STAGE_NAMES)}")
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    use_threads(cfg.threads)
    ctx = RunContext(cfg, run_dir)
    ctx.run_dir_shared = distributed.check_start(config_hash(cfg), run_dir, command=[until, sorted(force)])
    # one lock per run directory: per machine when each has its own, else the global main's only
    with locked(run_dir, per_machine=not ctx.run_dir_shared):
        return _run_stages(ctx, until, force)


def _run_stages(ctx: RunContext, until: str | None, force: list[str]) -> RunContext:
    cfg, run_dir = ctx.cfg, ctx.run_dir
    last = STAGE_NAMES.index(until) if until else len(STAGES) - 1
    for stage in STAGES:  # a kill between the two renames of a publish
        if ctx.keeps_work(stage):
            _io.recover_dir(run_dir / stage.name)
    for stage in STAGES[: last + 1]:
        key = distributed.agreed(f"the {stage.name} stage's inputs", lambda: stage.cache_key(ctx),
                                 fix="every machine needs the same input files (same path, same content)")
        cached = distributed.on_main(f"checking the {stage.name} stage's cache",
                                     lambda: None if stage.name in force else stage.cached_manifest(ctx, key))
        if cached is not None:
            ctx.manifests[stage.name] = cached
            if _read_by_every_process(stage.name):
                distributed.mirror_outputs(ctx, stage.name)
            if ctx.is_main:
                print(f"✓ {stage.name}: cached ({run_dir / stage.name})")
            continue
        t0 = time.perf_counter()
        if ctx.is_main:
            print(f"▶ {stage.name}")
        if stage.all_processes:  # checked before training: a rank failing inside it would leave the others waiting
            distributed.load_training_data(ctx)
        work = stage.prepare_work(ctx, key, fresh=stage.name in force)
        # (training's collectives tie the ranks together; a main-only stage's failure stops them all here)
        with contextlib.nullcontext() if stage.all_processes else distributed.agree(f"the {stage.name} stage"):
            try:
                if ctx.is_main or stage.all_processes:
                    result = stage.run(ctx, work)
                if ctx.is_main:
                    ctx.manifests[stage.name] = stage.write_manifest(ctx, key, result, time.perf_counter() - t0,
                                                                     work)
            except BaseException:
                if ctx.keeps_work(stage):
                    stage.abandon(ctx, work)
                raise
            if ctx.keeps_work(stage):
                stage.publish(ctx, work)
            if ctx.is_main:
                print(f"✓ {stage.name}: done in {time.perf_counter() - t0:.1f}s")
        _sync_manifest(ctx, stage.name)
    if ctx.is_main:  # the config that produced what the run directory now holds
        _io.write_text(run_dir / "config.yaml", yaml.safe_dump(config_dict(cfg), sort_keys=False))
        _io.write_text(run_dir / "config.sha256", config_hash(cfg) + "\n")
    return ctx


def _sync_manifest(ctx: RunContext, name: str) -> None:
    """Under several processes only the main one writes; the others get its manifest over the process
    group (their machine may not see its run directory) and, when they read them, the stage's outputs."""
    ctx.manifests[name] = distributed.on_main(f"the {name} stage's manifest", lambda: ctx.manifests[name])
    if _read_by_every_process(name):
        distributed.mirror_outputs(ctx, name)


def _read_by_every_process(name: str) -> bool:
    """Whether a later stage that runs in every process reads this stage's outputs (the teacher's weights)."""
    return any(s.all_processes and name in s.needs for s in STAGES)
