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

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from .. import losses
from .._schema import doc
from ._base import DistillMethod, LossTerms, TeacherOutput
from ._levels import teacher_diagnostics
from ._registry import register_method


@dataclass
class DKDOptions:
    alpha: float = doc(1.0, "weight of TCKD, the target-vs-rest binary term")
    beta: float = doc(8.0, "weight of NCKD, the term over the non-target classes (paper: 8 for confident "
                      "teachers, 2 for ResNet-56/110 teachers)")
    temperature: float = doc(4.0, "softmax temperature tau (both terms are multiplied by tau^2)")
    ce_weight: float = doc(1.0, "weight of the label cross-entropy")
    warmup_epochs: float = doc(20.0, "epochs of linear warm-up of the DKD term (0: none)")


@register_method
class DKD(DistillMethod):
    name = "dkd"
    Options = DKDOptions

    def compute_terms(self, images: Tensor, labels: Tensor, teacher_outputs: list[TeacherOutput],
                      progress: float) -> LossTerms:
        o: DKDOptions = self.options
        logits = self.student(images)
        teacher_logits = teacher_outputs[0].logits
        tckd, nckd = losses.dkd_terms(logits, teacher_logits, labels, o.temperature)
        warmup = losses.dkd_warmup(progress, o.warmup_epochs)
        dkd = (warmup * (o.alpha * tckd + o.beta * nckd)).detach()  # the weighted DKD term, logged
        return LossTerms(logits, {"ce": F.cross_entropy(logits, labels), "tckd": tckd, "nckd": nckd},
                         {"ce": o.ce_weight, "tckd": warmup * o.alpha, "nckd": warmup * o.beta},
                         {"dkd": dkd, **teacher_diagnostics(teacher_logits, logits, labels)})
