"""The training loop, under Hugging Face Accelerate, shared by the teacher and distill stages.

One process or many (``accelerate launch`` / ``torchrun``): the loop talks to ``Accelerator`` for
DDP, mixed precision and state saving, and owns three things itself because they decide whether a
run is *exactly* reproducible:

* **Data order and sharding** (:class:`ShardedBatchSampler`): epoch ``e`` is a permutation drawn
  from ``(seed, e)``, cut into global batches of ``batch_size``; process ``r`` of ``N`` takes its
  contiguous slice of every global batch. Each epoch sees every sample exactly once, and the
  global batches (and their augmentation) do not depend on ``N``; a resumed run restarts at any
  step without replaying the ones before.
* **Augmentation randomness**: seeded per batch from ``(seed, epoch, step)`` (on-device,
  :mod:`distill2deploy.augment`) or per sample from ``(seed, epoch, position)`` (torchvision
  per-sample transforms), never from worker processes or from how far a run got before a kill.
* **Gradient accumulation**: micro-batches under ``no_sync``, one optimizer step per group, so a
  checkpoint is only taken between groups and the fp16 scaler steps every optimizer before one
  ``update()`` (Accelerate's optimizer wrapper would update it once per optimizer).

Checkpoints (``checkpoints/last``) are Accelerate ``save_state`` directories -- models,
optimizers, schedulers, scaler, per-process RNG states -- plus the data position, written to a
temp dir and renamed, so a killed run resumes from the last complete one, at an epoch end or
every ``distill.checkpoint_every_steps`` optimizer steps.

Frozen teachers run under ``torch.inference_mode`` outside DDP; their outputs are cloned into
normal tensors because methods use teacher features as MSE targets, whose backward saves them
(inference tensors cannot be saved for backward).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, gather_object
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from . import _io, distributed
from .augment import BatchAugment
from .config import DataConfig, DistillConfig, ScheduleConfig
from .data import DataSource, ImageDataset, Split, eval_transform, train_transform
from .errors import UserError
from .methods import DistillMethod, StepOutput, TeacherOutput
from .models.features import extract

STATE_FILE = "trainer_state.json"
STATE_VERSION = 3  # 3: the state records the hashes of the checkpoint's files and of metrics.jsonl
_MASK64 = (1 << 64) - 1


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
    """Trainer switches read from ``distill.*`` (defaults for the teacher stage's schedule)."""

    gradient_accumulation_steps: int = 1
    checkpoint_every_steps: int = 0
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False
    log_every_steps: int = 20

    @classmethod
    def from_config(cls, cfg: ScheduleConfig | DistillConfig) -> TrainOptions:
        return cls(**{k: getattr(cfg, k) for k in ("gradient_accumulation_steps", "checkpoint_every_steps",
                                                    "channels_last", "compile", "deterministic") if hasattr(cfg, k)})


# ------------------------------------------------------------------------------------------ processes
def _force_cpu() -> bool:
    """Several processes on a machine without an accelerator: Accelerate needs ``cpu=True`` to join them
    with gloo; without it every process silently trains alone on the whole data set."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) != -1
    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return forced or (launched and not torch.accelerator.is_available())


def process_state() -> PartialState:
    """This process's place in the run (initialised once, before anything else asks Accelerate)."""
    return PartialState(cpu=_force_cpu())


def make_accelerator(cfg: DistillConfig, *, save_on_each_node: bool = False) -> Accelerator:
    """One Accelerator per process and run: DDP and mixed precision come from here.

    Gradient accumulation is done by the trainer (see the module docstring), so the Accelerator
    itself accumulates nothing. ``save_on_each_node``: machines without a shared run directory
    each keep a full checkpoint (see :mod:`distill2deploy.distributed`).
    """
    cpu = _force_cpu()
    state = PartialState(cpu=cpu)
    if cfg.gradient_accumulation_steps < 1:
        raise UserError(f"gradient_accumulation_steps must be >= 1, got {cfg.gradient_accumulation_steps}",
                        where="distill.gradient_accumulation_steps", fix="use 1 to step after every batch")
    if cfg.checkpoint_every_steps < 0:
        raise UserError(f"checkpoint_every_steps must be >= 0, got {cfg.checkpoint_every_steps}",
                        where="distill.checkpoint_every_steps", fix="use 0 to checkpoint at epoch ends only")
    if cfg.mixed_precision == "fp16" and state.device.type == "cpu":
        # Accelerate would silently train in fp32: there is no fp16 autocast/GradScaler on CPU.
        raise UserError("fp16 mixed precision needs a GPU; this process runs on CPU",
                        where="distill.mixed_precision", fix="use bf16 on CPU, or 'no'")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    acc_state = AcceleratorState._shared_state
    if acc_state and acc_state.get("_mixed_precision") != cfg.mixed_precision and state.num_processes == 1:
        # Another run in this (single) process used another precision, e.g. two CLI calls in one test
        # session; the Accelerate singleton would refuse the new one.
        AcceleratorState._reset_state()
    return Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision, step_scheduler_with_optimizer=False,
                       project_config=ProjectConfiguration(save_on_each_node=save_on_each_node))


# ------------------------------------------------------------------------------------------ data
def seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 rounds): (seed, epoch, step) streams never collide
    the way ``seed + epoch + step`` would."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & _MASK64)) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


class ShardedBatchSampler(Sampler[list[Any]]):
    """Seeded global batches, sharded over processes, restartable at any step.

    Epoch ``e``'s order is ``randperm(n)`` from a generator seeded with ``(seed, e)``; step ``k``'s
    global batch is ``order[k*B:(k+1)*B]`` and this process takes slice ``rank`` of it
    (``tensor_split``: sizes differ by at most one). A last global batch smaller than the number of
    processes is dropped (at most ``N - 1`` samples an epoch), so every process runs the same number
    of steps, as DDP requires. With ``sample_seeds`` each index comes with a seed for its
    augmentation, mixed from ``(seed, e, position in the epoch)``.
    """

    def __init__(self, num_samples: int, global_batch: int, *, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, sample_seeds: bool = False) -> None:
        if global_batch < num_replicas:
            raise UserError(f"batch size {global_batch} is smaller than the {num_replicas} processes",
                            where="batch_size", fix=f"use a global batch size of at least {num_replicas}")
        if num_samples < num_replicas:
            raise UserError(f"{num_samples} training images cannot be shared by {num_replicas} processes",
                            where="data.subset.train", fix="use more training images or fewer processes")
        self.num_samples, self.global_batch = int(num_samples), int(global_batch)
        self.num_replicas, self.rank, self.seed = int(num_replicas), int(rank), int(seed)
        self.shuffle, self.sample_seeds = shuffle, sample_seeds
        self.epoch, self.start = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch)
        return full + (1 if rest >= self.num_replicas else 0)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch ``epoch`` from step ``start_step`` (the steps before it are not loaded)."""
        self.epoch, self.start = int(epoch), int(start_step)

    def shard(self, step: int) -> tuple[int, int, int]:
        """(global batch size, this process's offset in it, its size) at ``step``."""
        size = min(self.global_batch, self.num_samples - step * self.global_batch)
        base, extra = divmod(size, self.num_replicas)
        lo = self.rank * base + min(self.rank, extra)
        return size, lo, base + (1 if self.rank < extra else 0)

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(seed_for(self.seed, self.epoch)))

    def __len__(self) -> int:
        return max(self.steps_per_epoch - self.start, 0)

    def __iter__(self) -> Iterator[list[Any]]:
        order = self.order()
        for step in range(self.start, self.steps_per_epoch):
            _, lo, count = self.shard(step)
            first = step * self.global_batch + lo
            idx = order[first:first + count].tolist()
            if self.sample_seeds:
                yield [(i, seed_for(self.seed, self.epoch, first + k)) for k, i in enumerate(idx)]
            else:
                yield idx


class UInt8Batches(Dataset):
    """Raw uint8 NHWC batches: one numpy gather per batch (``__getitems__``), no per-sample Python."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([i])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(np.ascontiguousarray(self.split.images[idx]))
        return images, torch.from_numpy(np.asarray(self.split.labels[idx], dtype=np.int64))


def _as_batch(batch: Any) -> Any:
    """collate_fn of :class:`UInt8Batches`: the dataset already returns the batch."""
    return batch


class SeededSamples(Dataset):
    """Per-sample torchvision transforms with their RNG seeded per sample (``(index, seed)`` items).

    torchvision's random transforms draw from the global torch RNG; seeding it per sample inside
    ``fork_rng`` makes an image's augmentation a function of (seed, epoch, position) only -- the
    same with or without worker processes, in one process or many, and after a resume -- and leaves
    the training step's own RNG stream (dropout, ...) untouched.
    """

    def __init__(self, base: ImageDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Any, int]:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.base[index]


def make_train_loader(source: DataSource, data_cfg: DataConfig, *, global_batch: int, seed: int,
                      num_replicas: int = 1, rank: int = 0, pin_memory: bool = False) -> DataLoader:
    """This process's training loader; its ``batch_sampler`` is a :class:`ShardedBatchSampler`.

    Yields ``(uint8 [b, H, W, 3], labels)`` with ``data.augment.on_device`` (augment with
    :class:`~distill2deploy.augment.BatchAugment`), else normalised float ``[b, 3, H, W]`` batches.
    """
    if source.train is None:
        raise ValueError("training needs a train split")  # load_source(need_train=True) guarantees it
    aug = data_cfg.augment
    on_device = getattr(aug, "on_device", False)
    sampler = ShardedBatchSampler(len(source.train), global_batch, num_replicas=num_replicas, rank=rank, seed=seed,
                                  sample_seeds=not on_device)
    if on_device:
        dataset, collate = UInt8Batches(source.train), _as_batch
    else:
        tf = train_transform(input_size=data_cfg.input_size, mean=data_cfg.mean, std=data_cfg.std,
                             crop_padding=aug.crop_padding, hflip=aug.hflip)
        dataset, collate = SeededSamples(ImageDataset(source.train, tf)), None
    workers = data_cfg.num_workers
    # Own generator: creating an iterator must not draw from the global RNG (it would shift the
    # training step's random stream by where the run was resumed).
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed))


def make_test_loader(source: DataSource, data_cfg: DataConfig, batch_size: int) -> DataLoader:
    tf_eval = eval_transform(input_size=data_cfg.input_size, mean=data_cfg.mean, std=data_cfg.std)
    workers = data_cfg.num_workers
    return DataLoader(ImageDataset(source.test, tf_eval), batch_size=max(batch_size, 128), shuffle=False,
                      num_workers=workers, persistent_workers=workers > 0)


def make_loaders(source: DataSource, data_cfg: DataConfig, batch_size: int, seed: int
                 ) -> tuple[DataLoader, DataLoader]:
    """Single-process training loader (see :func:`make_train_loader`) and the test loader."""
    return (make_train_loader(source, data_cfg, global_batch=batch_size, seed=seed),
            make_test_loader(source, data_cfg, batch_size))


# ------------------------------------------------------------------------------------------ evaluation
@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator, *,
             channels_last: bool = False) -> dict[str, float]:
    """Top-1/top-5 over the whole (possibly sharded) test set, gathered across processes."""
    was_training = model.training
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    correct1 = torch.zeros((), device=accelerator.device)
    correct5 = torch.zeros((), device=accelerator.device)
    total = torch.zeros((), device=accelerator.device)
    for images, labels in loader:
        images = images.to(accelerator.device, non_blocking=True).contiguous(memory_format=fmt)
        labels = labels.to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            logits = model(images)
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top5[:, 0] == labels).sum()
        correct5 += (top5 == labels[:, None]).any(dim=1).sum()
        total += labels.numel()
    model.train(was_training)
    n = max(total.item(), 1.0)
    return {"top1": correct1.item() / n, "top5": correct5.item() / n}


# ------------------------------------------------------------------------------------------ one step
def _normal(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if t.is_inference() else t


class TrainStep:
    """A method's networks prepared for training, and one (micro-)step of it.

    Built by :meth:`prepare`: optimizers (one SGD per :meth:`DistillMethod.optimizers` entry) and
    MultiStepLR schedulers, ``channels_last``, DDP through ``accelerator.prepare`` (with
    ``find_unused_parameters`` only for methods that declare it), frozen teachers on the device
    under inference mode, optional ``torch.compile``. Used by :func:`train` and by
    ``benchmarks/train_throughput.py``.
    """

    def __init__(self, accelerator: Accelerator, method: DistillMethod, model: nn.Module,
                 optimizers: list[Any], schedulers: list[Any], teachers: list[nn.Module],
                 teacher_indices: list[int] | None, memory_format: torch.memory_format, compile: bool) -> None:
        self.accelerator, self.method, self.model = accelerator, method, model
        self.optimizers, self.schedulers = optimizers, schedulers
        self.teachers, self.teacher_indices = teachers, teacher_indices
        self.memory_format = memory_format
        self._forward = torch.compile(model) if compile else model
        calls = [functools.partial(extract, t, indices=teacher_indices) for t in teachers]
        self._teacher_calls = [torch.compile(c) if compile else c for c in calls]

    @classmethod
    def prepare(cls, accelerator: Accelerator, method: DistillMethod, schedule: ScheduleConfig, *,
                channels_last: bool = False, compile: bool = False, extra: Sequence[Any] = ()
                ) -> tuple[TrainStep, list[Any]]:
        """Returns the step and ``extra`` (e.g. the test loader) as prepared by the accelerator."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        method.to(accelerator.device, memory_format=fmt)
        specs = method.optimizers(schedule.lr)
        # Fused SGD on CUDA: one kernel for all parameters, and the fp16 scaler needs no host sync.
        fused = True if accelerator.device.type == "cuda" else None
        optimizers = [torch.optim.SGD(spec.params, lr=spec.lr, momentum=schedule.momentum,
                                      weight_decay=schedule.weight_decay, nesterov=schedule.nesterov, fused=fused)
                      for spec in specs.values()]
        schedulers = [torch.optim.lr_scheduler.MultiStepLR(opt, milestones=schedule.milestones, gamma=schedule.gamma)
                      for opt in optimizers]
        accelerator.ddp_handler = DistributedDataParallelKwargs(
            find_unused_parameters=bool(getattr(method, "find_unused_parameters", False)))
        prepared = accelerator.prepare(method, *optimizers, *schedulers, *extra)
        k = len(optimizers)
        model, opts, scheds, rest = prepared[0], list(prepared[1:1 + k]), list(prepared[1 + k:1 + 2 * k]), \
            list(prepared[1 + 2 * k:])
        teachers = [t.to(accelerator.device, memory_format=fmt).eval().requires_grad_(False)
                    for t in method.frozen_teachers()]
        step = cls(accelerator, method, model, opts, scheds, teachers, method.teacher_feature_indices(), fmt, compile)
        return step, rest

    def teacher_outputs(self, images: torch.Tensor) -> list[TeacherOutput]:
        if not self.teachers:
            return []
        with torch.inference_mode(), self.accelerator.autocast():
            raw = [call(images) for call in self._teacher_calls]
        return [TeacherOutput(logits=_normal(logits.float()), features=[_normal(f) for f in feats])
                for logits, feats in raw]

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, progress: float, *,
                         sync: bool = True, loss_scale: float = 1.0) -> StepOutput:
        """Teachers, method forward and backward; gradients are all-reduced only when ``sync``."""
        t_out = self.teacher_outputs(images)
        ctx = contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model)
        with ctx:
            out = self._forward(images, labels, t_out, progress)
            self.accelerator.backward(out.loss * loss_scale if loss_scale != 1.0 else out.loss)
        return out

    def optimizer_step(self) -> None:
        scaler = self.accelerator.scaler
        if scaler is None:
            for opt in self.optimizers:
                opt.step()
        else:  # fp16: every optimizer steps against the same scale, then one update
            for opt in self.optimizers:
                scaler.step(opt.optimizer)
            scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, progress: float = 0.0) -> StepOutput:
        """One full optimizer step on one batch (no accumulation)."""
        out = self.forward_backward(images, labels, progress)
        self.optimizer_step()
        return out


class BatchPipe:
    """Host batch -> device tensors ready for the model (on-device augmentation when configured)."""

    def __init__(self, data_cfg: DataConfig, sampler: ShardedBatchSampler, device: torch.device,
                 memory_format: torch.memory_format, seed: int) -> None:
        aug = data_cfg.augment
        self.on_device = bool(getattr(aug, "on_device", False))
        self.sampler, self.device, self.memory_format, self.seed = sampler, device, memory_format, seed
        self.augment = BatchAugment(input_size=data_cfg.input_size, mean=data_cfg.mean, std=data_cfg.std,
                                    crop_padding=aug.crop_padding, hflip=aug.hflip, device=device,
                                    memory_format=memory_format) if self.on_device else None
        self.generator = torch.Generator(device=device) if self.on_device else None

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor], epoch: int, step: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.augment is not None:
            # Parameters for the whole global batch, this process takes its slice: the same
            # augmentation in one process or many.
            size, lo, count = self.sampler.shard(step)
            self.generator.manual_seed(seed_for(self.seed, epoch, step))
            params = self.augment.params(size, self.generator)[lo:lo + count]
            return self.augment(images, params), labels
        return images.contiguous(memory_format=self.memory_format), labels


# ------------------------------------------------------------------------------------------ the loop
def train(accelerator: Accelerator, method: DistillMethod, source: DataSource, *, data_cfg: DataConfig,
          schedule: ScheduleConfig | DistillConfig, seed: int, out_dir: Path, key: str,
          eval_model: nn.Module | None = None, desc: str = "train", options: TrainOptions | None = None,
          section: str = "distill") -> TrainResult:
    """Train ``method`` for ``schedule.epochs`` epochs, resuming from ``out_dir`` when ``key`` matches.

    ``eval_model`` is the network whose test accuracy is tracked (default: ``method.student``).
    Writes ``metrics.jsonl`` (one row per epoch), ``checkpoints/last`` (Accelerate state plus the
    data position) and ``best.pt`` (the best epoch's weights) under ``out_dir``; only the main
    process writes files other than its own RNG state. ``options`` defaults to the ``distill.*``
    switches found on ``schedule``. ``section`` is the config section of ``schedule``, named when
    training diverges (a non-finite loss stops the run with a :class:`UserError`).
    """
    opts = options or TrainOptions.from_config(schedule)
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError("make the Accelerator with make_accelerator(): the trainer does the accumulation")
    previous = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if opts.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    # Fixed CIFAR-sized inputs: let cuDNN pick the fastest convolutions, unless runs must repeat exactly.
    torch.backends.cudnn.benchmark = not opts.deterministic
    try:
        return _train(accelerator, method, source, data_cfg=data_cfg, schedule=schedule, seed=seed,
                      out_dir=out_dir, key=key, eval_model=eval_model, desc=desc, opts=opts, section=section)
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]


def _train(accelerator: Accelerator, method: DistillMethod, source: DataSource, *, data_cfg: DataConfig,
           schedule: ScheduleConfig, seed: int, out_dir: Path, key: str, eval_model: nn.Module | None,
           desc: str, opts: TrainOptions, section: str) -> TrainResult:
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    accelerator.free_memory()  # forget a previous stage's models: save/load_state index what is prepared
    # The step's RNG stream (dropout, random views inside methods): one per process.
    torch.manual_seed(seed_for(seed, rank, 0x7EA1))
    out_dir.mkdir(parents=True, exist_ok=True)

    train_loader = make_train_loader(source, data_cfg, global_batch=schedule.batch_size, seed=seed,
                                     num_replicas=world, rank=rank, pin_memory=accelerator.device.type == "cuda")
    sampler: ShardedBatchSampler = train_loader.batch_sampler
    test_loader = make_test_loader(source, data_cfg, schedule.batch_size)
    stepper, (test_loader,) = TrainStep.prepare(accelerator, method, schedule, channels_last=opts.channels_last,
                                                compile=opts.compile, extra=[test_loader])
    pipe = BatchPipe(data_cfg, sampler, accelerator.device, stepper.memory_format, seed)
    model_to_eval = eval_model if eval_model is not None else method.student
    steps_per_epoch, accum = sampler.steps_per_epoch, max(1, opts.gradient_accumulation_steps)

    ckpt_dir = out_dir / "checkpoints" / "last"
    metrics_path = out_dir / "metrics.jsonl"
    pos_epoch, pos_step, best, best_epoch, resumed = 0, 0, -1.0, -1, None
    partial: dict[str, float] = {}
    if distributed.writes_checkpoint(accelerator):
        _recover_checkpoint(ckpt_dir)
    accelerator.wait_for_everyone()
    state = _read_state(ckpt_dir)
    resume = state is not None and state.get("key") == key and state.get("version") == STATE_VERSION
    # Every rank joins the gather (a machine may lack the checkpoint that rank 0 has); the main process
    # checks the hashes, which cover metrics.jsonl, only it writes.
    problem = _checkpoint_problem(ckpt_dir, metrics_path, state) if resume and main else None
    problems = [p for p in (gather_object([problem]) if world > 1 else [problem]) if p]
    if problems:
        accelerator.print(f"[{desc}] warning: not resuming from {ckpt_dir}: {problems[0]}; training from scratch",
                          file=sys.stderr)
    resume = distributed.check_resume(state if resume and not problems else None, key, STATE_VERSION, ckpt_dir)
    if resume:
        accelerator.load_state(str(ckpt_dir))
        pos_epoch, pos_step = state["next_epoch"], state["next_step"]
        best, best_epoch, partial = state["best_top1"], state["best_epoch"], state.get("partial", {})
        resumed = pos_epoch + pos_step / max(steps_per_epoch, 1)
        where = (f"after epoch {pos_epoch}/{schedule.epochs}" if pos_step == 0 else
                 f"in epoch {pos_epoch + 1}/{schedule.epochs} at step {pos_step}/{steps_per_epoch}")
        accelerator.print(f"[{desc}] resuming {where} from {ckpt_dir}")
        if main and metrics_path.exists():  # rows a killed run appended after its last checkpoint go
            os.truncate(metrics_path, state["metrics_bytes"])
    elif distributed.writes_checkpoint(accelerator):  # another config's, or damaged: not resumable
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        metrics_path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    ckpt = functools.partial(_save_checkpoint, accelerator, ckpt_dir, metrics_path)
    finite = _FiniteLoss(accelerator, section, steps_per_epoch, ckpt_dir if resume else None)

    t0 = time.perf_counter()
    bar = tqdm(total=schedule.epochs * steps_per_epoch, initial=pos_epoch * steps_per_epoch + pos_step, desc=desc,
               unit="step", dynamic_ncols=True, disable=not accelerator.is_local_main_process)
    last: dict[str, float] = {"top1": float("nan")}
    extra: dict[str, float] = {}
    device = accelerator.device
    for epoch in range(pos_epoch, schedule.epochs):
        start = pos_step if epoch == pos_epoch else 0
        finite.lr = stepper.optimizers[0].param_groups[0]["lr"]
        sampler.set_epoch(epoch, start)
        stepper.model.train()
        epoch_t0 = time.perf_counter()
        # Running sums of this process (the main one also carries a resumed epoch's earlier part).
        sums: dict[str, torch.Tensor] = {k: torch.tensor(v if main else 0.0, device=device) for k, v in partial.items()}
        partial = {}
        seen_here = 0
        for step, batch in enumerate(train_loader, start=start):
            images, labels = pipe(batch, epoch, step)
            group_start = step - step % accum
            group_len = min(accum, steps_per_epoch - group_start)
            boundary = step + 1 == group_start + group_len
            out = stepper.forward_backward(images, labels, epoch + step / steps_per_epoch, sync=boundary,
                                           loss_scale=1.0 / group_len)
            finite.record(out.loss, epoch, step)
            if boundary:
                stepper.optimizer_step()
            n = labels.shape[0]
            seen_here += n
            for k, v in {"loss": out.loss.detach(), **out.logs}.items():
                sums[k] = sums.get(k, torch.zeros((), device=device)) + v.float() * n
            sums["_correct"] = sums.get("_correct", torch.zeros((), device=device)) + \
                (out.logits.detach().argmax(1) == labels).sum()
            sums["_seen"] = sums.get("_seen", torch.zeros((), device=device)) + n
            bar.update(1)
            # Log steps are the only ones that sync: the non-finite-loss check (one small gather across
            # processes, next to DDP's per-step all-reduce) and the progress bar's loss.
            if step % opts.log_every_steps == 0:
                finite.check()
            if not bar.disable and step % opts.log_every_steps == 0:
                bar.set_postfix(epoch=f"{epoch + 1}/{schedule.epochs}", loss=f"{out.loss.item():.3f}")
            opt_step = epoch * math.ceil(steps_per_epoch / accum) + step // accum + 1
            if (boundary and opts.checkpoint_every_steps and step + 1 < steps_per_epoch
                    and opt_step % opts.checkpoint_every_steps == 0):
                finite.check()
                keys = sorted(sums)
                totals = accelerator.reduce(torch.stack([sums[k] for k in keys]), reduction="sum")
                ckpt({
                    "key": key, "version": STATE_VERSION, "next_epoch": epoch, "next_step": step + 1,
                    "best_top1": best, "best_epoch": best_epoch, "world_size": world,
                    "partial": {k: float(v) for k, v in zip(keys, totals.tolist())}})
                finite.saved = ckpt_dir
        train_seconds = time.perf_counter() - epoch_t0
        finite.check()
        for s in stepper.schedulers:
            s.step()
        if world > 1:
            _average_bn_stats(accelerator.unwrap_model(stepper.model), world)
            _check_replicas_in_sync(accelerator, stepper.model)
        # Reduce the epoch's sums across processes once, then evaluate.
        keys = sorted(sums)
        totals = dict(zip(keys, accelerator.reduce(torch.stack([sums[k] for k in keys]), reduction="sum").tolist()))
        n_seen = max(totals.pop("_seen"), 1.0)
        train_top1 = totals.pop("_correct") / n_seen
        train_logs = {k: v / n_seen for k, v in totals.items()}
        last = evaluate(model_to_eval, test_loader, accelerator, channels_last=opts.channels_last)
        extra = {f"{name}_top1": evaluate(m, test_loader, accelerator, channels_last=opts.channels_last)["top1"]
                 for name, m in method.extra_eval_models().items()}
        row: dict[str, Any] = {
            "epoch": epoch + 1, "lr": stepper.optimizers[0].param_groups[0]["lr"], "train_top1": train_top1,
            **{f"train_{k}": v for k, v in train_logs.items()}, "test_top1": last["top1"], "test_top5": last["top5"],
            **{f"test_{k}": v for k, v in extra.items()}, "train_images": int(n_seen),
            "epoch_seconds": time.perf_counter() - epoch_t0,
            "images_per_second": seen_here * world / max(train_seconds, 1e-9), "processes": world,
        }
        if last["top1"] > best:
            best, best_epoch = last["top1"], epoch + 1
            if main:
                _io.save_torch(method.student.state_dict(), out_dir / "best.pt")
        if main:
            _io.append_jsonl(metrics_path, row)
            bar.write(f"[{desc}] epoch {epoch + 1}/{schedule.epochs}: loss {train_logs.get('loss', math.nan):.4f} "
                      f"test top-1 {100 * last['top1']:.2f}%"
                      + "".join(f", {k} {100 * v:.2f}%" for k, v in extra.items()))
        ckpt({"key": key, "version": STATE_VERSION, "next_epoch": epoch + 1, "next_step": 0, "best_top1": best,
              "best_epoch": best_epoch, "world_size": world})
        finite.saved = ckpt_dir
    bar.close()
    if pos_epoch >= schedule.epochs and schedule.epochs > 0:  # finished before: report the stored numbers
        last = evaluate(model_to_eval, test_loader, accelerator, channels_last=opts.channels_last)
    accelerator.wait_for_everyone()
    return TrainResult(epochs=schedule.epochs, last_top1=last["top1"], best_top1=max(best, last["top1"]),
                       best_epoch=best_epoch, extra_top1=extra, seconds=time.perf_counter() - t0,
                       resumed_from_epoch=resumed)


def _average_bn_stats(module: nn.Module, world: int) -> None:
    """Average BatchNorm running statistics over processes (timm's ``distribute_bn(reduce=True)``).

    DDP broadcasts the main process's buffers before every forward, but each process then updates
    them with its own shard's statistics; averaging once an epoch makes the evaluated and saved
    networks the same on every process and representative of all shards.
    """
    from timm.utils import distribute_bn

    distribute_bn(module, world, reduce=True)


def _check_replicas_in_sync(accelerator: Accelerator, model: nn.Module) -> None:
    """Every process must hold bitwise the same trained parameters after DDP steps; a network trained
    outside the DDP module (a method bug) would drift silently otherwise."""
    with torch.no_grad():
        params = [p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad]
        if not params:
            return
        checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
        everyone = accelerator.gather(checksum)
    if not bool((everyone == everyone[0]).all()):
        raise RuntimeError(f"the trained parameters differ between processes ({everyone.tolist()}): some network is "
                           "trained outside the DistributedDataParallel module")


def _recover_checkpoint(ckpt_dir: Path) -> None:
    """A kill between the two renames of :func:`_save_checkpoint` leaves no ``last``: take the new
    checkpoint if its state file (written last, atomically) is there, else the previous one."""
    if ckpt_dir.exists():
        return
    partial, old = ckpt_dir.with_name(ckpt_dir.name + ".partial"), ckpt_dir.with_name(ckpt_dir.name + ".old")
    for candidate in (partial, old):
        if (candidate / STATE_FILE).is_file():
            candidate.rename(ckpt_dir)
            return


def _read_state(ckpt_dir: Path) -> dict[str, Any] | None:
    f = ckpt_dir / STATE_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError:
        return None


def _checkpoint_problem(ckpt_dir: Path, metrics_path: Path, state: dict[str, Any]) -> str | None:
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


class _FiniteLoss:
    """Stops training at the first non-finite loss, before a checkpoint or weights file holds it.

    The check costs one host sync, so each step only records (on the device) the first step whose
    loss was NaN/inf; :meth:`check` runs where the loop syncs anyway (log steps, checkpoints, epoch
    ends) and agrees across processes, so every process stops together.
    """

    def __init__(self, accelerator: Accelerator, section: str, steps_per_epoch: int, saved: Path | None) -> None:
        self.accelerator, self.section, self.steps_per_epoch, self.saved = accelerator, section, steps_per_epoch, saved
        self.first = torch.full((1,), -1, dtype=torch.long, device=accelerator.device)
        self.lr = math.nan

    def record(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        bad = ~torch.isfinite(loss.detach()).reshape(1) & (self.first < 0)
        self.first = torch.where(bad, epoch * self.steps_per_epoch + step, self.first)

    def check(self) -> None:
        firsts = self.accelerator.gather(self.first) if self.accelerator.num_processes > 1 else self.first
        firsts = [int(f) for f in firsts.tolist() if f >= 0]
        if not firsts:
            return
        epoch, step = divmod(min(firsts), self.steps_per_epoch)
        kept = (f"the last checkpoint before it is kept ({self.saved})" if self.saved is not None
                else "no checkpoint was written before it")
        raise UserError(
            f"training diverged: the loss became NaN or infinite in epoch {epoch + 1}, step {step + 1}/"
            f"{self.steps_per_epoch} (lr {self.lr:g}); stopped, {kept}",
            where=self.section,
            fix=f"lower {self.section}.lr (e.g. 10x), or the loss weights in distill.options; check the data "
                "(data.mean/data.std) and, with mixed precision, try mixed_precision: 'no'")


def _save_checkpoint(accelerator: Accelerator, ckpt_dir: Path, metrics_path: Path, state: dict[str, Any]) -> None:
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
