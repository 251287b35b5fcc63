"""KD + EC: Hinton KD plus error correction at the final level, frozen teacher (docs/methods.md §6).

L = w_ce CE + w_kd KD(t -> s) + w_ec EC(t -> s; TRSW): the teacher's soft targets everywhere, and
an extra pull on exactly the samples the teacher gets right and the student wrong. It is ECKD-R
reduced to one level and one direction, written out because it is a modifier of plain KD.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from .. import losses
from .._schema import doc
from ._base import DistillMethod, LossTerms, TeacherOutput
from ._levels import mask_logs
from ._registry import register_method


@dataclass
class KDECOptions:
    temperature: float = doc(4.0, "softmax temperature tau of KD and EC")
    ce_weight: float = doc(1.0, "weight of the label cross-entropy")
    kd_weight: float = doc(1.0, "weight of the KD term (0 disables it)")
    ec_weight: float = doc(1.0, "weight of the error-correction term on teacher-right/student-wrong samples")


@register_method
class KDEC(DistillMethod):
    name = "kd_ec"
    Options = KDECOptions

    def compute_terms(self, images: Tensor, labels: Tensor, teacher_outputs: list[TeacherOutput],
                      progress: float) -> LossTerms:
        o: KDECOptions = self.options
        logits = self.student(images)
        t_logits = teacher_outputs[0].logits
        masks = losses.error_masks(t_logits, logits, labels)
        terms = {"ce": F.cross_entropy(logits, labels), "kd": losses.kd_loss(logits, t_logits, o.temperature),
                 "ec": losses.ec_loss(t_logits, logits, masks.student_correction, o.temperature)}
        return LossTerms(logits, terms, {"ce": o.ce_weight, "kd": o.kd_weight, "ec": o.ec_weight}, mask_logs(masks))
