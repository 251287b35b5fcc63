"""The pipeline's stages, in order."""
from __future__ import annotations

from ._base import RunContext, Stage, StageResult
from .distill import DistillStage
from .export import ExportStage
from .quantize import QuantizeStage
from .report import ReportStage
from .teacher import TeacherStage
from .validate import ValidateStage

STAGES: tuple[Stage, ...] = (TeacherStage(), DistillStage(), ExportStage(), QuantizeStage(), ValidateStage(),
                             ReportStage())
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)

__all__ = ["STAGES", "STAGE_NAMES", "RunContext", "Stage", "StageResult"]
