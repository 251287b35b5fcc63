"""ShuffleNetV2 for CIFAR in CRD's definition (``ShuffleV2``, net size 1: 116/232/464, 1.36M params).

1x1 stride-1 stem (24 channels, no max-pool; CRD's and mdistiller's ``ShuffleV2`` use 1x1 -- their 3x3 is
commented out -- and the published ShuffleNetV2 numbers come from it: 1,355,528 params at 100 classes), three stages of one DownBlock plus (3, 7, 3)
channel-split blocks (``layer1..3`` = levels 1..3), then a 1x1 conv to 1024 channels.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._cifar_common import CifarNet, build_cifar_model, cifar_cfg
from .shufflenetv1_cifar import ChannelShuffle

__all__ = ["ShuffleNetV2Cifar"]

# CRD's configurations: stage widths + head width, blocks per stage (after the DownBlock)
_CONFIGS: dict[float, dict[str, tuple[int, ...]]] = {
    0.5: {"out_channels": (48, 96, 192, 1024), "num_blocks": (3, 7, 3)},
    1.0: {"out_channels": (116, 232, 464, 1024), "num_blocks": (3, 7, 3)},
    1.5: {"out_channels": (176, 352, 704, 1024), "num_blocks": (3, 7, 3)},
    2.0: {"out_channels": (224, 488, 976, 2048), "num_blocks": (3, 7, 3)},
}


class SplitBlock(nn.Module):
    """Half the channels pass through untouched, the other half through 1x1-dw3x3-1x1."""

    def __init__(self, chs: int) -> None:
        super().__init__()
        half = chs // 2
        self.split = half
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, : self.split], x[:, self.split:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([x1, out], 1))


class DownBlock(nn.Module):
    """Stride-2 block: both branches process the full input, outputs are concatenated."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        mid = out_chs // 2
        # left branch
        self.conv1 = nn.Conv2d(in_chs, in_chs, 3, stride=2, padding=1, groups=in_chs, bias=False)
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv2 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2Cifar(CifarNet):
    stage_names = ("layer1", "layer2", "layer3")
    final_names = ("conv2", "bn2")
    classifier_name = "linear"

    def __init__(
        self,
        net_size: float = 1.0,
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if net_size not in _CONFIGS:
            raise ValueError(f"ShuffleNetV2 net_size must be one of {sorted(_CONFIGS)}, got {net_size}")
        out_channels = _CONFIGS[net_size]["out_channels"]
        num_blocks = _CONFIGS[net_size]["num_blocks"]
        self._init_conv_bn_stem(in_chans, 24, 1)
        in_chs, reduction = 24, 1
        for i, (out_chs, n) in enumerate(zip(out_channels[:3], num_blocks), start=1):
            layers: list[nn.Module] = [DownBlock(in_chs, out_chs)]
            layers += [SplitBlock(out_chs) for _ in range(n)]
            in_chs = out_chs
            setattr(self, f"layer{i}", nn.Sequential(*layers))
            reduction *= 2
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"layer{i}"))
        self.conv2 = nn.Conv2d(in_chs, out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self._init_head(out_channels[3], num_classes, global_pool, drop_rate)

    def forward_final(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(x)))


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> ShuffleNetV2Cifar:
    return build_cifar_model(ShuffleNetV2Cifar, variant, pretrained, **kwargs)


default_cfgs = generate_default_cfgs({
    "shufflenetv2_cifar": cifar_cfg(classifier="linear"),
})


@register_model
def shufflenetv2_cifar(pretrained: bool = False, **kwargs: Any) -> ShuffleNetV2Cifar:
    """CRD's ShuffleV2 (net size 1, 1.36M params at 100 classes), the ResNet32x4 student."""
    return _create("shufflenetv2_cifar", pretrained, **dict(dict(net_size=1.0), **kwargs))
