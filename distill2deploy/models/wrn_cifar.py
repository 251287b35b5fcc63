"""Wide ResNets (Zagoruyko & Komodakis 2016) in CRD's definition: WRN-d-k, pre-activation blocks.

Stages are ``block1..block3`` (widths 16k/32k/64k at stride 1/2/2); the trailing BN+ReLU is the
model's final norm, so ``forward_intermediates(norm=True)`` applies it to stage 3's feature.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._cifar_common import CifarNet, build_cifar_model, cifar_cfg, init_he_fan_out

__all__ = ["WideResNetCifar"]


class WideBasicBlock(nn.Module):
    """Pre-activation 3x3-3x3 block; 1x1 ``convShortcut`` when the width or stride changes."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_chs == out_chs and stride == 1
        self.convShortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        # as in the original: a projection shortcut sees the activated input, identity the raw one
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class NetworkBlock(nn.Module):
    """A stage; the extra ``layer`` level keeps CRD's parameter names (``block1.layer.0...``)."""

    def __init__(self, num_blocks: int, in_chs: int, out_chs: int, stride: int,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasicBlock(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1, drop_rate)
            for i in range(num_blocks)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNetCifar(CifarNet):
    """WRN-depth-widen for 32x32 inputs (depth = 6n+4)."""

    stage_names = ("block1", "block2", "block3")
    final_names = ("bn1",)
    final_is_norm = True
    classifier_name = "fc"

    def __init__(
        self,
        depth: int = 40,
        widen_factor: int = 2,
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        block_drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="conv1")]
        reduction = 1
        for i, stride in enumerate((1, 2, 2), start=1):
            setattr(self, f"block{i}", NetworkBlock(n, widths[i - 1], widths[i], stride, block_drop_rate))
            reduction *= stride
            self.feature_info.append(dict(num_chs=widths[i], reduction=reduction, module=f"block{i}"))
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self._init_head(widths[3], num_classes, global_pool, drop_rate)
        init_he_fan_out(self)
        for m in self.modules():  # CRD's WRN also zeroes the classifier bias
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)

    def forward_final(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(x))


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> WideResNetCifar:
    return build_cifar_model(WideResNetCifar, variant, pretrained, **kwargs)


default_cfgs = generate_default_cfgs({
    "wrn_16_2_cifar": cifar_cfg(),
    "wrn_40_2_cifar": cifar_cfg(),
})


@register_model
def wrn_16_2_cifar(pretrained: bool = False, **kwargs: Any) -> WideResNetCifar:
    """WRN-16-2 (0.70M params), the WRN-40-2 -> WRN-16-2 student."""
    return _create("wrn_16_2_cifar", pretrained, **dict(dict(depth=16, widen_factor=2), **kwargs))


@register_model
def wrn_40_2_cifar(pretrained: bool = False, **kwargs: Any) -> WideResNetCifar:
    """WRN-40-2 (2.26M params), teacher of WRN-16-2 and ShuffleNetV1."""
    return _create("wrn_40_2_cifar", pretrained, **dict(dict(depth=40, widen_factor=2), **kwargs))
