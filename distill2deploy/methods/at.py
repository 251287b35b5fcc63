"""Attention Transfer (Zagoruyko & Komodakis, ICLR 2017; docs/methods.md §4), in the CRD benchmark's form.

Each paired stage contributes the squared difference of the two networks' spatial attention maps
(``F.normalize(f.pow(p).mean(1).flatten(1))``), the larger map average-pooled to the smaller's size,
and L = ce_weight * CE + feature_weight * sum over pairs (+ optional kd_weight * KD). The defaults
are the CRD / mdistiller CIFAR-100 settings: p = 2, feature_weight = 1000 (CRD's
``--distill attention -a 0 -b 1000``; mdistiller ``AT.LOSS.FEAT_WEIGHT = 1000``), no KD term.

Attention maps do not depend on channel counts, so AT needs no adapter: the student's weights
are all it trains. The pairs are those of :func:`~distill2deploy.methods._levels.default_levels`
(the deepest stages of both networks, as many as the shallower network has), where the CRD code
zips the two networks' stage lists from the first stage; ``levels`` reproduces any such pairing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses
from .._schema import doc
from ..models.features import extract
from ._base import DistillMethod, LossTerms, TeacherOutput
from ._levels import check_levels, optional_kd, require_levels, teacher_diagnostics
from ._registry import register_method


@dataclass
class ATOptions:
    levels: list[list[int]] | None = doc(None, "[[teacher_stage, student_stage], ...] whose attention maps are "
                                         "matched (timm feature_info indices, 0 = stem); null: the default "
                                         "pairing of the deepest stages")
    p: float = doc(2.0, "exponent of the attention map (2 in the paper and the CRD/mdistiller benchmarks)")
    feature_weight: float = doc(1000.0, "weight of the summed attention losses (1000 in the CRD/mdistiller "
                                "CIFAR-100 benchmarks)")
    ce_weight: float = doc(1.0, "weight of the label cross-entropy")
    kd_weight: float = doc(0.0, "weight of an optional Hinton KD term (0: pure AT, as in the benchmarks)")
    temperature: float = doc(4.0, "softmax temperature of the optional KD term")


@register_method
class AT(DistillMethod):
    name = "at"
    Options = ATOptions
    positive_options = ("temperature", "p")

    @classmethod
    def check_options(cls, options: Any) -> None:
        super().check_options(options)
        require_levels(options.levels)

    def __init__(self, student: nn.Module, teachers: list[nn.Module], options: ATOptions, *, num_classes: int,
                 input_size: int) -> None:
        super().__init__(student, teachers, options, num_classes=num_classes, input_size=input_size)
        teacher = teachers[0]
        self.pairs = check_levels(options.levels, teacher, student)

    def teacher_feature_indices(self) -> list[int] | None:
        return [t for t, _ in self.pairs]

    def compute_terms(self, images: Tensor, labels: Tensor, teacher_outputs: list[TeacherOutput],
                      progress: float) -> LossTerms:
        o: ATOptions = self.options
        logits, features = extract(self.student, images, [s for _, s in self.pairs])
        teacher = teacher_outputs[0]
        terms = {"ce": F.cross_entropy(logits, labels),
                 "at": losses.at_loss(features, [t.to(f.dtype) for t, f in zip(teacher.features, features)], o.p)}
        weights = {"ce": o.ce_weight, "at": o.feature_weight}
        optional_kd(terms, weights, logits, teacher.logits, o.kd_weight, o.temperature)
        return LossTerms(logits, terms, weights, teacher_diagnostics(teacher.logits, logits, labels))
