"""FitNet hints (Romero et al., ICLR 2015; docs/methods.md §4), in the CRD benchmark's form.

A learned regressor (1x1 conv + BN, then a spatial resize) maps one middle stage of the student to
the shape of one middle stage of the teacher, and L = ce_weight * CE + feature_weight * MSE
(+ optional kd_weight * KD). As in the CRD / mdistiller CIFAR-100 benchmarks the hint is trained
jointly with the classification loss in one stage (no separate FitNet pre-training stage) with
feature_weight = 100 (CRD's ``scripts/run_cifar_distill.sh``: ``--distill hint -a 0 -b 100``,
``--hint_layer 2``; mdistiller ``FITNET.LOSS.FEAT_WEIGHT = 100``). The default hint pair is the
middle one of :func:`~distill2deploy.methods._levels.default_levels`, e.g. ResNet-56 stage 2 with
MobileNetV2 stage 5, the counterpart of CRD's hint layer 2.

The regressor lives in this method (trained by the student's optimizer), never in the student, so
the exported student is exactly the plain architecture.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses
from .._schema import doc
from ..errors import UserError
from ..models.features import extract
from ._base import DistillMethod, LossTerms, TeacherOutput
from ._levels import (adapter, check_levels, default_levels, feature_shapes, match_size,
                      optional_kd, teacher_diagnostics)
from ._registry import register_method


@dataclass
class FitNetOptions:
    hint: list[int] | None = doc(None, "[teacher_stage, student_stage] whose features are matched (timm "
                                 "feature_info indices, 0 = stem); null: the middle pair of the default levels")
    feature_weight: float = doc(100.0, "weight of the hint MSE (100 in the CRD/mdistiller CIFAR-100 benchmarks)")
    ce_weight: float = doc(1.0, "weight of the label cross-entropy")
    kd_weight: float = doc(0.0, "weight of an optional Hinton KD term (0: pure FitNet)")
    temperature: float = doc(4.0, "softmax temperature of the optional KD term")


def resolve_hint(hint: list[int] | None, teacher: nn.Module, student: nn.Module) -> tuple[int, int]:
    """The (teacher_stage, student_stage) pair: the configured one, checked, or the default middle pair."""
    if hint is None:
        levels = default_levels(teacher, student)
        return levels[len(levels) // 2]
    try:
        return check_levels([hint], teacher, student)[0]
    except UserError as e:  # same check, but name the key the user actually wrote
        raise UserError(e.what, where="distill.options.hint", fix=e.fix) from None


@register_method
class FitNet(DistillMethod):
    name = "fitnet"
    Options = FitNetOptions

    @classmethod
    def check_options(cls, options: Any) -> None:
        super().check_options(options)
        if options.hint is not None and len(options.hint) != 2:
            raise UserError(f"hint must be one [teacher_stage, student_stage] pair, got {options.hint!r}",
                            where="distill.options.hint", fix="e.g. hint: [2, 5], or null for the default pair")

    def __init__(self, student: nn.Module, teachers: list[nn.Module], options: FitNetOptions, *, num_classes: int,
                 input_size: int) -> None:
        super().__init__(student, teachers, options, num_classes=num_classes, input_size=input_size)
        teacher = teachers[0]
        self.hint = resolve_hint(options.hint, teacher, student)
        (t_shape,) = feature_shapes(teacher, [self.hint[0]], input_size)
        (s_shape,) = feature_shapes(student, [self.hint[1]], input_size)
        self.teacher_size = (int(t_shape[1]), int(t_shape[2]))
        self.regressor = adapter(int(s_shape[0]), int(t_shape[0]))

    def teacher_feature_indices(self) -> list[int] | None:
        return [self.hint[0]]

    def regress(self, student_feature: Tensor) -> Tensor:
        """The student's hint feature mapped to the teacher's channels and spatial size."""
        return match_size(self.regressor(student_feature), self.teacher_size)

    def compute_terms(self, images: Tensor, labels: Tensor, teacher_outputs: list[TeacherOutput],
                      progress: float) -> LossTerms:
        o: FitNetOptions = self.options
        logits, (feature,) = extract(self.student, images, [self.hint[1]])
        teacher = teacher_outputs[0]
        regressed = self.regress(feature)
        terms = {"ce": F.cross_entropy(logits, labels),
                 "fitnet": losses.fitnet_loss(regressed, teacher.features[0].to(regressed.dtype))}
        weights = {"ce": o.ce_weight, "fitnet": o.feature_weight}
        optional_kd(terms, weights, logits, teacher.logits, o.kd_weight, o.temperature)
        return LossTerms(logits, terms, weights, teacher_diagnostics(teacher.logits, logits, labels))
