"""Cross-entropy only: the student trained on labels, the baseline every KD method must beat."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ._base import DistillMethod, LossTerms, TeacherOutput
from ._registry import register_method


@register_method
class CrossEntropy(DistillMethod):
    name = "ce"
    uses_teacher = False

    def compute_terms(self, images: Tensor, labels: Tensor, teacher_outputs: list[TeacherOutput],
                      progress: float) -> LossTerms:
        logits = self.student(images)
        return LossTerms(logits, {"ce": F.cross_entropy(logits, labels)}, {"ce": 1.0})
