"""Cross-entropy only: the student trained on labels, the baseline every KD method must beat."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ._base import DistillMethod, StepOutput, TeacherOutput
from ._registry import register_method


@register_method
class CrossEntropy(DistillMethod):
    name = "ce"
    uses_teacher = False

    def forward(self, images: Tensor, labels: Tensor, teacher_outputs: list[TeacherOutput],
                progress: float) -> StepOutput:
        logits = self.student(images)
        loss = F.cross_entropy(logits, labels)
        return StepOutput(loss=loss, logits=logits, logs={"ce": loss.detach()})
