"""Run the stages in order, skipping those whose cache key and outputs are unchanged."""
from __future__ import annotations

import time
from pathlib import Path

import yaml

from . import _io
from ._lock import locked
from ._threads import use_threads
from .config import PipelineConfig, config_dict, config_hash
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
    with locked(run_dir):
        return _run_stages(ctx, until, force)


def _run_stages(ctx: RunContext, until: str | None, force: list[str]) -> RunContext:
    cfg, run_dir = ctx.cfg, ctx.run_dir
    last = STAGE_NAMES.index(until) if until else len(STAGES) - 1
    if ctx.is_main:
        for stage in STAGES:  # a kill between the two renames of a publish
            _io.recover_dir(run_dir / stage.name)
    for stage in STAGES[: last + 1]:
        key = stage.cache_key(ctx)
        cached = None if stage.name in force else stage.cached_manifest(ctx, key)
        if cached is not None:
            ctx.manifests[stage.name] = cached
            if ctx.is_main:
                print(f"✓ {stage.name}: cached ({run_dir / stage.name})")
            continue
        t0 = time.perf_counter()
        if ctx.is_main:
            print(f"▶ {stage.name}")
        work = stage.prepare_work(ctx, key, fresh=stage.name in force)
        try:
            if ctx.is_main or stage.all_processes:
                result = stage.run(ctx, work)
            if ctx.is_main:
                ctx.manifests[stage.name] = stage.write_manifest(ctx, key, result, time.perf_counter() - t0, work)
        except BaseException:
            if ctx.is_main:
                stage.abandon(ctx, work)
            raise
        if ctx.is_main:
            stage.publish(ctx, work)
            print(f"✓ {stage.name}: done in {time.perf_counter() - t0:.1f}s")
        _sync_manifest(ctx, stage.name)
    if ctx.is_main:  # the config that produced what the run directory now holds
        _io.write_text(run_dir / "config.yaml", yaml.safe_dump(config_dict(cfg), sort_keys=False))
        _io.write_text(run_dir / "config.sha256", config_hash(cfg) + "\n")
    return ctx


def _sync_manifest(ctx: RunContext, name: str) -> None:
    """Under several processes only the main one writes; the others read what it wrote."""
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:
        state.wait_for_everyone()
        if not state.is_main_process:
            import json

            ctx.manifests[name] = json.loads((ctx.run_dir / name / "stage.json").read_text())
