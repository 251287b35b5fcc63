"""The pipeline's teacher and student, built from the config in one place for every stage.

The teacher stage builds the configured teacher (pretrained, or ``teacher.checkpoint``, maybe with a
fresh head); every later stage rebuilds it from the teacher stage's weights. The distill stage builds
the student (from ``student.checkpoint`` when given); export rebuilds it from the distilled weights.
Passing ``weights`` is how a later stage says "the architecture of the config, the weights of a
finished stage": nothing is downloaded then and the configured checkpoint is not read.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ._checkpoint import load_checkpoint
from .factory import create_model

if TYPE_CHECKING:
    from ..config import PipelineConfig

__all__ = ["TEACHER_ARCHITECTURE", "build_student", "build_teacher"]

#: the config :func:`build_teacher` reads when given a finished stage's ``weights`` (a stage that rebuilds
#: the teacher that way reads these, not the teacher's weight source or training schedule)
TEACHER_ARCHITECTURE: tuple[str, ...] = ("teacher.model", "teacher.input_size", "teacher.model_kwargs",
                                         "data.input_size")


def build_teacher(cfg: PipelineConfig, num_classes: int, weights: Path | None = None) -> nn.Module:
    """The configured teacher; with ``weights`` (the teacher stage's output) no download happens."""
    t = cfg.teacher
    model = create_model(t.model, num_classes=num_classes,
                         pretrained=t.pretrained and t.checkpoint is None and weights is None,
                         checkpoint=None if weights is not None else t.checkpoint,
                         input_size=t.input_size, data_input_size=cfg.data.input_size, role="teacher",
                         reset_head=t.reset_head and weights is None, **t.model_kwargs)
    if weights is not None:
        load_checkpoint(model, str(weights))
    return model


def build_student(cfg: PipelineConfig, num_classes: int, weights: Path | None = None) -> nn.Module:
    """The configured student: initialised (by the caller's RNG state) or from ``student.checkpoint``;
    with ``weights`` (the distill stage's output) those instead."""
    s = cfg.student
    model = create_model(s.model, num_classes=num_classes, checkpoint=s.checkpoint if weights is None else None,
                         role="student", **s.model_kwargs)
    if weights is not None:
        load_checkpoint(model, str(weights))
    return model
