"""What a distillation method is: loss terms on tensors plus the modules they need.

A method is an ``nn.Module`` that owns everything it *trains* (the student, auxiliary heads,
adapters, and, in online/bidirectional modes, the teachers). Frozen teachers are handed to it but
deliberately not registered as submodules: the trainer runs them without autograd and keeps
them out of DDP and out of the training checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .. import _schema
from ..errors import UserError


@dataclass
class TeacherOutput:
    """One frozen teacher's view of a batch: logits and the stage features a method asked for."""

    logits: torch.Tensor
    features: list[torch.Tensor] = field(default_factory=list)


@dataclass
class StepOutput:
    """What one training step returns to the trainer.

    ``loss`` is the single tensor to back-propagate: in bidirectional methods it is the sum of the
    student's and the teacher's losses, whose cross terms are detached, so one backward gives each
    network exactly its own gradient. ``logs`` holds detached scalars averaged per batch.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class EmptyOptions:
    pass


@dataclass
class OptimizerSpec:
    """One optimizer: its parameters and learning rate (the schedule is shared)."""

    params: list[nn.Parameter]
    lr: float


class DistillMethod(nn.Module):
    """Base class of every method in the registry."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = EmptyOptions
    #: whether the method needs the (frozen or trainable) teacher of the teacher stage
    uses_teacher: ClassVar[bool] = True

    def __init__(self, student: nn.Module, teachers: list[nn.Module], options: Any, *, num_classes: int,
                 input_size: int) -> None:
        super().__init__()
        self.student = student
        self.options = options
        self.num_classes = num_classes
        self.input_size = input_size
        # Plain list: frozen teachers are not submodules (no DDP, no optimizer, not in state_dict).
        self._frozen_teachers: list[nn.Module] = list(teachers)

    # --- configuration -------------------------------------------------------------------
    #: option fields that must be > 0; every other number must be finite and >= 0 (0 switches a term off)
    positive_options: ClassVar[tuple[str, ...]] = ("temperature",)

    @classmethod
    def parse_options(cls, options: dict[str, Any]) -> Any:
        """Typed options from the config's mapping, range-checked when the config loads."""
        return cls.validate_options(_schema.parse(cls.Options, options, where="distill.options"))

    @classmethod
    def validate_options(cls, options: Any) -> Any:
        check_numbers(options, positive=cls.positive_options)
        return cls.check_options(options)

    @classmethod
    def check_options(cls, options: Any) -> Any:
        """Cross-field checks a method needs beyond the number ranges (override; return ``options``)."""
        return options

    @classmethod
    def options_dict(cls, options: Any) -> dict[str, Any]:
        return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options)

    @classmethod
    def needs_teacher(cls, options: Any) -> bool:
        """Whether the distill stage must hand over the teacher stage's network."""
        return cls.uses_teacher

    # --- what the trainer needs to know --------------------------------------------------------
    def frozen_teachers(self) -> list[nn.Module]:
        """Teachers the trainer runs under no-grad before each step (their outputs come in)."""
        return self._frozen_teachers

    def teacher_feature_indices(self) -> list[int] | None:
        """Stage indices (timm ``feature_info`` order) the frozen teachers must return."""
        return None

    def optimizers(self, lr: float) -> dict[str, OptimizerSpec]:
        """Named optimizers. Default: everything trainable in this module at the base lr."""
        return {"student": OptimizerSpec([p for p in self.parameters() if p.requires_grad], lr)}

    def extra_eval_models(self) -> dict[str, nn.Module]:
        """Other networks trained here (e.g. a bidirectional teacher, DML peers): their test accuracy is
        logged every epoch and their weights are saved next to the student's (never exported)."""
        return {}

    def forward(self, images: torch.Tensor, labels: torch.Tensor, teacher_outputs: list[TeacherOutput],
                progress: float) -> StepOutput:
        """One step's losses. ``progress`` is the fractional epoch (for warm-ups)."""
        raise NotImplementedError


def check_numbers(options: Any, where: str = "distill.options",
                  positive: Iterable[str] = ("temperature",)) -> Any:
    """Range checks the option types cannot express, run when the config is loaded.

    Every number (weights, warm-up epochs, ...) must be finite and ``>= 0``, where 0 switches a
    term off; the fields named in ``positive`` (a temperature, a learning rate) must be ``> 0``.
    ``None`` means "use the default" and is not checked. Returns ``options`` for chaining.
    """
    strict = set(positive)
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        is_positive = f.name in strict
        if not math.isfinite(value) or value < 0 or (is_positive and value == 0):
            if f.name == "temperature":
                fix = "use a positive temperature (4 is the usual CIFAR-100 choice)"
            elif is_positive:
                fix = "use a positive value"
            else:
                fix = "use 0 to disable the term, or a positive value"
            raise UserError(f"{f.name} must be a finite number {'> 0' if is_positive else '>= 0'}, got {value!r}",
                            where=f"{where}.{f.name}", fix=fix)
    return options
