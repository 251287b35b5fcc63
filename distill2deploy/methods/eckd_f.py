"""ECKD-F: the ECKD masks applied per sample to a feature loss at each paired level (docs/methods.md §6).

Each direction's *learner* owns the adapter (1x1 conv + BN, then a spatial resize) that maps its
own feature into the shape of the other side's raw feature:

* student side: ``masked_feature_loss(F_t, adapter_s(F_s), TRSW)`` -- adapter_s: student -> teacher;
* teacher side (bidirectional): ``masked_feature_loss(F_s, adapter_t(F_t), TWSR)`` -- adapter_t:
  teacher -> student.

The source of each direction is detached, so an adapter on the source side would get no gradient
(and, were the source not detached, both sides could shrink towards a trivial match); on the
learner's side the map is trained together with the network it belongs to (adapter_s in the
student's optimizer, adapter_t in the teacher's), and the target stays the other network's real
feature, as in FitNet. The adapted feature is resized to the source's spatial size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import losses
from .._schema import doc
from ..errors import UserError
from ._levels import adapter, match_size
from ._registry import register_method
from .eckd import ECKDBase, ECKDBaseOptions, LevelOutputs


@dataclass
class ECKDFOptions(ECKDBaseOptions):
    use_ec: bool = doc(True, "mask the feature loss by the error-correction masks (false: every sample, the "
                       "'w/o EC' ablation)")
    feature_weight: float = doc(1.0, "weight of the teacher -> student masked feature loss (summed over levels)")
    feature_weight_teacher: float = doc(1.0, "weight of the student -> teacher masked feature loss (bidirectional)")


@register_method
class ECKDF(ECKDBase):
    name = "eckd_f"
    Options = ECKDFOptions

    def __init__(self, student: nn.Module, teachers: list[nn.Module], options: Any, *, num_classes: int,
                 input_size: int) -> None:
        super().__init__(student, teachers, options, num_classes=num_classes, input_size=input_size)
        if not self.level_pairs:
            raise UserError("eckd_f needs at least one [teacher_stage, student_stage] level",
                            where="distill.options.levels",
                            fix="leave levels null for the default pairing, or use eckd_r for logits only")
        pairs = list(zip(self.teacher_shapes, self.student_shapes))
        self.student_adapters = nn.ModuleList(adapter(s[0], t[0]) for t, s in pairs)
        self.teacher_adapters = nn.ModuleList(adapter(t[0], s[0]) for t, s in pairs) if self.bidirectional else None

    def _student_side(self) -> list[nn.Module]:
        return [self.student_adapters]

    def _teacher_side(self) -> list[nn.Module]:
        return [self.teacher_adapters] if self.teacher_adapters is not None else []

    def loss_terms(self, lv: LevelOutputs) -> dict[str, Tensor]:
        terms = self.common_terms(lv)
        use_ec = self.options.use_ec
        feat, feat_t = [], []
        for k, (f_t, f_s) in enumerate(zip(lv.teacher_feats, lv.student_feats)):
            masks = lv.masks[k]
            every = torch.ones_like(masks.trsw)
            m_s, m_t = (masks.student_correction, masks.teacher_correction) if use_ec else (every, every)
            feat.append(losses.masked_feature_loss(f_t, match_size(self.student_adapters[k](f_s), f_t.shape[-2:]), m_s))
            if self.teacher_adapters is not None:
                f_t_adapted = match_size(self.teacher_adapters[k](f_t), f_s.shape[-2:])
                feat_t.append(losses.masked_feature_loss(f_s, f_t_adapted, m_t))
        terms["feat"] = self.combine_levels(feat)
        if feat_t:
            terms["feat_teacher"] = self.combine_levels(feat_t)
        return terms

    def loss_weights(self) -> dict[str, float]:
        return {**super().loss_weights(), "feat": self.options.feature_weight,
                "feat_teacher": self.options.feature_weight_teacher}
