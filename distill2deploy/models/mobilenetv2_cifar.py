"""MobileNetV2 for CIFAR in CRD's definition (``mobilenetv2_T_w``), the KD benchmark's student.

The benchmark's "MobileNetV2" is CRD's ``mobile_half``: width 0.5, expansion 6, ~0.81M params
at 100 classes (``mobilenetv2_x0_5_cifar``). The stem is a stride-2 3x3 conv (32 -> 16 px) and
the seven inverted-residual stages (t, c, n, s) of the paper are ``blocks.0..6`` = feature
levels 1..7; the 1x1 conv to 1280 channels is the head conv applied in ``forward_features``.
ReLU (not ReLU6), as in CRD.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._cifar_common import CifarNet, build_cifar_model, cifar_cfg, init_crd_weights

__all__ = ["MobileNetV2Cifar"]


def _conv_bn_relu(in_chs: int, out_chs: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> linear 1x1, residual when shapes match (keys ``conv.0..7``)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_chs * expand_ratio
        self.use_res_connect = stride == 1 and in_chs == out_chs
        self.conv = nn.Sequential(
            nn.Conv2d(in_chs, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_chs, 1, bias=False),
            nn.BatchNorm2d(out_chs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2Cifar(CifarNet):
    stage_names = tuple(f"blocks.{i}" for i in range(7))
    final_names = ("conv2",)
    classifier_name = "classifier.0"  # CRD: nn.Sequential(nn.Linear(...)), so checkpoints hold classifier.0.*

    def __init__(
        self,
        width_mult: float = 0.5,
        expand_ratio: int = 6,
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        setting = [  # t, c, n, s
            [1, 16, 1, 1],
            [expand_ratio, 24, 2, 1],
            [expand_ratio, 32, 3, 2],
            [expand_ratio, 64, 4, 2],
            [expand_ratio, 96, 3, 1],
            [expand_ratio, 160, 3, 2],
            [expand_ratio, 320, 1, 1],
        ]
        in_chs = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_chans, in_chs, 3, stride=2)
        reduction = 2
        self.feature_info = [dict(num_chs=in_chs, reduction=reduction, module="conv1")]
        self.blocks = nn.ModuleList()
        for i, (t, c, n, s) in enumerate(setting):
            out_chs = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(in_chs, out_chs, stride, t))
                in_chs = out_chs
            self.blocks.append(nn.Sequential(*layers))
            reduction *= s
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"blocks.{i}"))
        # CRD: 1280 unless widened (then rounded up to a multiple of 8)
        last_chs = 1280 if width_mult <= 1.0 else math.ceil(1280 * width_mult / 8) * 8
        self.conv2 = _conv_bn_relu(in_chs, last_chs, 1)
        self._init_head(last_chs, num_classes, global_pool, drop_rate)
        init_crd_weights(self)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)

    def forward_final(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(x)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> MobileNetV2Cifar:
    return build_cifar_model(MobileNetV2Cifar, variant, pretrained, **kwargs)


default_cfgs = generate_default_cfgs({
    "mobilenetv2_x0_5_cifar": cifar_cfg(first_conv="conv1.0", classifier="classifier.0"),
    "mobilenetv2_x1_0_cifar": cifar_cfg(first_conv="conv1.0", classifier="classifier.0"),
})


@register_model
def mobilenetv2_x0_5_cifar(pretrained: bool = False, **kwargs: Any) -> MobileNetV2Cifar:
    """CRD's ``mobile_half`` (width 0.5, t=6, 0.81M params): the benchmark's MobileNetV2."""
    args = dict(width_mult=0.5, expand_ratio=6)
    return _create("mobilenetv2_x0_5_cifar", pretrained, **dict(args, **kwargs))


@register_model
def mobilenetv2_x1_0_cifar(pretrained: bool = False, **kwargs: Any) -> MobileNetV2Cifar:
    """CRD's ``mobilenetv2_T_w(6, 1.0)`` (2.35M params)."""
    args = dict(width_mult=1.0, expand_ratio=6)
    return _create("mobilenetv2_x1_0_cifar", pretrained, **dict(args, **kwargs))
