"""ShuffleNetV1 for CIFAR in CRD's definition (``ShuffleV1``: g=3, widths 240/480/960, ~0.95M params).

1x1 stem (24 channels, stride 1), three stages of grouped-conv bottlenecks whose first block
downsamples by 2 and concatenates an avg-pooled shortcut. Stages 1..3 are ``layer1..3``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._cifar_common import CifarNet, build_cifar_model, cifar_cfg

__all__ = ["ShuffleNetV1Cifar", "ChannelShuffle"]


class ChannelShuffle(nn.Module):
    """Interleave the channels of ``groups`` groups so the next grouped conv mixes them."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBottleneck(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_chs = out_chs // 4
        g = 1 if in_chs == 24 else groups  # the stem's 24 channels are not split into groups
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_chs)
        self.shuffle1 = ChannelShuffle(g)
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, 3, stride=stride, padding=1, groups=mid_chs, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1Cifar(CifarNet):
    stage_names = ("layer1", "layer2", "layer3")
    classifier_name = "linear"

    def __init__(
        self,
        out_planes: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self._init_conv_bn_stem(in_chans, 24, 1)
        in_chs, reduction = 24, 1
        for i, (out_chs, n) in enumerate(zip(out_planes, num_blocks), start=1):
            layers = []
            for b in range(n):
                # the first block concatenates its (pooled) input, so it only produces the rest
                layers.append(ShuffleBottleneck(in_chs, out_chs - in_chs if b == 0 else out_chs,
                                                stride=2 if b == 0 else 1, groups=groups))
                in_chs = out_chs
            setattr(self, f"layer{i}", nn.Sequential(*layers))
            reduction *= 2
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"layer{i}"))
        self._init_head(in_chs, num_classes, global_pool, drop_rate)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> ShuffleNetV1Cifar:
    return build_cifar_model(ShuffleNetV1Cifar, variant, pretrained, **kwargs)


default_cfgs = generate_default_cfgs({
    "shufflenetv1_cifar": cifar_cfg(classifier="linear"),
})


@register_model
def shufflenetv1_cifar(pretrained: bool = False, **kwargs: Any) -> ShuffleNetV1Cifar:
    """CRD's ShuffleV1 (g=3, 0.95M params at 100 classes), the WRN-40-2 -> ShuffleNetV1 student."""
    return _create("shufflenetv1_cifar", pretrained, **kwargs)
