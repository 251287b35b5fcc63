"""Multi-teacher KD (docs/methods.md §5): the student matches a weighted average of several teachers.

The teachers are the teacher stage's network plus ``extra_teachers``, each built here through
:func:`~distill2deploy.models.factory.create_model`, frozen and appended to the frozen-teacher list,
so the trainer runs all of them without autograd (outside DDP, outside the checkpoint) and hands
their logits in, in that order. Targets are :func:`~distill2deploy.losses.multi_teacher_targets`:
per-sample weights that are fixed (``mean``, optionally with ``weights``) or follow each teacher's
confidence or (negative) entropy on that sample. L = ce_weight * CE + kd_weight * tau^2 KL.

Everything a user can get wrong (the weight count, a missing checkpoint, an unknown model name, a
teacher without weights) is checked when the config is loaded, before the teacher stage runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import timm
import torch.nn.functional as F
from timm.models import parse_model_name, split_model_name_tag
from torch import Tensor, nn

from .. import losses
from .._schema import doc
from ..errors import UserError, suggest
from ..models.factory import create_model
from ._base import DistillMethod, LossTerms, TeacherOutput
from ._levels import teacher_diagnostics
from ._registry import register_method

WHERE = "distill.options"


@dataclass
class ExtraTeacher:
    model: str = doc(help="timm model name of the extra teacher (e.g. resnet44_cifar)")
    checkpoint: str | None = doc(None, "local weights (.pth/.pt/.safetensors state_dict), loaded strictly; "
                                 "takes precedence over pretrained")
    pretrained: bool = doc(True, "load timm's registered pretrained weights (when no checkpoint is given)")
    input_size: int | None = doc(None, "the teacher's input side; inputs are resized inside it when it differs "
                                 "from data.input_size")


@dataclass
class MultiTeacherOptions:
    extra_teachers: list[ExtraTeacher] = doc([], "teachers besides the teacher stage's network, each "
                                             "{model, checkpoint, pretrained, input_size}; frozen")
    weighting: Literal["mean", "confidence", "entropy"] = doc(
        "mean", "per-sample teacher weights: fixed ('mean', see weights), by each teacher's max probability "
        "('confidence') or by its negative prediction entropy ('entropy')")
    weights: list[float] | None = doc(None, "fixed teacher weights, one per teacher (the teacher stage's first); "
                                      "a prior for 'confidence'/'entropy'; null: uniform")
    temperature: float = doc(4.0, "softmax temperature tau of the soft targets and of the KD term")
    ce_weight: float = doc(1.0, "weight of the label cross-entropy")
    kd_weight: float = doc(1.0, "weight of the KD term to the combined soft targets")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def build_extra_teacher(spec: ExtraTeacher, index: int, *, num_classes: int, input_size: int) -> nn.Module:
    """One frozen extra teacher; factory errors are re-raised naming the config key."""
    role = f"{WHERE}.extra_teachers[{index}]"
    try:
        model = create_model(spec.model, num_classes=num_classes, pretrained=spec.pretrained,
                             checkpoint=spec.checkpoint, input_size=spec.input_size, data_input_size=input_size,
                             role=role)
    except UserError as e:
        where = role if not e.where or e.where.startswith(role) else f"{role} ({e.where})"
        raise UserError(e.what, where=where, fix=e.fix) from None
    return model.eval().requires_grad_(False)


@register_method
class MultiTeacher(DistillMethod):
    name = "multi_teacher"
    Options = MultiTeacherOptions

    @classmethod
    def check_options(cls, options: Any) -> None:
        """The teacher weights (one per teacher, in the one place they are checked) and the extra teachers."""
        super().check_options(options)
        o = options
        n = 1 + len(o.extra_teachers)
        if o.weights is not None:
            if len(o.weights) != n:
                raise UserError(f"{_count(len(o.weights), 'weight')} given for {_count(n, 'teacher')} (the teacher "
                                f"stage's network + {len(o.extra_teachers)} extra_teachers)", where=f"{WHERE}.weights",
                                fix=f"give exactly {_count(n, 'weight')}, the teacher stage's first, or leave weights "
                                "unset")
            if any(not math.isfinite(w) or w < 0 for w in o.weights) or sum(o.weights) <= 0:
                raise UserError(f"weights {o.weights!r} must be non-negative with a positive sum",
                                where=f"{WHERE}.weights", fix="e.g. [1, 1] for two equally weighted teachers")
        for i, t in enumerate(o.extra_teachers):
            where = f"{WHERE}.extra_teachers[{i}]"
            source, model_id = parse_model_name(t.model)
            arch = split_model_name_tag(model_id)[0]
            if not source and not timm.is_model(arch):
                hint = suggest(arch, timm.list_models())
                raise UserError(f"unknown model {t.model!r}" + (f" ({hint})" if hint else ""), where=f"{where}.model",
                                fix="list the available names with timm.list_models('*pattern*')")
            if t.checkpoint is not None and not Path(t.checkpoint).expanduser().is_file():
                raise UserError(f"checkpoint file not found: {t.checkpoint}", where=f"{where}.checkpoint",
                                fix="check the path (relative paths are relative to the working directory)")
            if t.checkpoint is None and not t.pretrained:
                raise UserError("this teacher would have random weights (no checkpoint, pretrained: false)",
                                where=f"{where}.pretrained",
                                fix="set checkpoint: PATH to its trained weights, or pretrained: true")
            if t.input_size is not None and t.input_size < 1:
                raise UserError(f"input_size must be a positive integer, got {t.input_size}",
                                where=f"{where}.input_size", fix="e.g. 224, or null for the data's size")

    def __init__(self, student: nn.Module, teachers: list[nn.Module], options: MultiTeacherOptions, *,
                 num_classes: int, input_size: int) -> None:
        super().__init__(student, teachers, options, num_classes=num_classes, input_size=input_size)
        for i, spec in enumerate(options.extra_teachers):
            self._frozen_teachers.append(build_extra_teacher(spec, i, num_classes=num_classes,
                                                             input_size=input_size))
        if options.weights is not None and len(options.weights) != len(self._frozen_teachers):
            raise ValueError(f"multi_teacher: {len(options.weights)} weights for {self.num_teachers} teachers "
                             "(parse_options checked the count for one teacher stage network)")

    @property
    def num_teachers(self) -> int:
        return len(self._frozen_teachers)

    def compute_terms(self, images: Tensor, labels: Tensor, teacher_outputs: list[TeacherOutput],
                      progress: float) -> LossTerms:
        o: MultiTeacherOptions = self.options
        if len(teacher_outputs) != self.num_teachers:
            raise ValueError(f"multi_teacher: expected {self.num_teachers} teacher outputs, got {len(teacher_outputs)}")
        logits = self.student(images)
        targets = losses.multi_teacher_targets([t.logits for t in teacher_outputs], o.temperature, o.weighting,
                                               o.weights)
        terms = {"ce": F.cross_entropy(logits, labels), "kd": losses.soft_target_kd(logits, targets, o.temperature)}
        # Right/wrong fractions against the combined target's arg-max (argmax of probabilities = of logits).
        return LossTerms(logits, terms, {"ce": o.ce_weight, "kd": o.kd_weight},
                         teacher_diagnostics(targets, logits, labels))
