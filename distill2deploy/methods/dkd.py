"""DKD, decoupled knowledge distillation (Zhao et al., CVPR 2022; docs/methods.md §2).

KD splits exactly into a target-class term (TCKD) and a non-target term (NCKD) whose weight
``1 - p_t^T`` shrinks exactly when the teacher is confident; DKD weights the two freely
(alpha * TCKD + beta * NCKD). The large beta makes the term strong for a randomly initialised
student, hence the paper's linear warm-up over the first 20 epochs (driven by ``progress``, the
fractional epoch, so it is smooth within an epoch too).

beta: the paper uses 8 for its confident teachers (ResNet32x4) and 2 for ResNet-56/110 teachers
(the authors' ``configs/cifar100/dkd/res56_res20.yaml``); the default here is the paper's headline 8.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from .. import losses
from .._schema import doc
from ..errors import UserError
from ._base import DistillMethod, StepOutput, TeacherOutput
from ._registry import register_method


@dataclass
class DKDOptions:
    alpha: float = doc(1.0, "weight of TCKD, the target-vs-rest binary term")
    beta: float = doc(8.0, "weight of NCKD, the term over the non-target classes (paper: 8 for confident "
                      "teachers, 2 for ResNet-56/110 teachers)")
    temperature: float = doc(4.0, "softmax temperature tau (both terms are multiplied by tau^2)")
    ce_weight: float = doc(1.0, "weight of the label cross-entropy")
    warmup_epochs: float = doc(20.0, "epochs of linear warm-up of the DKD term (0: none)")


def _check_numbers(options: Any, where: str = "distill.options") -> Any:
    """Range checks the types cannot express, run when the config is loaded."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        positive = f.name == "temperature"
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise UserError(f"{f.name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}",
                            where=f"{where}.{f.name}",
                            fix="use a positive temperature (4 is usual)" if positive
                            else "use 0 to disable the term, or a positive value")
    return options


@register_method
class DKD(DistillMethod):
    name = "dkd"
    Options = DKDOptions

    @classmethod
    def parse_options(cls, options: dict[str, Any]) -> Any:
        return _check_numbers(super().parse_options(options))

    def forward(self, images: Tensor, labels: Tensor, teacher_outputs: list[TeacherOutput],
                progress: float) -> StepOutput:
        o: DKDOptions = self.options
        logits = self.student(images)
        teacher_logits = teacher_outputs[0].logits
        ce = F.cross_entropy(logits, labels)
        tckd, nckd = losses.dkd_terms(logits, teacher_logits, labels, o.temperature)
        dkd = losses.dkd_warmup(progress, o.warmup_epochs) * (o.alpha * tckd + o.beta * nckd)
        loss = o.ce_weight * ce + dkd
        logs = {"ce": ce.detach(), "tckd": tckd.detach(), "nckd": nckd.detach(), "dkd": dkd.detach(),
                **losses.mask_fractions(losses.error_masks(teacher_logits, logits, labels))}
        return StepOutput(loss=loss, logits=logits, logs=logs)
