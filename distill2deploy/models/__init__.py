"""The CIFAR-sized model zoo of the KD literature, registered in timm's own registry.

Importing this package registers ``resnet{20,32,44,56,110}_cifar``, ``resnet8x4_cifar``,
``resnet32x4_cifar``, ``wrn_16_2_cifar``, ``wrn_40_2_cifar``, ``vgg13_bn_cifar``,
``mobilenetv2_x0_5_cifar``, ``mobilenetv2_x1_0_cifar``, ``shufflenetv1_cifar`` and
``shufflenetv2_cifar`` so that ``timm.create_model(name)`` builds them like any timm model.
The pipeline builds models through :mod:`.factory` (creation and name checks), loads weights through
:mod:`._checkpoint` (strict), and builds its teacher and student through :mod:`.builders`; the methods
take stage features through :mod:`.features`.
"""
from __future__ import annotations

from . import (  # noqa: F401  (imported for their @register_model side effect)
    mobilenetv2_cifar,
    resnet_cifar,
    shufflenetv1_cifar,
    shufflenetv2_cifar,
    vgg_cifar,
    wrn_cifar,
)
from ._cifar_common import CIFAR100_MEAN, CIFAR100_STD, CifarNet
from ._checkpoint import load_checkpoint
from .factory import create_model
from .features import ResizeInput, extract, stage_count

CIFAR_MODELS: tuple[str, ...] = (
    "resnet20_cifar", "resnet32_cifar", "resnet44_cifar", "resnet56_cifar", "resnet110_cifar",
    "resnet8x4_cifar", "resnet32x4_cifar", "wrn_16_2_cifar", "wrn_40_2_cifar", "vgg13_bn_cifar",
    "mobilenetv2_x0_5_cifar", "mobilenetv2_x1_0_cifar", "shufflenetv1_cifar", "shufflenetv2_cifar",
)

__all__ = [
    "CIFAR100_MEAN", "CIFAR100_STD", "CIFAR_MODELS", "CifarNet", "ResizeInput", "create_model",
    "extract", "load_checkpoint", "stage_count",
]
