"""The method registry: ``distill.method`` names a class registered here.

Adding a method is one new file in this package that defines a :class:`DistillMethod` subclass
decorated with :func:`register_method`, plus its import below.
"""
from __future__ import annotations

from ._base import DistillMethod, OptimizerSpec, StepOutput, TeacherOutput
from ._registry import get_method, list_methods, register_method

# Importing the method modules registers them.
from . import ce, kd, eckd_f, eckd_r, kd_ec, dkd, dml, fitnet, at, fsp, reviewkd, multi_teacher  # noqa: E402,F401

__all__ = ["DistillMethod", "OptimizerSpec", "StepOutput", "TeacherOutput", "get_method", "list_methods",
           "register_method"]
