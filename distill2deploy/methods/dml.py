"""DML, deep mutual learning (Zhang et al., CVPR 2018; docs/methods.md §3).

Two or more networks learn together from scratch: each minimises its own CE plus the mean
KL(p_other || p_self) to the others, the others detached. The student is one of them and the only
one exported; the peers are registered submodules (trained, checkpointed, in DDP) with their own
optimizer entries, and their test accuracy is logged through :meth:`extra_eval_models`.

``peers: [teacher]`` makes the teacher stage's network a trainable peer initialised from its
weights: the same two networks as bidirectional ECKD (student + trainable ResNet-56), which is the
fair throughput and accuracy comparison for it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import timm
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses
from .._schema import doc
from ..errors import UserError
from ..models.factory import create_model
from ._base import DistillMethod, LossTerms, OptimizerSpec, TeacherOutput
from ._levels import architecture, teacher_diagnostics
from ._registry import register_method

TEACHER = "teacher"


@dataclass
class DMLOptions:
    peers: list[str] = doc([], "extra peer networks trained with the student: timm model names, or 'teacher' for "
                           "the teacher stage's network (trainable, starts from its weights); [] means one "
                           "from-scratch copy of the student's architecture (classic DML)")
    temperature: float = doc(1.0, "softmax temperature of the mutual KL terms (DML uses 1)")
    ce_weight: float = doc(1.0, "weight of each network's label cross-entropy")
    kd_weight: float = doc(1.0, "weight of each network's mutual KL term")


def _fresh_copy(student: nn.Module, num_classes: int, role: str) -> nn.Module:
    """A new, independently initialised network of the student's architecture.

    Built through timm when the architecture is registered (the model's own init scheme, unlike
    ``reset_parameters``); otherwise a deep copy re-initialised module by module. A plain deep copy
    would start both networks identical, which removes the diversity DML learns from.
    """
    arch = architecture(student)
    if timm.is_model(arch):
        return create_model(arch, num_classes=num_classes, role=role)
    peer = copy.deepcopy(student)
    for m in peer.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return peer


@register_method
class DML(DistillMethod):
    name = "dml"
    Options = DMLOptions
    uses_teacher = False  # per instance: true when the options list 'teacher' (see needs_teacher)

    @classmethod
    def check_options(cls, options: Any) -> None:
        super().check_options(options)
        if options.peers.count(TEACHER) > 1:
            raise UserError("'teacher' is listed more than once; there is one teacher network",
                            where="distill.options.peers", fix="list 'teacher' at most once")
        for i, name in enumerate(options.peers):
            if not name.strip():
                raise UserError("empty peer name", where=f"distill.options.peers[{i}]",
                                fix="give a timm model name (e.g. resnet20_cifar) or 'teacher'")

    @classmethod
    def needs_teacher(cls, options: Any) -> bool:
        return TEACHER in options.peers

    def __init__(self, student: nn.Module, teachers: list[nn.Module], options: DMLOptions, *, num_classes: int,
                 input_size: int) -> None:
        # The teacher, when it is a peer, is trained here: never a frozen teacher of the trainer.
        super().__init__(student, [], options, num_classes=num_classes, input_size=input_size)
        self.uses_teacher = self.needs_teacher(options)
        if self.uses_teacher and not teachers:
            raise ValueError("DML with a 'teacher' peer needs the teacher network (needs_teacher() was true)")
        specs = options.peers or [architecture(student)]
        self.peers = nn.ModuleDict()
        for i, spec in enumerate(specs):
            role = f"distill.options.peers[{i}]"
            if spec == TEACHER:
                self.peers[TEACHER] = teachers[0].train().requires_grad_(True)
            elif options.peers:
                self.peers[f"peer{i}"] = create_model(spec, num_classes=num_classes, role=role)
            else:
                self.peers["peer0"] = _fresh_copy(student, num_classes, role)

    def optimizers(self, lr: float) -> dict[str, OptimizerSpec]:
        specs = {"student": OptimizerSpec(list(self.student.parameters()), lr)}
        for name, peer in self.peers.items():
            specs[name] = OptimizerSpec(list(peer.parameters()), lr)
        return specs

    def extra_eval_models(self) -> dict[str, nn.Module]:
        return dict(self.peers.items())

    def compute_terms(self, images: Tensor, labels: Tensor, teacher_outputs: list[TeacherOutput],
                      progress: float) -> LossTerms:
        o: DMLOptions = self.options
        names = ["student", *self.peers.keys()]
        outputs = [self.student(images), *(peer(images) for peer in self.peers.values())]
        terms: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        for i, (name, logits) in enumerate(zip(names, outputs)):
            prefix = "" if name == "student" else f"{name}_"
            terms[f"{prefix}ce"] = F.cross_entropy(logits, labels)
            terms[f"{prefix}dml"] = losses.dml_loss(logits, [p for j, p in enumerate(outputs) if j != i],
                                                    o.temperature)
            weights.update({f"{prefix}ce": o.ce_weight, f"{prefix}dml": o.kd_weight})
        # Diagnostics: the first peer plays the teacher's part in the right/wrong fractions.
        return LossTerms(outputs[0], terms, weights, teacher_diagnostics(outputs[1], outputs[0], labels))
