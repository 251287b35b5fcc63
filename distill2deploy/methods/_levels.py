"""Levels: paired intermediate stages of teacher and student, and the small modules built on them.

Auxiliary heads and adapters are sized from the features' real shapes (one dry forward pass),
never hard-coded per architecture, so any timm model with ``forward_intermediates`` (or
``feature_info`` for hooks) can take part.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead
from torch import nn

from ..errors import UserError
from ..models.factory import ResizeInput, extract, stage_count

# The ECKD thesis's student stages per family (teacher stages are 1..n). See docs/methods.md.
_STUDENT_STAGES = {"mobilenetv2": [2, 3, 5, 7]}


def architecture(model: nn.Module) -> str:
    """timm architecture name of a (possibly wrapped) model, e.g. 'mobilenetv2_x0_5_cifar'."""
    if isinstance(model, ResizeInput):
        model = model.model
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__).lower()


def default_stages(model: nn.Module) -> list[int]:
    """Stage indices (timm ``feature_info`` order, 0 = stem) used as levels by default."""
    arch = architecture(model)
    for family, stages in _STUDENT_STAGES.items():
        if arch.startswith(family):
            return [s for s in stages if s <= stage_count(model)]
    return list(range(1, stage_count(model) + 1))


def default_levels(teacher: nn.Module, student: nn.Module) -> list[tuple[int, int]]:
    """Pair the deepest stages: e.g. ResNet-56 (1,2,3) with MobileNetV2 (3,5,7), as in the thesis."""
    t, s = default_stages(teacher), default_stages(student)
    k = min(len(t), len(s))
    return list(zip(t[len(t) - k:], s[len(s) - k:]))


def check_levels(levels: list[list[int]], teacher: nn.Module, student: nn.Module) -> list[tuple[int, int]]:
    nt, ns = stage_count(teacher), stage_count(student)
    out = []
    for i, pair in enumerate(levels):
        if len(pair) != 2 or not (0 <= pair[0] <= nt) or not (0 <= pair[1] <= ns):
            raise UserError(f"level {pair} is not a [teacher_stage, student_stage] pair within the networks",
                            where=f"distill.options.levels[{i}]",
                            fix=f"teacher stages are 0..{nt}, student stages 0..{ns} (0 = stem); "
                            f"default pairing: {default_levels(teacher, student)}")
        out.append((int(pair[0]), int(pair[1])))
    return out


@torch.no_grad()
def feature_shapes(model: nn.Module, indices: list[int], input_size: int) -> list[torch.Size]:
    """Per-sample shapes ``(C, H, W)`` of the features at ``indices`` (one dry run, mode restored)."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(2, 3, input_size, input_size, device=param.device, dtype=param.dtype)
        _, feats = extract(model, x, indices)
    finally:
        model.train(was_training)
    return [f.shape[1:] for f in feats]


def aux_head(channels: int, num_classes: int) -> nn.Module:
    """An auxiliary classifier (global average pool + linear), timm's own head."""
    return ClassifierHead(channels, num_classes, pool_type="avg")


def adapter(in_channels: int, out_channels: int) -> nn.Module:
    """1x1 conv + BN mapping one network's feature to the other's width (FitNet/ECKD-F)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))


def match_size(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a feature map spatially to ``size`` (pool down, interpolate up)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
