"""The training loop, under Hugging Face Accelerate, shared by the teacher and distill stages.

:func:`train` resumes from ``checkpoints/last`` when its key matches (:mod:`.checkpoint`), runs
epochs of :class:`~.step.TrainStep` over the seeded, sharded batches of :mod:`.loaders`, and ends
every epoch with a reduced metrics row, a test evaluation and a checkpoint; with
``checkpoint_every_steps`` it also checkpoints between accumulation groups. Only the main process
writes files other than its own RNG state. A killed run resumes to bitwise the weights an
uninterrupted one ends with (on CPU; on GPUs as far as the kernels allow).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .. import _io
from ..config import DataConfig, DistillConfig, ScheduleConfig
from ..data import DataSource
from ..methods import DistillMethod
from .checkpoint import STATE_VERSION, resume_state, save_checkpoint
from .guards import FiniteLoss, average_bn_stats, check_replicas_in_sync
from .loaders import BatchPipe, ShardedBatchSampler, make_test_loader, make_train_loader, seed_for
from .step import TrainStep, evaluate


@dataclass
class TrainResult:
    epochs: int
    last_top1: float
    best_top1: float
    best_epoch: int
    extra_top1: dict[str, float]
    seconds: float
    #: epochs completed when this call resumed (fractional for a mid-epoch checkpoint); None: fresh start
    resumed_from_epoch: float | None


@dataclass
class TrainOptions:
    """Loop switches: ``distill.*`` for the distill stage, the defaults for the teacher stage's schedule."""

    gradient_accumulation_steps: int = 1
    checkpoint_every_steps: int = 0
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False
    log_every_steps: int = 20

    @classmethod
    def from_config(cls, cfg: DistillConfig) -> TrainOptions:
        return cls(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                   checkpoint_every_steps=cfg.checkpoint_every_steps, channels_last=cfg.channels_last,
                   compile=cfg.compile, deterministic=cfg.deterministic)


def train(accelerator: Accelerator, method: DistillMethod, source: DataSource, *, data_cfg: DataConfig,
          schedule: ScheduleConfig, seed: int, out_dir: Path, key: str, desc: str = "train",
          options: TrainOptions | None = None, section: str = "distill") -> TrainResult:
    """Train ``method`` for ``schedule.epochs`` epochs, resuming from ``out_dir`` when ``key`` matches.

    Tracks the test accuracy of ``method.student`` (and of :meth:`DistillMethod.extra_eval_models`).
    Writes ``metrics.jsonl`` (one row per epoch), ``checkpoints/last`` (Accelerate state plus the
    data position) and ``best.pt`` (the best epoch's weights) under ``out_dir``. ``options``
    default to :class:`TrainOptions`' defaults. ``section`` is the config section of ``schedule``,
    named when training diverges (a non-finite loss stops the run with a :class:`UserError`).
    """
    opts = options or TrainOptions()
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError("make the Accelerator with make_accelerator(): the trainer does the accumulation")
    previous = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if opts.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    # Fixed CIFAR-sized inputs: let cuDNN pick the fastest convolutions, unless runs must repeat exactly.
    torch.backends.cudnn.benchmark = not opts.deterministic
    try:
        return _Run(accelerator, method, source, data_cfg, schedule, seed, out_dir, key, desc, opts, section).run()
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]


class _Run:
    """One call of :func:`train`: set up, then resume, and per epoch :meth:`run_epoch` + :meth:`end_epoch`."""

    def __init__(self, accelerator: Accelerator, method: DistillMethod, source: DataSource, data_cfg: DataConfig,
                 schedule: ScheduleConfig, seed: int, out_dir: Path, key: str, desc: str, opts: TrainOptions,
                 section: str) -> None:
        self.acc, self.method, self.schedule, self.key, self.desc, self.opts = \
            accelerator, method, schedule, key, desc, opts
        self.world, self.main = accelerator.num_processes, accelerator.is_main_process
        accelerator.free_memory()  # forget a previous stage's models: save/load_state index what is prepared
        # The step's RNG stream (dropout, random views inside methods): one per process.
        torch.manual_seed(seed_for(seed, accelerator.process_index, 0x7EA1))
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.train_loader = make_train_loader(source, data_cfg, global_batch=schedule.batch_size, seed=seed,
                                              num_replicas=self.world, rank=accelerator.process_index,
                                              pin_memory=accelerator.device.type == "cuda")
        self.sampler: ShardedBatchSampler = self.train_loader.batch_sampler
        self.stepper, (self.test_loader,) = TrainStep.prepare(
            accelerator, method, schedule, channels_last=opts.channels_last, compile=opts.compile,
            extra=[make_test_loader(source, data_cfg, schedule.batch_size)])
        self.pipe = BatchPipe(data_cfg, self.sampler, accelerator.device, self.stepper.memory_format, seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.accum = max(1, opts.gradient_accumulation_steps)
        self.ckpt_dir = out_dir / "checkpoints" / "last"
        self.metrics_path = out_dir / "metrics.jsonl"
        self.best, self.best_epoch, self.seen_here = -1.0, -1, 0
        self.finite = FiniteLoss(accelerator, section, self.steps_per_epoch, None)

    # --- the three parts of a run ----------------------------------------------------------------------
    def resume(self) -> tuple[int, int, dict[str, float], float | None]:
        """(epoch, step) to continue from, the resumed epoch's partial sums, and the epochs done (or None)."""
        state = resume_state(self.acc, self.ckpt_dir, self.metrics_path, self.key, self.desc)
        if state is None:
            return 0, 0, {}, None
        epoch, step = state["next_epoch"], state["next_step"]
        self.best, self.best_epoch = state["best_top1"], state["best_epoch"]
        self.finite.saved = self.ckpt_dir
        where = (f"after epoch {epoch}/{self.schedule.epochs}" if step == 0 else
                 f"in epoch {epoch + 1}/{self.schedule.epochs} at step {step}/{self.steps_per_epoch}")
        self.acc.print(f"[{self.desc}] resuming {where} from {self.ckpt_dir}")
        return epoch, step, state.get("partial", {}), epoch + step / max(self.steps_per_epoch, 1)

    def run_epoch(self, epoch: int, start: int, partial: dict[str, float], bar: tqdm) -> dict[str, torch.Tensor]:
        """Steps ``start..`` of ``epoch``; returns this process's running sums (``_seen``, ``_correct``, logs).

        The main process's sums start from a resumed epoch's ``partial`` (already reduced) sums.
        """
        stepper, device, opts, spe = self.stepper, self.acc.device, self.opts, self.steps_per_epoch
        self.finite.lr = stepper.optimizers[0].param_groups[0]["lr"]
        self.sampler.set_epoch(epoch, start)
        stepper.model.train()
        self.seen_here = 0  # images this process trained on in this call (for the throughput)
        sums = {k: torch.tensor(v if self.main else 0.0, device=device) for k, v in partial.items()}
        zero = functools.partial(torch.zeros, (), device=device)
        for step, batch in enumerate(self.train_loader, start=start):
            images, labels = self.pipe(batch, epoch, step)
            group_start = step - step % self.accum
            group_len = min(self.accum, spe - group_start)
            boundary = step + 1 == group_start + group_len
            out = stepper.forward_backward(images, labels, epoch + step / spe, sync=boundary,
                                           loss_scale=1.0 / group_len)
            self.finite.record(out.loss, epoch, step)
            if boundary:
                stepper.optimizer_step()
            n = labels.shape[0]
            for k, v in {"loss": out.loss.detach(), **out.logs}.items():
                sums[k] = sums.get(k, zero()) + v.float() * n
            sums["_correct"] = sums.get("_correct", zero()) + (out.logits.detach().argmax(1) == labels).sum()
            sums["_seen"] = sums.get("_seen", zero()) + n
            self.seen_here += n
            bar.update(1)
            # Log steps are the only ones that sync: the non-finite-loss check (one small gather across
            # processes, next to DDP's per-step all-reduce) and the progress bar's loss.
            if step % opts.log_every_steps == 0:
                self.finite.check()
                if not bar.disable:
                    bar.set_postfix(epoch=f"{epoch + 1}/{self.schedule.epochs}", loss=f"{out.loss.item():.3f}")
            opt_step = epoch * math.ceil(spe / self.accum) + step // self.accum + 1
            if (boundary and opts.checkpoint_every_steps and step + 1 < spe
                    and opt_step % opts.checkpoint_every_steps == 0):
                self.finite.check()
                self.checkpoint(epoch, step + 1, partial=self.reduce(sums))
        return sums

    def end_epoch(self, epoch: int, sums: dict[str, torch.Tensor], epoch_t0: float
                  ) -> tuple[dict[str, float], dict[str, float]]:
        """Schedulers, replicas in sync, the metrics row, the test accuracy, ``best.pt`` and a checkpoint."""
        train_seconds = time.perf_counter() - epoch_t0
        self.finite.check()
        stepper, acc = self.stepper, self.acc
        for s in stepper.schedulers:
            s.step()
        if self.world > 1:
            average_bn_stats(acc.unwrap_model(stepper.model), self.world)
            check_replicas_in_sync(acc, stepper.model)
        totals = self.reduce(sums)
        n_seen = max(totals.pop("_seen"), 1.0)
        train_top1 = totals.pop("_correct") / n_seen
        train_logs = {k: v / n_seen for k, v in totals.items()}
        last, extra = self.evaluate()
        row: dict[str, Any] = {
            "epoch": epoch + 1, "lr": stepper.optimizers[0].param_groups[0]["lr"], "train_top1": train_top1,
            **{f"train_{k}": v for k, v in train_logs.items()}, "test_top1": last["top1"], "test_top5": last["top5"],
            **{f"test_{k}": v for k, v in extra.items()}, "train_images": int(n_seen),
            "epoch_seconds": time.perf_counter() - epoch_t0,
            "images_per_second": self.seen_here * self.world / max(train_seconds, 1e-9), "processes": self.world,
        }
        if last["top1"] > self.best:
            self.best, self.best_epoch = last["top1"], epoch + 1
            if self.main:
                _io.save_torch(self.method.student.state_dict(), self.out_dir / "best.pt")
        if self.main:
            _io.append_jsonl(self.metrics_path, row)
            tqdm.write(f"[{self.desc}] epoch {epoch + 1}/{self.schedule.epochs}: loss "
                       f"{train_logs.get('loss', math.nan):.4f} test top-1 {100 * last['top1']:.2f}%"
                       + "".join(f", {k} {100 * v:.2f}%" for k, v in extra.items()))
        self.checkpoint(epoch + 1, 0)
        return last, extra

    def run(self) -> TrainResult:
        epochs, spe = self.schedule.epochs, self.steps_per_epoch
        pos_epoch, pos_step, partial, resumed = self.resume()
        t0 = time.perf_counter()
        bar = tqdm(total=epochs * spe, initial=pos_epoch * spe + pos_step, desc=self.desc, unit="step",
                   dynamic_ncols=True, disable=not self.acc.is_local_main_process)
        last: dict[str, float] = {"top1": float("nan")}
        extra: dict[str, float] = {}
        for epoch in range(pos_epoch, epochs):
            epoch_t0 = time.perf_counter()
            sums = self.run_epoch(epoch, pos_step if epoch == pos_epoch else 0, partial, bar)
            partial = {}
            last, extra = self.end_epoch(epoch, sums, epoch_t0)
        bar.close()
        if pos_epoch >= epochs and epochs > 0:  # finished before: report the stored numbers
            last, _ = self.evaluate(extra=False)
        self.acc.wait_for_everyone()
        return TrainResult(epochs=epochs, last_top1=last["top1"], best_top1=max(self.best, last["top1"]),
                           best_epoch=self.best_epoch, extra_top1=extra, seconds=time.perf_counter() - t0,
                           resumed_from_epoch=resumed)

    # --- helpers -----------------------------------------------------------------------------------------
    def reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """This epoch's sums added over the processes (one reduce)."""
        keys = sorted(sums)
        return dict(zip(keys, self.acc.reduce(torch.stack([sums[k] for k in keys]), reduction="sum").tolist()))

    def evaluate(self, extra: bool = True) -> tuple[dict[str, float], dict[str, float]]:
        """The student's test top-1/top-5 and, with ``extra``, the other trained networks' top-1."""
        cl = self.opts.channels_last
        last = evaluate(self.method.student, self.test_loader, self.acc, channels_last=cl)
        others = {f"{name}_top1": evaluate(m, self.test_loader, self.acc, channels_last=cl)["top1"]
                  for name, m in self.method.extra_eval_models().items()} if extra else {}
        return last, others

    def checkpoint(self, next_epoch: int, next_step: int, partial: dict[str, float] | None = None) -> None:
        state = {"key": self.key, "version": STATE_VERSION, "next_epoch": next_epoch, "next_step": next_step,
                 "best_top1": self.best, "best_epoch": self.best_epoch, "world_size": self.world}
        if partial is not None:
            state["partial"] = partial
        save_checkpoint(self.acc, self.ckpt_dir, self.metrics_path, state)
        self.finite.saved = self.ckpt_dir
