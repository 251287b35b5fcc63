"""What the methods share: final-level diagnostics, the optional KD term, and *levels*.

A level is a pair of intermediate stages of teacher and student. Auxiliary heads and adapters on
levels are sized from the features' real shapes (one dry forward pass), never hard-coded per
architecture, so any timm model with ``forward_intermediates`` (or ``feature_info`` for hooks) can
take part.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead
from torch import Tensor, nn

from .. import losses
from ..errors import UserError
from ..models.features import ResizeInput, extract, stage_count

T = TypeVar("T")


def mask_logs(masks: losses.ErrorMasks, prefix: str = "") -> dict[str, Tensor]:
    """``{prefix}trsr``... fractions (detached 0-d tensors, no host sync)."""
    return {f"{prefix}{k}": v for k, v in losses.mask_fractions(masks).items()}


def teacher_diagnostics(teacher_logits: Tensor, student_logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """The TRSR/TRSW/TWSR/TWSW fractions at the final level, which every method with a teacher logs
    so that runs of different methods can be compared on how often the student fixes or repeats the
    teacher's mistakes."""
    return mask_logs(losses.error_masks(teacher_logits, student_logits, labels))


def optional_kd(terms: dict[str, Tensor], weights: dict[str, float], logits: Tensor, teacher_logits: Tensor,
                weight: float, temperature: float) -> None:
    """Add the term ``kd`` at ``weight`` when ``weight > 0``: the optional Hinton term that the feature
    methods (FitNet, AT, FSP, ReviewKD) offer on top of their feature loss."""
    if weight > 0:
        terms["kd"] = losses.kd_loss(logits, teacher_logits, temperature)
        weights["kd"] = weight


# The ECKD thesis's student stages of the CIFAR MobileNetV2s (teacher stages are 1..n). See
# docs/methods.md §6. Keyed by exact name: timm's ImageNet mobilenetv2_* have other stages.
_THESIS_STAGES = {"mobilenetv2_x0_5_cifar": [2, 3, 5, 7], "mobilenetv2_x1_0_cifar": [2, 3, 5, 7]}


def architecture(model: nn.Module) -> str:
    """timm architecture name of a (possibly wrapped) model, e.g. 'mobilenetv2_x0_5_cifar'."""
    if isinstance(model, ResizeInput):
        model = model.model
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__).lower()


def default_stages(model: nn.Module) -> list[int]:
    """Stage indices (timm ``feature_info`` order, 0 = stem) used as levels by default."""
    n = stage_count(model)
    stages = _THESIS_STAGES.get(architecture(model))
    return [s for s in stages if s <= n] if stages else list(range(1, n + 1))


def default_levels(teacher: nn.Module, student: nn.Module) -> list[tuple[int, int]]:
    """Pair the deepest stages: e.g. ResNet-56 (1,2,3) with MobileNetV2 (3,5,7), as in the thesis."""
    t, s = default_stages(teacher), default_stages(student)
    k = min(len(t), len(s))
    return list(zip(t[len(t) - k:], s[len(s) - k:]))


def require_levels(levels: list[list[int]] | None, minimum: int = 1, example: str = "[[2, 5]]") -> None:
    """The ``levels`` option check shared by the level-based methods: null (the default pairing) or at
    least ``minimum`` pairs, named in a UserError when the config is loaded."""
    if levels is not None and len(levels) < minimum:
        raise UserError(f"levels needs at least {minimum} [teacher_stage, student_stage] pair(s), got {levels!r}",
                        where="distill.options.levels", fix=f"e.g. {example}, or null for the default pairing")


def check_levels(levels: list[list[int]] | None, teacher: nn.Module, student: nn.Module) -> list[tuple[int, int]]:
    """Configured ``[[teacher_stage, student_stage], ...]`` as tuples, or (``None``) the default pairing;
    a stage that either network lacks is a UserError naming the pair's key (before anything is built on it)."""
    if levels is None:
        return default_levels(teacher, student)
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
def dry_run(model: nn.Module, input_size: int, fn: Callable[[nn.Module, Tensor], T]) -> T:
    """``fn(model, zeros)`` on a 2-image batch, once, at build time, to learn shapes.

    Runs in eval mode so the BN running statistics never see the zero images (the mode is
    restored afterwards), on the model's own device and dtype.
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(2, 3, input_size, input_size, device=param.device, dtype=param.dtype)
        return fn(model, x)
    finally:
        model.train(was_training)


def feature_shapes(model: nn.Module, indices: list[int], input_size: int) -> list[torch.Size]:
    """Per-sample shapes ``(C, H, W)`` of the features at ``indices``."""
    feats = dry_run(model, input_size, lambda m, x: extract(m, x, indices)[1])
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
