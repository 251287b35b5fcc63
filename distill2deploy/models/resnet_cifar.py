"""CIFAR ResNets (He et al. 2016, sec. 4.2) as used by the KD literature.

Three stages of BasicBlocks at stride 1/2/2 on a 3x3 stride-1 stem, no max-pool. The plain
variants (``resnet{20,32,44,56,110}_cifar``, widths 16/16/32/64) share their key layout with the
pytorch-cifar-models (chenyaofo) CIFAR-100 checkpoints and CRD's ``resnet*``; ``resnet8x4`` and
``resnet32x4`` are CRD's 4x-wide teachers/students (widths 32/64/128/256).
"""
from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._cifar_common import CifarNet, build_cifar_model, cifar_cfg, init_he_fan_out

__all__ = ["CifarResNet", "CifarBasicBlock"]

_CHENYAOFO = "https://github.com/chenyaofo/pytorch-cifar-models/releases/download/resnet/"


class CifarBasicBlock(nn.Module):
    """3x3-3x3 residual block; projection shortcut ``downsample`` = (1x1 conv, BN)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class CifarResNet(CifarNet):
    """ResNet-(6n+2) for 32x32 inputs; ``widths`` = (stem, stage1, stage2, stage3)."""

    stage_names = ("layer1", "layer2", "layer3")
    classifier_name = "fc"

    def __init__(
        self,
        depth: int = 56,
        widths: tuple[int, int, int, int] = (16, 16, 32, 64),
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 20, 32, ...), got {depth}")
        blocks = (depth - 2) // 6
        self._init_conv_bn_stem(in_chans, widths[0], 3)
        in_chs, reduction = widths[0], 1
        for i, (out_chs, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            layers = []
            for b in range(blocks):
                layers.append(CifarBasicBlock(in_chs, out_chs, stride if b == 0 else 1))
                in_chs = out_chs
            setattr(self, f"layer{i}", nn.Sequential(*layers))
            reduction *= stride
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"layer{i}"))
        self._init_head(in_chs, num_classes, global_pool, drop_rate)
        init_he_fan_out(self)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return build_cifar_model(CifarResNet, variant, pretrained, **kwargs)


def _chenyaofo(file: str, top1: float) -> dict[str, Any]:
    return cifar_cfg(
        url=_CHENYAOFO + file, license="bsd-3-clause",
        origin_url="https://github.com/chenyaofo/pytorch-cifar-models",
        notes=(f"CIFAR-100 top-1 {top1}% (published)",),
    )


default_cfgs = generate_default_cfgs({
    "resnet20_cifar.chenyaofo_c100": _chenyaofo("cifar100_resnet20-23dac2f1.pt", 68.83),
    "resnet32_cifar.chenyaofo_c100": _chenyaofo("cifar100_resnet32-84213ce6.pt", 70.16),
    "resnet44_cifar.chenyaofo_c100": _chenyaofo("cifar100_resnet44-ffe32858.pt", 71.63),
    "resnet56_cifar.chenyaofo_c100": _chenyaofo("cifar100_resnet56-f2eff4c8.pt", 72.63),
    "resnet110_cifar": cifar_cfg(),
    "resnet8x4_cifar": cifar_cfg(),
    "resnet32x4_cifar": cifar_cfg(),
})


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 (0.28M params at 100 classes)."""
    return _create("resnet20_cifar", pretrained, **dict(dict(depth=20), **kwargs))


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 (0.47M params)."""
    return _create("resnet32_cifar", pretrained, **dict(dict(depth=32), **kwargs))


@register_model
def resnet44_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-44 (0.67M params)."""
    return _create("resnet44_cifar", pretrained, **dict(dict(depth=44), **kwargs))


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 (0.86M params), the ResNet56 -> ResNet20 teacher."""
    return _create("resnet56_cifar", pretrained, **dict(dict(depth=56), **kwargs))


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-110 (1.73M params)."""
    return _create("resnet110_cifar", pretrained, **dict(dict(depth=110), **kwargs))


@register_model
def resnet8x4_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CRD's resnet8x4 (widths 32/64/128/256, 1.23M params)."""
    args = dict(depth=8, widths=(32, 64, 128, 256))
    return _create("resnet8x4_cifar", pretrained, **dict(args, **kwargs))


@register_model
def resnet32x4_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CRD's resnet32x4 (widths 32/64/128/256, 7.43M params), the ResNet32x4 teacher."""
    args = dict(depth=32, widths=(32, 64, 128, 256))
    return _create("resnet32x4_cifar", pretrained, **dict(args, **kwargs))
