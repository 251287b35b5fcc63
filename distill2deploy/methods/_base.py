"""What a distillation method is: loss terms on tensors plus the modules they need.

A method is an ``nn.Module`` that owns everything it *trains* (the student, auxiliary heads,
adapters, and, in online/bidirectional modes, the teachers). Frozen teachers are handed to it but
deliberately not registered as submodules: the trainer runs them without autograd and keeps
them out of DDP and out of the training checkpoint.

The contract, the same for every method:

* :meth:`DistillMethod.check_options` -- the one check of its options, run when the config loads
  (through :meth:`~DistillMethod.parse_options`); a subclass extends it and calls ``super()``;
* :meth:`DistillMethod.views` -- the batch the frozen teachers and the method see (the loaded images,
  or with extra augmented views appended);
* :meth:`DistillMethod.compute_terms` -- the step's unweighted loss terms and their weights
  (:class:`LossTerms`); the base :meth:`~DistillMethod.forward` sums and logs them.
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
from ..models.features import extract


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
class LossTerms:
    """One step's loss terms as a method computes them; the base class weights, sums and logs them.

    ``terms`` are unweighted and keep their graph (tests take gradients of single terms); every term
    needs an entry in ``weights`` (a weight of 0 keeps a term in the graph, so its parameters still get
    a gradient, as DDP needs). ``logits`` are the student's on the loaded images (not on extra views);
    ``diagnostics`` are detached scalars logged as they are (e.g. mask fractions).
    """

    logits: torch.Tensor
    terms: dict[str, torch.Tensor]
    weights: dict[str, float]
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


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
        """Typed options from the config's mapping, checked (:meth:`check_options`) when the config loads."""
        parsed = _schema.parse(cls.Options, options, where="distill.options")
        cls.check_options(parsed)
        return parsed

    @classmethod
    def check_options(cls, options: Any) -> None:
        """The method's options check: number ranges (:func:`check_numbers` with ``positive_options``);
        a method with cross-field rules extends it, calling ``super().check_options(options)`` first."""
        check_numbers(options, positive=cls.positive_options)

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

    def run_teacher(self, teacher: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """How the trainer runs a frozen teacher (under inference mode): its logits and the features at
        :meth:`teacher_feature_indices`. A method that needs other features (ReviewKD's pre-activation
        ones) overrides this, so they still come from the trainer's one teacher pass."""
        return extract(teacher, images, self.teacher_feature_indices())

    def optimizers(self, lr: float) -> dict[str, OptimizerSpec]:
        """Named optimizers. Default: everything trainable in this module at the base lr."""
        return {"student": OptimizerSpec([p for p in self.parameters() if p.requires_grad], lr)}

    def extra_eval_models(self) -> dict[str, nn.Module]:
        """Other networks trained here (e.g. a bidirectional teacher, DML peers): their test accuracy is
        logged every epoch and their weights are saved next to the student's (never exported)."""
        return {}

    def views(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch the frozen teachers and :meth:`compute_terms` see: the loaded images by default; a
        method that trains on extra augmented views appends them here (rows after the first ``B`` are
        views), so the trainer runs the frozen teachers on them in the same pass."""
        return images, labels

    def compute_terms(self, images: torch.Tensor, labels: torch.Tensor, teacher_outputs: list[TeacherOutput],
                      progress: float) -> LossTerms:
        """One step's loss terms and weights on :meth:`views`' batch. ``progress`` is the fractional
        epoch (for warm-ups)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, labels: torch.Tensor, teacher_outputs: list[TeacherOutput],
                progress: float) -> StepOutput:
        """The weighted sum of :meth:`compute_terms`; every term and diagnostic is logged.

        In bidirectional methods the student's and the teacher's terms are summed: their cross terms
        are detached, so one backward gives each network its own gradient.
        """
        out = self.compute_terms(images, labels, teacher_outputs, progress)
        loss = sum(out.weights[k] * v for k, v in out.terms.items())
        logs = {k: v.detach() for k, v in out.terms.items()}
        logs.update(out.diagnostics)
        return StepOutput(loss=loss, logits=out.logits, logs=logs)


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
