"""ECKD-R: response-based error-correction KD at every level, both directions (docs/methods.md §6).

Student: CE + sum_l aux CE + w_kd KD(t -> s) + w_ec sum_l EC(t_l -> s_l; TRSW_l).
Teacher (bidirectional): CE + sum_l aux CE + w_ec_t sum_l EC(s_l -> t_l; TWSR_l).
Every ablation of the thesis is a switch: ``use_ec``, ``bidirectional``, ``use_levels``, ``augment``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .. import losses
from .._schema import doc
from ._registry import register_method
from .eckd import ECKDBase, ECKDBaseOptions, LevelOutputs


@dataclass
class ECKDROptions(ECKDBaseOptions):
    use_ec: bool = doc(True, "error-correction terms on (false: the 'w/o EC' ablation, CE + aux CE + KD)")
    use_levels: bool = doc(True, "auxiliary heads on the paired stages (false: final logits only, no aux heads)")
    ec_weight: float = doc(1.0, "weight of the teacher -> student EC terms (summed over levels)")
    ec_weight_teacher: float = doc(1.0, "weight of the student -> teacher EC terms (bidirectional mode)")


@register_method
class ECKDR(ECKDBase):
    name = "eckd_r"
    Options = ECKDROptions

    def _wants_levels(self) -> bool:
        return self.options.use_levels

    def loss_terms(self, lv: LevelOutputs) -> dict[str, Tensor]:
        terms = self.common_terms(lv)
        if self.options.use_ec:
            tau = self.options.temperature
            pairs = list(zip(lv.teacher_logits, lv.student_logits, lv.masks))
            terms["ec"] = self.combine_levels([losses.ec_loss(t, s, m.student_correction, tau) for t, s, m in pairs])
            if self.bidirectional:
                terms["ec_teacher"] = self.combine_levels(
                    [losses.ec_loss(s, t, m.teacher_correction, tau) for t, s, m in pairs])
        return terms

    def loss_weights(self) -> dict[str, float]:
        return {**super().loss_weights(), "ec": self.options.ec_weight,
                "ec_teacher": self.options.ec_weight_teacher}
