"""This process's place in a run, and its Accelerator (DDP, mixed precision, state saving).

One process or many (``accelerate launch`` / ``torchrun``): everything that asks Accelerate about
the processes goes through :func:`process_state`, which joins a multi-process CPU launch with gloo.
What a user can get wrong in these settings (accumulation steps, checkpoint interval) is refused when
the config loads (:mod:`distill2deploy.config`). fp16 on a machine without an accelerator is refused
here, when training starts: it depends on the machine, and a GPU-trained fp16 run must still validate,
export and report on a CPU-only one.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # accelerate is slow to import; the config check only needs runs_on_cpu()
    from accelerate import Accelerator, PartialState

    from ..config import DistillConfig


def runs_on_cpu() -> bool:
    """Whether this process trains on the CPU: no accelerator, or CPU forced (``ACCELERATE_USE_CPU``)."""
    return _force_cpu() or not torch.accelerator.is_available()


def _force_cpu() -> bool:
    """Several processes on a machine without an accelerator: Accelerate needs ``cpu=True`` to join them
    with gloo; without it every process silently trains alone on the whole data set."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) != -1
    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return forced or (launched and not torch.accelerator.is_available())


def process_state() -> PartialState:
    """This process's place in the run (initialised once, before anything else asks Accelerate)."""
    from accelerate import PartialState

    return PartialState(cpu=_force_cpu())


def make_accelerator(cfg: DistillConfig, *, save_on_each_node: bool = False) -> Accelerator:
    """One Accelerator per process and run: DDP and mixed precision come from here.

    Gradient accumulation is done by the training loop (see :mod:`distill2deploy.training.loop`), so
    the Accelerator itself accumulates nothing. ``save_on_each_node``: machines without a shared run
    directory each keep a full checkpoint (see :mod:`distill2deploy.distributed`).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, is_initialized
    from accelerate.utils import ProjectConfiguration

    state = process_state()
    if cfg.mixed_precision == "fp16" and runs_on_cpu():
        # Accelerate would silently train in fp32: there is no fp16 autocast/GradScaler on CPU.
        from ..errors import UserError

        raise UserError("fp16 mixed precision needs a GPU; this process runs on CPU",
                        where="distill.mixed_precision", fix="use bf16 on CPU, or 'no'")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    if is_initialized() and AcceleratorState().mixed_precision != cfg.mixed_precision and state.num_processes == 1:
        # Another run in this (single) process used another precision, e.g. two CLI calls in one test
        # session; Accelerate keeps one precision per process and would refuse the new one. Accelerate
        # 1.15 has no public way to change it: its own tests reset the state the same way.
        AcceleratorState._reset_state()
    return Accelerator(cpu=_force_cpu(), mixed_precision=cfg.mixed_precision, step_scheduler_with_optimizer=False,
                       project_config=ProjectConfiguration(save_on_each_node=save_on_each_node))
