"""FSP, Flow of Solution Procedure (Yim et al., CVPR 2017; docs/methods.md §4).

The FSP matrix of a stretch of a network is the Gram matrix between the feature entering it and the
feature leaving it, averaged over positions (:func:`~distill2deploy.losses.fsp_matrix`); the
student learns to reproduce the teacher's matrices (mean squared difference, summed over stretches).

Schedule, as in the paper: first ``init_epochs`` of the FSP loss alone (weight ``init_weight``),
then the task: CE (+ ``feature_weight`` x FSP for the joint form, + optional KD). The defaults
reproduce the CRD benchmark's code (RepDistiller): 30 initialisation epochs of the summed FSP loss,
then plain CE; ``init_epochs: 0`` with ``feature_weight > 0`` is the joint single-stage form. One
optimizer and LR schedule serve both phases, so a faithful run lengthens the schedule by the
initialisation epochs (the bundled configs: 270 epochs, milestones at 180/210/240).

Stretches run between consecutive ``levels`` points. The default points are the stem and the
deepest stage pairs of :func:`~distill2deploy.methods._levels.default_levels`: for ResNet-56 ->
ResNet-20 exactly the code's stem->stage1->stage2->stage3 chain. FSP needs equal channel counts on
both sides; the CRD code refuses other pairs, here a student point whose width differs from the
teacher's gets a 1x1 conv + BN adapter (trained with the student, never exported), so the
benchmark's cross-architecture students (MobileNetV2, ShuffleNetV2) can be trained with it too.
During the initialisation phase the classifier stays in the graph with weight 0, so every trained
parameter has a gradient (DDP needs no unused-parameter search); weight decay still applies to it.
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
from ._levels import (adapter, check_levels, default_levels, feature_shapes, optional_kd, require_levels,
                      teacher_diagnostics)
from ._registry import register_method


@dataclass
class FSPOptions:
    levels: list[list[int]] | None = doc(None, "[[teacher_stage, student_stage], ...] points from shallow to "
                                         "deep; one FSP matrix per consecutive pair of points (timm "
                                         "feature_info indices, 0 = stem); null: the stem, then the default "
                                         "pairing of the deepest stages")
    init_epochs: float = doc(30.0, "leading epochs that train the FSP loss alone (the paper's first stage; "
                             "30 in the CRD benchmark code); 0: no separate stage")
    init_weight: float = doc(1.0, "weight of the summed FSP losses during the initialisation epochs")
    feature_weight: float = doc(0.0, "weight of the FSP loss after the initialisation epochs (0: the paper's "
                                "two-stage schedule; > 0 with init_epochs 0: the joint loss)")
    ce_weight: float = doc(1.0, "weight of the label cross-entropy after the initialisation epochs")
    kd_weight: float = doc(0.0, "weight of an optional Hinton KD term after the initialisation epochs")
    temperature: float = doc(4.0, "softmax temperature of the optional KD term")


@register_method
class FSP(DistillMethod):
    name = "fsp"
    Options = FSPOptions

    @classmethod
    def check_options(cls, options: Any) -> None:
        super().check_options(options)
        where = "distill.options"
        require_levels(options.levels, 2, example="[[0, 0], [1, 3], [2, 5], [3, 7]]")  # two points: one stretch
        if options.init_epochs > 0 and options.init_weight == 0:
            raise UserError("init_epochs > 0 with init_weight 0 trains nothing during the initialisation epochs",
                            where=f"{where}.init_weight", fix="set init_weight: 1.0, or init_epochs: 0")
        if options.init_epochs == 0 and options.feature_weight == 0:
            raise UserError("with init_epochs 0 and feature_weight 0 the FSP loss is never used (plain CE)",
                            where=f"{where}.feature_weight",
                            fix="set feature_weight > 0 (joint loss) or init_epochs > 0 (two-stage schedule), "
                            "or use distill.method: ce")

    def __init__(self, student: nn.Module, teachers: list[nn.Module], options: FSPOptions, *, num_classes: int,
                 input_size: int) -> None:
        super().__init__(student, teachers, options, num_classes=num_classes, input_size=input_size)
        teacher = teachers[0]
        points = (check_levels(options.levels, teacher, student) if options.levels is not None
                  else [(0, 0), *default_levels(teacher, student)])
        if any(a[0] >= b[0] or a[1] >= b[1] for a, b in zip(points, points[1:])):
            raise UserError(f"levels {[list(p) for p in points]} do not go strictly from shallow to deep",
                            where="distill.options.levels",
                            fix="order the points by depth, both stages strictly increasing, "
                            "e.g. [[0, 0], [1, 3], [2, 5], [3, 7]]")
        self.points = points
        t_channels = [int(s[0]) for s in feature_shapes(teacher, [t for t, _ in points], input_size)]
        s_channels = [int(s[0]) for s in feature_shapes(student, [s for _, s in points], input_size)]
        self.adapters = nn.ModuleList(nn.Identity() if cs == ct else adapter(cs, ct)
                                      for cs, ct in zip(s_channels, t_channels))

    def teacher_feature_indices(self) -> list[int] | None:
        return [t for t, _ in self.points]

    def compute_terms(self, images: Tensor, labels: Tensor, teacher_outputs: list[TeacherOutput],
                      progress: float) -> LossTerms:
        o: FSPOptions = self.options
        logits, features = extract(self.student, images, [s for _, s in self.points])
        teacher = teacher_outputs[0]
        adapted = [a(f) for a, f in zip(self.adapters, features)]
        targets = [t.to(f.dtype) for t, f in zip(teacher.features, adapted)]
        terms = {"ce": F.cross_entropy(logits, labels),
                 "fsp": losses.fsp_loss(list(zip(adapted, adapted[1:])), list(zip(targets, targets[1:])))}
        # First stage: FSP alone; CE (and KD) stay in the graph at weight 0, so every parameter gets a
        # gradient and every step logs the same keys.
        weights = {"ce": o.ce_weight, "fsp": o.feature_weight}
        optional_kd(terms, weights, logits, teacher.logits, o.kd_weight, o.temperature)
        if progress < o.init_epochs:
            weights = {**{k: 0.0 for k in weights}, "fsp": o.init_weight}
        return LossTerms(logits, terms, weights, teacher_diagnostics(teacher.logits, logits, labels))
