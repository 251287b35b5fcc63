"""CIFAR VGG in CRD's definition: five conv blocks (``block0`` = stem) split by 2x2 max-pools.

Stage k (k = 1..4) is max-pool then ``block{k}``; there is no pool between blocks 3 and 4, so
the 32x32 input ends at 4x4 before global pooling and a single linear classifier. CRD's
optional extra pool for 64x64 inputs is left out so that ``feature_info`` reductions hold for
any input size.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._cifar_common import CifarNet, build_cifar_model, cifar_cfg, init_crd_weights

__all__ = ["VGGCifar"]

# conv widths per block (block0 is the stem)
_CFGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _make_block(widths: list[int], in_chs: int, batch_norm: bool) -> nn.Sequential:
    # CRD drops the block's last ReLU and applies F.relu outside; keeping the (parameter-free)
    # ReLU inside at the end gives the same parameter indices and a post-ReLU module output.
    layers: list[nn.Module] = []
    for out_chs in widths:
        layers.append(nn.Conv2d(in_chs, out_chs, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_chs))
        layers.append(nn.ReLU(inplace=True))
        in_chs = out_chs
    return nn.Sequential(*layers)


class VGGCifar(CifarNet):
    stage_names = ("block1", "block2", "block3", "block4")
    classifier_name = "classifier"

    def __init__(
        self,
        cfg: str = "vgg13",
        batch_norm: bool = True,
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if cfg not in _CFGS:
            raise ValueError(f"VGG cfg must be one of {sorted(_CFGS)}, got {cfg!r}")
        blocks = _CFGS[cfg]
        self.block0 = _make_block(blocks[0], in_chans, batch_norm)
        self.feature_info = [dict(num_chs=blocks[0][-1], reduction=1, module="block0")]
        reduction = 1
        for i in range(1, 5):
            setattr(self, f"block{i}", _make_block(blocks[i], blocks[i - 1][-1], batch_norm))
            reduction *= 2 if i < 4 else 1
            self.feature_info.append(dict(num_chs=blocks[i][-1], reduction=reduction, module=f"block{i}"))
        # pool{k} precedes block{k+1}; pool3 is the identity at CIFAR resolution (see module doc)
        self.pool0 = nn.MaxPool2d(2, 2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self._init_head(blocks[4][-1], num_classes, global_pool, drop_rate)
        init_crd_weights(self)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.block0(x)

    def forward_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index < 4:
            x = getattr(self, f"pool{index - 1}")(x)
        return getattr(self, f"block{index}")(x)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> VGGCifar:
    return build_cifar_model(VGGCifar, variant, pretrained, **kwargs)


default_cfgs = generate_default_cfgs({
    "vgg13_bn_cifar": cifar_cfg(first_conv="block0.0", classifier="classifier"),
})


@register_model
def vgg13_bn_cifar(pretrained: bool = False, **kwargs: Any) -> VGGCifar:
    """VGG-13 with BN (9.46M params at 100 classes), the VGG13 -> MobileNetV2 teacher."""
    return _create("vgg13_bn_cifar", pretrained, **dict(dict(cfg="vgg13", batch_norm=True), **kwargs))
