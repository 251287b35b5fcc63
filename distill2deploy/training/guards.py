"""What stops a run before it writes something wrong: a non-finite loss, replicas that drifted apart.

Also the once-an-epoch BatchNorm statistics average over processes that keeps the replicas the same.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from ..errors import UserError


def average_bn_stats(module: nn.Module, world: int) -> None:
    """Average BatchNorm running statistics over processes (timm's ``distribute_bn(reduce=True)``).

    DDP broadcasts the main process's buffers before every forward, but each process then updates
    them with its own shard's statistics; averaging once an epoch makes the evaluated and saved
    networks the same on every process and representative of all shards.
    """
    from timm.utils import distribute_bn

    distribute_bn(module, world, reduce=True)


def check_replicas_in_sync(accelerator: Accelerator, model: nn.Module) -> None:
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


class FiniteLoss:
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
