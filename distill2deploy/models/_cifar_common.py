"""Shared timm-API plumbing for the CIFAR-sized networks of the KD literature.

The CRD / DKD repositories define each network with its own ad-hoc ``forward(is_feat=True)``.
Here every network is a :class:`CifarNet`: a stem, ``N`` stages and an optional "final" block
(a pre-activation norm or a 1x1 conv head) followed by global pooling and a linear classifier.
The base class turns that description into timm's model API (``forward_features``,
``forward_head``, ``forward_intermediates``, ``prune_intermediate_layers``, classifier
reset), so generic timm code and the distillation methods see one uniform interface.

Parameter names follow the original CRD definitions, so checkpoints trained with those
repositories (e.g. the DKD teacher release) load with ``strict=True``.

Feature index convention (``feature_info``): index 0 is the stem output, index ``k >= 1`` the
output of stage ``k`` -- the "levels" the ECKD thesis pairs between teacher and student.
"""
from __future__ import annotations

import math
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices
from torch import nn

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "CifarNet", "build_cifar_model", "cifar_cfg", "init_crd_weights",
           "init_he_fan_out"]

# Normalisation of the chenyaofo / CRD CIFAR-100 checkpoints (inputs scaled to [0, 1] first).
CIFAR100_MEAN = (0.5070, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2761)


def cifar_cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    """A timm pretrained cfg for a 32x32 CIFAR-100 model (no resize/crop at eval time)."""
    return {
        "url": url,
        "num_classes": 100,
        "input_size": (3, 32, 32),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR100_MEAN,
        "std": CIFAR100_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        **kwargs,
    }


def init_crd_weights(model: nn.Module) -> None:
    """The initialisation of CRD's VGG / MobileNetV2 (He-normal convs, N(0, 0.01) linear).

    Kept so that training from scratch reproduces the published baselines' setup.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def init_he_fan_out(model: nn.Module) -> None:
    """The initialisation of the CIFAR ResNet / WRN code (He-normal fan-out convs, unit BN).

    Linear layers keep PyTorch's default init, as in those repositories.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


M = TypeVar("M", bound="CifarNet")


def build_cifar_model(cls: type[M], variant: str, pretrained: bool = False, **kwargs: Any) -> M:
    """timm's ``build_model_with_cfg`` for a :class:`CifarNet`: ``features_only`` uses the
    getter over every level (stem + all stages), so ``out_indices`` follow ``feature_info``."""
    return build_model_with_cfg(
        cls, variant, pretrained,
        feature_cfg=dict(feature_cls="getter", out_indices=tuple(range(len(cls.stage_names) + 1))),
        **kwargs,
    )


class CifarNet(nn.Module):
    """Stem -> stages 1..N -> optional final block -> global pool -> linear, with timm's API.

    Subclasses set the class attributes below, build their modules, call :meth:`_init_head`
    and provide the stem: either :meth:`_init_conv_bn_stem` (the common conv-BN-ReLU stem, run by
    the default :meth:`forward_stem`) or their own modules and :meth:`forward_stem`. A final block
    needs :meth:`forward_final`. Stages are looked up by name so that the parameter names stay
    those of the original code.
    """

    #: dotted names of the stage modules, stage 1 first
    stage_names: tuple[str, ...] = ()
    #: modules applied after the last stage (removed by ``prune_intermediate_layers``)
    final_names: tuple[str, ...] = ()
    #: True when the final block is a norm(+act) that keeps the channel count, so
    #: ``forward_intermediates(norm=True)`` may apply it to the last stage's output
    final_is_norm: bool = False
    #: module path of the linear classifier, as the published code names it (fc, linear, classifier;
    #: MobileNetV2's ``classifier.0``: its Linear sits in an ``nn.Sequential``), so checkpoint keys match
    classifier_name: str = "fc"

    feature_info: list[dict[str, Any]]

    def _init_head(self, num_features: int, num_classes: int, global_pool: str = "avg",
                   drop_rate: float = 0.0) -> None:
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = num_features
        self.drop_rate = drop_rate
        self.global_pool, fc = create_classifier(num_features, num_classes, pool_type=global_pool)
        self._set_classifier(fc)
        # number of stages still present (prune_intermediate_layers lowers it) and whether the
        # final block still runs; plain attributes, not buffers, so state_dicts stay unchanged
        self._num_stages = len(self.stage_names)
        self._has_final = bool(self.final_names)

    def _init_conv_bn_stem(self, in_chans: int, out_chs: int, kernel_size: int) -> None:
        """Stride-1 ``conv1 -> bn1 -> act1`` (ResNet, ShuffleNets) and its ``feature_info`` entry."""
        self.conv1 = nn.Conv2d(in_chans, out_chs, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=out_chs, reduction=1, module="act1")]

    # --- pieces the subclasses provide ---------------------------------------------------
    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """The stem of :meth:`_init_conv_bn_stem`; networks with another stem override this."""
        return self.act1(self.bn1(self.conv1(x)))

    def forward_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Run stage ``index`` (1-based, as in ``feature_info``)."""
        return self.get_submodule(self.stage_names[index - 1])(x)

    def forward_final(self, x: torch.Tensor) -> torch.Tensor:
        return x

    # --- timm model API --------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for idx in range(1, self._num_stages + 1):
            x = self.forward_stage(idx, x)
        if self._has_final:
            x = self.forward_final(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> str | nn.Module:
        return self.classifier_name if name_only else self.get_submodule(self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        ref = next(self.parameters(), None)
        self.global_pool, fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool,
            device=ref.device if ref is not None else None,
            dtype=ref.dtype if ref is not None else None,
        )
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        fc.train(self.training)
        self._set_classifier(fc)

    def _set_classifier(self, fc: nn.Module) -> None:
        """Put ``fc`` at :attr:`classifier_name`, creating the ``nn.Sequential`` of a dotted path."""
        parent, _, leaf = self.classifier_name.rpartition(".")
        if parent and not hasattr(self, parent):
            setattr(self, parent, nn.Sequential())
        setattr(self.get_submodule(parent) if parent else self, leaf, fc)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's intermediate-feature API; index 0 is the stem, k >= 1 stage k.

        ``norm=True`` applies the final norm to the last stage's feature where the network
        has one (pre-activation WRN); conv heads change the width and are never applied.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        num_stages = len(self.stage_names)
        take_indices, max_index = feature_take_indices(num_stages + 1, indices)
        intermediates: list[torch.Tensor] = []
        x = self.forward_stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        last = min(self._num_stages, max_index) if stop_early else self._num_stages
        final_x = None
        for idx in range(1, last + 1):
            x = self.forward_stage(idx, x)
            if idx in take_indices:
                if norm and self.final_is_norm and self._has_final and idx == num_stages:
                    final_x = self.forward_final(x)
                    intermediates.append(final_x)
                else:
                    intermediates.append(x)
        if intermediates_only:
            return intermediates
        if self._has_final and last == num_stages:
            x = final_x if final_x is not None else self.forward_final(x)
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages (and head) that the requested intermediates do not need."""
        num_stages = len(self.stage_names)
        take_indices, max_index = feature_take_indices(num_stages + 1, indices)
        for name in self.stage_names[max_index:]:
            self.set_submodule(name, nn.Identity())
        self._num_stages = max_index
        prune_end = max_index < num_stages or prune_norm or (prune_head and not self.final_is_norm)
        if prune_end and self._has_final:
            for name in self.final_names:
                self.set_submodule(name, nn.Identity())
            self._has_final = False
        if prune_end:
            # features now end at the last kept tap; the head is sized for them, so it goes too
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices
