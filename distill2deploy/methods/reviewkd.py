"""ReviewKD, distilling knowledge via knowledge review (Chen et al., CVPR 2021; docs/methods.md §4).

Each student level is supervised by the teacher through a residual top-down fusion: starting from
the deepest student feature, an attention-based fusion (ABF) block reduces the student feature to
``mid`` channels, fuses it with the (resized) fused feature of the level below it using two
predicted spatial attention maps, resizes the result to the teacher feature's size and projects it
to the teacher's channels with a 3x3 conv + BN. Every fused feature is compared with the teacher
feature of its level by the hierarchical context loss (:func:`~distill2deploy.losses.hcl_loss`).
L = ce_weight * CE + feature_weight * warmup * sum HCL.

Written from the paper and a reading of the authors' CIFAR-100 code (dvlab-research/ReviewKD,
``CIFAR-100/model/reviewkd.py`` and ``train.py``). Choices, and where they differ:

* levels: the paired stages of :func:`~distill2deploy.methods._levels.default_levels` (all of
  ResNet-56's stages 1-3 with the student's deepest stages), plus, with ``pooled`` (default, as in
  the authors' code), the student's pre-logit pooled feature against the teacher's globally
  average-pooled last stage (exactly the ResNet teacher's pre-logit feature);
* ``mid`` channels = min(512, channels of the deepest student feature), as in the code;
* ABF resizes by nearest-neighbour interpolation, as the code does (``resize: nearest``;
  ``pool_bilinear``: :func:`~distill2deploy.methods._levels.match_size`, average-pool down, bilinear up);
* teacher stage features are taken before the stage's final ReLU, as the code's ``preact=True``
  (``teacher_features: preact``, found by :mod:`~distill2deploy.methods._preact` and run in the
  trainer's teacher pass through :meth:`ReviewKD.run_teacher`); ``output``: timm's post-ReLU stage
  outputs. The pooled target stays post-ReLU, as the code's;
* feature_weight (lambda) defaults to 1.0 with a 20-epoch linear warm-up: the defaults of the
  authors' ``train.py`` (``--kd-loss-weight 1.0 --kd-warm-up 20``). Their CIFAR-100 script tunes
  lambda per pair: 0.6 for ResNet-56 -> ResNet-20, 1.0 for ResNet-110 -> ResNet-32, 5.0 for
  WRN/ResNet32x4 teachers, 8.0 for ResNet32x4 -> ShuffleNetV2 (``CIFAR-100/script/reviewKD.sh``).

The ABF blocks live in this method (trained by the student's optimizer), never in the student.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses
from .._schema import doc
from ..errors import UserError
from ..models.features import ResizeInput, extract, stage_count
from ._base import DistillMethod, LossTerms, TeacherOutput
from ._levels import (check_levels, dry_run, feature_shapes, match_size, require_levels,
                      optional_kd, teacher_diagnostics)
from ._preact import PreActivation
from ._registry import register_method


@dataclass
class ReviewKDOptions:
    levels: list[list[int]] | None = doc(None, "[[teacher_stage, student_stage], ...] from shallow to deep (timm "
                                         "feature_info indices, 0 = stem); null: the default pairing of the "
                                         "deepest stages")
    pooled: bool = doc(True, "also review the student's pre-logit pooled feature against the teacher's pooled "
                       "last stage (as in the ReviewKD code)")
    feature_weight: float = doc(1.0, "lambda, the weight of the summed HCL terms (paper code default 1.0; its "
                                "CIFAR script uses 0.6 for ResNet-56 -> ResNet-20, 5-8 for larger teachers)")
    warmup_epochs: float = doc(20.0, "epochs of linear warm-up of the review term (0: none)")
    ce_weight: float = doc(1.0, "weight of the label cross-entropy")
    kd_weight: float = doc(0.0, "weight of an optional Hinton KD term on the logits (the code's --use-kl)")
    temperature: float = doc(4.0, "softmax temperature of the optional KD term")
    hcl_levels: list[int] = doc([4, 2, 1], "pyramid-pooling sizes of the hierarchical context loss")
    max_mid_channels: int = doc(512, "upper bound of the ABF blocks' fusion width")
    teacher_features: Literal["preact", "output"] = doc(
        "preact", "teacher stage features compared with: 'preact' before the stage's final ReLU (the authors' "
        "code, preact=True), 'output' the stage outputs timm returns (after it)")
    resize: Literal["nearest", "pool_bilinear"] = doc(
        "nearest", "how ABF resizes the fused features: 'nearest' neighbour interpolation (the authors' code), "
        "'pool_bilinear' average-pool down, bilinear up")


class ABF(nn.Module):
    """Attention-based fusion of one student level with the fused feature of the level below it.

    Returns ``(output, residual)``: ``output`` (teacher channels, teacher size) is what HCL
    compares with the teacher; ``residual`` (``mid`` channels) is handed to the next shallower level.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool,
                 resize: str = "nearest") -> None:
        super().__init__()
        self.resize = resize
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.project = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                     nn.BatchNorm2d(out_channels))
        # Two sigmoid maps: how much of the own feature and of the deeper residual to keep per position.
        self.attention = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None)
        for conv in (self.reduce[0], self.project[0]):
            nn.init.kaiming_uniform_(conv.weight, a=1)  # the authors' init

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        x = self.reduce(x)
        if self.attention is not None:
            if residual is None:
                raise ValueError("ABF: a fusing block needs the residual of the deeper level")
            residual = self._resize(residual, tuple(x.shape[-2:]))
            weights = self.attention(torch.cat([x, residual], dim=1))
            x = x * weights[:, 0:1] + residual * weights[:, 1:2]
        x = self._resize(x, out_size)
        return self.project(x), x

    def _resize(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if self.resize == "pool_bilinear":
            return match_size(x, size)
        return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="nearest")


def student_features(student: nn.Module, images: Tensor, indices: list[int],
                     pooled: bool) -> tuple[Tensor, list[Tensor]]:
    """Logits and the student's stage features at ``indices``, plus its pre-logit pooled feature as a
    ``[B, C, 1, 1]`` map when ``pooled`` (one forward pass)."""
    if not pooled:
        return extract(student, images, indices)
    model = student.model if isinstance(student, ResizeInput) else student
    if isinstance(student, ResizeInput):
        images = student.resize(images)
    if not (hasattr(model, "forward_intermediates") and hasattr(model, "forward_head")):
        raise UserError(f"{type(model).__name__} has no forward_intermediates/forward_head, so its pre-logit "
                        "pooled feature cannot be taken", where="distill.options.pooled",
                        fix="set pooled: false (review the stage features only), or use a timm model")
    unique = sorted(set(indices))
    final, feats = model.forward_intermediates(images, indices=unique)
    by_index = dict(zip(unique, feats))
    pre_logits = model.forward_head(final, pre_logits=True)
    logits = model.forward_head(final)
    return logits, [by_index[i] for i in indices] + [pre_logits.flatten(1)[:, :, None, None]]


@register_method
class ReviewKD(DistillMethod):
    name = "reviewkd"
    Options = ReviewKDOptions

    positive_options = ("temperature", "max_mid_channels")

    @classmethod
    def check_options(cls, options: Any) -> None:
        super().check_options(options)
        if not options.hcl_levels or any(level < 1 for level in options.hcl_levels):
            raise UserError(f"hcl_levels must be positive pooling sizes, got {options.hcl_levels!r}",
                            where="distill.options.hcl_levels", fix="use e.g. [4, 2, 1] (the paper's choice)")
        require_levels(options.levels, example="[[1, 3], [2, 5], [3, 7]]")

    def __init__(self, student: nn.Module, teachers: list[nn.Module], options: ReviewKDOptions, *,
                 num_classes: int, input_size: int) -> None:
        super().__init__(student, teachers, options, num_classes=num_classes, input_size=input_size)
        teacher = teachers[0]
        pairs = check_levels(options.levels, teacher, student)
        if any(a[1] >= b[1] or a[0] > b[0] for a, b in zip(pairs, pairs[1:])):
            raise UserError(f"levels {[list(p) for p in pairs]} do not go from shallow to deep",
                            where="distill.options.levels",
                            fix="order the pairs by depth: student stages strictly increasing, teacher stages "
                            "not decreasing, e.g. [[1, 3], [2, 5], [3, 7]]")
        self.pairs = pairs
        self.student_indices = [s for _, s in pairs]
        self._teacher_indices = [t for t, _ in pairs] + ([stage_count(teacher)] if options.pooled else [])

        t_shapes = feature_shapes(teacher, self._teacher_indices, input_size)
        out_channels = [int(s[0]) for s in t_shapes]
        out_sizes = [(int(s[1]), int(s[2])) for s in t_shapes]
        if options.pooled:
            out_sizes[-1] = (1, 1)  # the teacher's last stage, globally pooled
        s_feats = dry_run(student, input_size,
                          lambda m, x: student_features(m, x, self.student_indices, options.pooled)[1])
        in_channels = [int(f.shape[1]) for f in s_feats]
        mid = min(options.max_mid_channels, in_channels[-1])
        self.out_sizes = out_sizes
        self.abfs = nn.ModuleList(ABF(cin, mid, cout, fuse=i < len(in_channels) - 1, resize=options.resize)
                                  for i, (cin, cout) in enumerate(zip(in_channels, out_channels)))
        # The pooled target is the post-ReLU last stage, pooled (the authors' pre-logit feature).
        preact = [options.teacher_features == "preact"] * len(pairs) + [False] * options.pooled
        self._teacher_run = PreActivation(teacher, self._teacher_indices, preact, input_size)

    def teacher_feature_indices(self) -> list[int] | None:
        return list(self._teacher_indices)

    def run_teacher(self, teacher: nn.Module, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self._teacher_run(teacher, images)

    def review(self, features: list[Tensor]) -> list[Tensor]:
        """Top-down fusion: one output per level, shallow to deep, each shaped like its teacher feature."""
        outputs: list[Tensor] = []
        residual = None
        for i in reversed(range(len(features))):
            out, residual = self.abfs[i](features[i], residual, self.out_sizes[i])
            outputs.insert(0, out)
        return outputs

    def teacher_targets(self, teacher: TeacherOutput) -> list[Tensor]:
        targets = list(teacher.features)
        if self.options.pooled:
            targets[-1] = F.adaptive_avg_pool2d(targets[-1], 1)
        return targets

    def compute_terms(self, images: Tensor, labels: Tensor, teacher_outputs: list[TeacherOutput],
                      progress: float) -> LossTerms:
        o: ReviewKDOptions = self.options
        logits, features = student_features(self.student, images, self.student_indices, o.pooled)
        teacher = teacher_outputs[0]
        reviewed = self.review(features)
        targets = [t.to(r.dtype) for t, r in zip(self.teacher_targets(teacher), reviewed)]
        terms = {"ce": F.cross_entropy(logits, labels), "hcl": losses.hcl_loss(reviewed, targets, levels=o.hcl_levels)}
        weights = {"ce": o.ce_weight, "hcl": o.feature_weight * losses.dkd_warmup(progress, o.warmup_epochs)}
        optional_kd(terms, weights, logits, teacher.logits, o.kd_weight, o.temperature)
        return LossTerms(logits, terms, weights, teacher_diagnostics(teacher.logits, logits, labels))
