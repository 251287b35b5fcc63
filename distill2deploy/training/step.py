"""One training step of a method's networks under Accelerate, and the test-set evaluation.

Gradient accumulation is done here rather than by Accelerate: micro-batches run under ``no_sync``
and :meth:`TrainStep.optimizer_step` steps every optimizer of the group, so a checkpoint is only
taken between groups and the fp16 scaler steps every optimizer before one ``update()``
(Accelerate's optimizer wrapper would update it once per optimizer).

Frozen teachers run under ``torch.inference_mode`` outside DDP; their outputs are cloned into
normal tensors because methods use teacher features as MSE targets, whose backward saves them
(inference tensors cannot be saved for backward).
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from ..config import ScheduleConfig
from ..methods import DistillMethod, StepOutput, TeacherOutput


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


def _normal(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if t.is_inference() else t


class TrainStep:
    """A method's networks prepared for training, and one (micro-)step of it.

    Built by :meth:`prepare`: optimizers (one SGD per :meth:`DistillMethod.optimizers` entry) and
    MultiStepLR schedulers, ``channels_last``, DDP through ``accelerator.prepare`` (without an unused-parameter search:
    every method gives each trained parameter a gradient every step), frozen teachers on the device
    under inference mode, optional ``torch.compile``. Used by the training loop and by
    ``benchmarks/train_throughput.py``.
    """

    def __init__(self, accelerator: Accelerator, method: DistillMethod, model: nn.Module,
                 optimizers: list[Any], schedulers: list[Any], teachers: list[nn.Module],
                 memory_format: torch.memory_format, compile: bool) -> None:
        self.accelerator, self.method, self.model = accelerator, method, model
        self.optimizers, self.schedulers = optimizers, schedulers
        self.teachers = teachers
        self.memory_format = memory_format
        self._forward = torch.compile(model) if compile else model
        calls = [functools.partial(method.run_teacher, t) for t in teachers]
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
        prepared = accelerator.prepare(method, *optimizers, *schedulers, *extra)
        k = len(optimizers)
        model, opts, scheds, rest = prepared[0], list(prepared[1:1 + k]), list(prepared[1 + k:1 + 2 * k]), \
            list(prepared[1 + 2 * k:])
        teachers = [t.to(accelerator.device, memory_format=fmt).eval().requires_grad_(False)
                    for t in method.frozen_teachers()]
        step = cls(accelerator, method, model, opts, scheds, teachers, fmt, compile)
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
        """The method's views of the batch, frozen teachers on them, method forward and backward;
        gradients are all-reduced only when ``sync``. ``out.logits`` are the loaded images' logits."""
        images, labels = self.method.views(images, labels)
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
