"""ECKD machinery shared by ECKD-R and ECKD-F (docs/methods.md §6).

ECKD corrects, at every *level* of the two networks, only the samples where one side is right
and the other wrong. A level is a pair (teacher stage, student stage) with an auxiliary
classifier (global pool + linear) on each side, plus the final logits. This module owns what both
variants need:

* the levels and the auxiliary heads (sized from the real feature shapes, one dry run);
* who owns the teacher: in bidirectional mode it is a registered submodule trained by its own
  optimizer at ``teacher_lr``; in one-way mode it stays a frozen teacher of the trainer (run
  without autograd, outside DDP), and its auxiliary heads are trained as probes on its detached
  features, because the masks need a per-level teacher prediction;
* the optional extra augmented view of the batch (:meth:`ECKDBase.views`: the trainer runs a frozen
  teacher on it with the loaded images), the per-level masks and their diagnostics.

The auxiliary heads and adapters live in the method module, never in the student, so the exported
student is exactly the plain architecture.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses
from .._schema import doc
from ..errors import UserError
from ..models.features import extract
from ._base import DistillMethod, LossTerms, OptimizerSpec, TeacherOutput
from ._levels import aux_head, check_levels, feature_shapes, mask_logs

AUGMENTS = ("none", "rotate", "flip")


@dataclass
class ECKDBaseOptions:
    temperature: float = doc(4.0, "softmax temperature tau of KD and of the error-correction terms")
    kd_weight: float = doc(1.0, "weight of Hinton KD teacher -> student at the final level (0 disables it)")
    aux_ce_weight: float = doc(1.0, "weight of the label cross-entropy of every auxiliary head")
    bidirectional: bool = doc(True, "train the teacher too (own optimizer at teacher_lr) so the student can "
                              "correct it; false: frozen teacher, corrections teacher -> student only")
    teacher_lr: float | None = doc(None, "initial lr of the teacher network in bidirectional mode (same schedule "
                                   "as the student; its freshly initialised heads and adapters train at distill.lr); "
                                   "null: distill.lr x teacher_lr_scale")
    teacher_lr_scale: float = doc(0.1, "with teacher_lr null: the teacher network's lr as a fraction of distill.lr "
                                  "(the teacher stage's network is trained already; 1.0: the thesis's single lr, "
                                  "or a teacher that starts from scratch)")
    levels: list[list[int]] | None = doc(None, "[[teacher_stage, student_stage], ...] paired for auxiliary heads "
                                         "(timm feature_info indices, 0 = stem); null: the thesis pairing of the "
                                         "deepest stages")
    augment: Literal["none", "rotate", "flip"] = doc(
        "none", "extra view of every batch through both networks with the same losses: 'rotate' turns each image "
        "by a random 90/180/270 degrees, 'flip' mirrors it; 'none' disables the view")
    teacher_probe_epochs: float = doc(
        0.0, "bidirectional mode: leading epochs in which the teacher's auxiliary heads (and ECKD-F's teacher "
        "adapters) train as probes on its detached features, so the large label CE and EC gradients of these "
        "freshly initialised modules reach them but not the pretrained teacher's backbone; 0: from the first "
        "step (the thesis)")
    level_reduction: Literal["sum", "mean"] = doc(
        "sum", "how the per-level auxiliary CE and error-correction terms combine: 'sum' (the thesis's formula) or "
        "'mean' (each term divided by its number of levels, so adding levels does not scale the loss)")


def augmented_view(images: Tensor, kind: str) -> Tensor | None:
    """The extra view of a batch, or None for ``'none'``.

    ``rotate`` follows SSKD's 90/180/270-degree rotations (never 0, so the view always differs);
    one rotation is drawn per image from the global RNG (seeded by the trainer) and selected with
    ``torch.where`` rather than boolean indexing, which would force a host sync on a GPU.
    """
    if kind == "none":
        return None
    if kind == "flip":
        return torch.flip(images, dims=(3,))
    if kind == "rotate":
        if images.shape[-1] != images.shape[-2]:
            raise UserError(f"augment 'rotate' needs square images, got {tuple(images.shape[-2:])}",
                            where="distill.options.augment", fix="use augment: flip or none")
        k = torch.randint(1, 4, (images.shape[0], 1, 1, 1), device=images.device)
        r1, r2, r3 = (torch.rot90(images, r, dims=(2, 3)) for r in (1, 2, 3))
        return torch.where(k == 1, r1, torch.where(k == 2, r2, r3))
    raise UserError(f"unknown augment {kind!r}", where="distill.options.augment", fix=f"use one of {AUGMENTS}")


@dataclass
class LevelOutputs:
    """One step's views through both networks, level by level (what the loss terms are built from).

    Per-level lists run over the paired stages first (level 1..n, the auxiliary heads) and end with
    the final logits. Rows cover every view: the first ``batch`` rows are the original images.
    """

    labels: Tensor
    batch: int
    student_logits: list[Tensor]
    teacher_logits: list[Tensor]
    student_feats: list[Tensor]
    teacher_feats: list[Tensor]
    masks: list[losses.ErrorMasks]


class ECKDBase(DistillMethod):
    """Levels, heads, teacher ownership, views and masks; subclasses add their loss terms."""

    Options: ClassVar[type] = ECKDBaseOptions

    def __init__(self, student: nn.Module, teachers: list[nn.Module], options: Any, *, num_classes: int,
                 input_size: int) -> None:
        super().__init__(student, teachers, options, num_classes=num_classes, input_size=input_size)
        if len(teachers) != 1:
            raise UserError(f"{self.name} distils from exactly one teacher, got {len(teachers)}",
                            where="teacher", fix="configure a single teacher")
        teacher = teachers[0]
        self.bidirectional = bool(options.bidirectional)
        self.level_pairs = self._resolve_levels(teacher, student)
        t_idx, s_idx = self.teacher_indices, self.student_indices
        self.teacher_shapes = feature_shapes(teacher, t_idx, input_size) if t_idx else []
        self.student_shapes = feature_shapes(student, s_idx, input_size) if s_idx else []
        self.student_heads = nn.ModuleList(aux_head(s[0], num_classes) for s in self.student_shapes)
        self.teacher_heads = nn.ModuleList(aux_head(t[0], num_classes) for t in self.teacher_shapes)
        if self.bidirectional:
            # Trained here: a submodule (in DDP, in the checkpoint), no longer a frozen teacher. A
            # teacher handed over frozen would otherwise sit in its optimizer and silently never move.
            self.teacher = teacher.requires_grad_(True)
            self._frozen_teachers = []

    # --- configuration ----------------------------------------------------------------------
    positive_options = ("temperature", "teacher_lr", "teacher_lr_scale")

    def _wants_levels(self) -> bool:
        return True

    def _resolve_levels(self, teacher: nn.Module, student: nn.Module) -> list[tuple[int, int]]:
        if not self._wants_levels():
            return []
        return check_levels(self.options.levels, teacher, student)

    @property
    def teacher_indices(self) -> list[int]:
        return [t for t, _ in self.level_pairs]

    @property
    def student_indices(self) -> list[int]:
        return [s for _, s in self.level_pairs]

    def _student_side(self) -> list[nn.Module]:
        """Modules trained with the student (besides it and its heads); subclasses add adapters."""
        return []

    def _teacher_side(self) -> list[nn.Module]:
        """Modules trained with the bidirectional teacher (besides it and its heads)."""
        return []

    # --- what the trainer needs -----------------------------------------------------------------
    def teacher_feature_indices(self) -> list[int] | None:
        return None if self.bidirectional or not self.level_pairs else self.teacher_indices

    def optimizers(self, lr: float) -> dict[str, OptimizerSpec]:
        """Student side at ``lr``; in bidirectional mode the teacher network at ``teacher_lr``.

        The teacher's heads and adapters are new modules like the student's, so they train at ``lr``
        (their own optimizer) while the already trained teacher moves at its smaller rate. In one-way
        mode the teacher's heads are probes on detached features: they sit in the student's optimizer
        because nothing else of the teacher trains.
        """
        student = [self.student, self.student_heads, *self._student_side()]
        specs = {}
        if self.bidirectional:
            specs["student"] = OptimizerSpec(_params(student), lr)
            teacher_lr = self.options.teacher_lr or lr * self.options.teacher_lr_scale
            specs["teacher"] = OptimizerSpec(_params([self.teacher]), teacher_lr)
            specs["teacher_heads"] = OptimizerSpec(_params([self.teacher_heads, *self._teacher_side()]), lr)
        else:
            specs["student"] = OptimizerSpec(_params(student + [self.teacher_heads]), lr)
        listed = [id(p) for s in specs.values() for p in s.params]
        unique = set(listed)
        missing = [n for n, p in self.named_parameters() if id(p) not in unique]
        if missing or len(listed) != len(unique):  # a subclass forgot a module: a bug, not a user error
            raise RuntimeError(f"{self.name}: optimizer groups miss {missing} or list a parameter twice")
        return specs

    def extra_eval_models(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher} if self.bidirectional else {}

    # --- one step ------------------------------------------------------------------------------
    def views(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The loaded images, then (with ``augment``) their augmented view: both networks see both."""
        view = augmented_view(images, self.options.augment)
        return (images, labels) if view is None else (torch.cat([images, view]), labels.repeat(2))

    def step(self, x: Tensor, y: Tensor, teacher_outputs: list[TeacherOutput],
             progress: float = float("inf")) -> LevelOutputs:
        """Run :meth:`views`' batch through both networks and heads; masks per level (no gradient).

        While ``progress`` (the fractional epoch) is below ``teacher_probe_epochs``, the co-trained
        teacher's features are detached before its heads (and ECKD-F's adapters) see them.
        """
        batch = x.shape[0] // (1 if self.options.augment == "none" else 2)
        s_logits, s_feats = extract(self.student, x, self.student_indices)
        t_logits, t_feats = self._teacher_forward(x, teacher_outputs)
        if self.bidirectional and progress < self.options.teacher_probe_epochs:
            t_feats = [f.detach() for f in t_feats]
        s_levels = [h(f) for h, f in zip(self.student_heads, s_feats)] + [s_logits]
        t_levels = [h(f) for h, f in zip(self.teacher_heads, t_feats)] + [t_logits]
        with torch.no_grad():
            masks = [losses.error_masks(t, s, y) for t, s in zip(t_levels, s_levels)]
        return LevelOutputs(labels=y, batch=batch, student_logits=s_levels, teacher_logits=t_levels,
                            student_feats=s_feats, teacher_feats=t_feats, masks=masks)

    def _teacher_forward(self, x: Tensor, teacher_outputs: list[TeacherOutput]) -> tuple[Tensor, list[Tensor]]:
        if self.bidirectional:
            return extract(self.teacher, x, self.teacher_indices)
        if len(teacher_outputs) != 1:
            raise ValueError(f"{self.name}: expected the frozen teacher's output, got {len(teacher_outputs)}")
        logits, feats = teacher_outputs[0].logits, list(teacher_outputs[0].features)
        if len(feats) != len(self.level_pairs):
            raise ValueError(f"{self.name}: the frozen teacher returned {len(feats)} features, expected "
                             f"{len(self.level_pairs)} (stages teacher_feature_indices())")
        if logits.shape[0] != x.shape[0]:
            raise ValueError(f"{self.name}: the frozen teacher saw {logits.shape[0]} images, the step {x.shape[0]} "
                             "(run it on views())")
        return logits.detach(), [f.detach() for f in feats]

    def common_terms(self, lv: LevelOutputs) -> dict[str, Tensor]:
        """Label CE (final + auxiliary, both sides as they train) and plain KD."""
        y = lv.labels
        terms = {"ce": F.cross_entropy(lv.student_logits[-1], y)}
        if self.level_pairs:
            terms["aux_ce"] = self.combine_levels([F.cross_entropy(z, y) for z in lv.student_logits[:-1]])
        if self.options.kd_weight > 0:
            terms["kd"] = losses.kd_loss(lv.student_logits[-1], lv.teacher_logits[-1], self.options.temperature)
        if self.bidirectional:
            terms["teacher_ce"] = F.cross_entropy(lv.teacher_logits[-1], y)
        if self.level_pairs:
            terms["teacher_aux_ce"] = self.combine_levels([F.cross_entropy(z, y) for z in lv.teacher_logits[:-1]])
        return terms

    def combine_levels(self, per_level: list[Tensor]) -> Tensor:
        """One term from its per-level values: their sum, or their mean (``level_reduction``)."""
        total = sum(per_level)
        return total / len(per_level) if self.options.level_reduction == "mean" else total

    def loss_terms(self, lv: LevelOutputs) -> dict[str, Tensor]:
        """Every loss term, unweighted and with its graph (tests take gradients of single terms)."""
        return self.common_terms(lv)

    def loss_weights(self) -> dict[str, float]:
        o = self.options
        # One-way: the teacher's heads are probes whose CE touches nothing else, so weight 1.
        return {"ce": 1.0, "aux_ce": o.aux_ce_weight, "kd": o.kd_weight, "teacher_ce": 1.0,
                "teacher_aux_ce": o.aux_ce_weight if self.bidirectional else 1.0}

    def diagnostics(self, lv: LevelOutputs) -> dict[str, Tensor]:
        """Mask fractions of the original images: final level unprefixed, level k as ``l<k>_``."""
        b = lv.batch
        out = mask_logs(losses.ErrorMasks(*(m[:b] for m in lv.masks[-1])))
        for k, masks in enumerate(lv.masks[:-1], start=1):
            out.update(mask_logs(losses.ErrorMasks(*(m[:b] for m in masks)), prefix=f"l{k}_"))
        return out

    def compute_terms(self, images: Tensor, labels: Tensor, teacher_outputs: list[TeacherOutput],
                      progress: float) -> LossTerms:
        lv = self.step(images, labels, teacher_outputs, progress)
        terms = self.loss_terms(lv)
        weights = self.loss_weights()
        return LossTerms(lv.student_logits[-1][:lv.batch], terms, {k: weights[k] for k in terms},
                         self.diagnostics(lv))


def _params(modules: list[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters()]
