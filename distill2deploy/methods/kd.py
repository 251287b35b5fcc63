"""Hinton KD (offline, response-based; docs/methods.md §1): CE on labels + tau^2 KL to the teacher's soft targets."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from .. import losses
from .._schema import doc
from ._base import DistillMethod, LossTerms, TeacherOutput
from ._levels import teacher_diagnostics
from ._registry import register_method


@dataclass
class KDOptions:
    temperature: float = doc(4.0, "softmax temperature tau")
    ce_weight: float = doc(1.0, "weight of the label cross-entropy")
    kd_weight: float = doc(1.0, "weight of the KD term")


@register_method
class KD(DistillMethod):
    name = "kd"
    Options = KDOptions

    def compute_terms(self, images: Tensor, labels: Tensor, teacher_outputs: list[TeacherOutput],
                      progress: float) -> LossTerms:
        o: KDOptions = self.options
        logits = self.student(images)
        teacher_logits = teacher_outputs[0].logits
        terms = {"ce": F.cross_entropy(logits, labels), "kd": losses.kd_loss(logits, teacher_logits, o.temperature)}
        return LossTerms(logits, terms, {"ce": o.ce_weight, "kd": o.kd_weight},
                         teacher_diagnostics(teacher_logits, logits, labels))
