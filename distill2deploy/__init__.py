"""distill2deploy: distil a timm classifier into a small student and ship it as (INT8) ONNX.

Importing the package registers the CIFAR-sized architectures (``*_cifar``) in timm's own
registry, so ``timm.create_model("resnet56_cifar")`` works in user code.
"""
from __future__ import annotations

from . import models  # noqa: F401  (registers the *_cifar models with timm)

__version__ = "0.1.0"
