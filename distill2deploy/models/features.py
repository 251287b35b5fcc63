"""Model-shape adapters the methods rely on, for any timm model.

:class:`ResizeInput` feeds a teacher pre-trained at 224 px the data's 32 px inside its graph;
:func:`extract` takes the logits plus stage features at the ``feature_info`` levels in one pass;
:func:`stage_count` says how many levels there are.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

__all__ = ["ResizeInput", "extract", "stage_count"]


class ResizeInput(nn.Module):
    """Bilinearly resize the input to ``size`` inside the graph, e.g. a 224-px teacher on 32-px data.

    Living inside ``forward`` means the exported ONNX model takes the data's resolution and
    the resize is part of the deployed graph. Every timm API entry point that takes images
    resizes first; those that take features (``forward_head``) and the classifier/feature
    metadata are delegated unchanged (``feature_info`` reductions are relative to the resized
    input).
    """

    def __init__(self, model: nn.Module, size: int | tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.resize(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self.resize(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.model.forward_head(x, pre_logits=pre_logits)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.model.forward_intermediates(self.resize(x), *args, **kwargs)

    def prune_intermediate_layers(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.prune_intermediate_layers(*args, **kwargs)

    def get_classifier(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.get_classifier(*args, **kwargs)

    def reset_classifier(self, *args: Any, **kwargs: Any) -> None:
        self.model.reset_classifier(*args, **kwargs)

    @property
    def feature_info(self) -> Any:
        return self.model.feature_info

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def num_features(self) -> int:
        return self.model.num_features

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return getattr(self.model, "pretrained_cfg", {})

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    def extra_repr(self) -> str:
        return f"size={self.size}"


# --- stage features -------------------------------------------------------------------------
def _feature_dicts(model: nn.Module) -> list[dict[str, Any]] | None:
    info = getattr(model, "feature_info", None)
    if info is None:
        return None
    if hasattr(info, "get_dicts"):  # timm FeatureInfo (features_only wrappers)
        return list(info.get_dicts())
    return list(info)


def stage_count(model: nn.Module) -> int:
    """Number of stages after the stem (``len(feature_info) - 1``)."""
    info = _feature_dicts(model)
    if not info:
        raise UserError(f"{type(model).__name__} has no feature_info, so its stages are unknown",
                        where="model", fix="use a timm model or one of the *_cifar models")
    return len(info) - 1


def _normalise_indices(indices: Sequence[int], n: int | None, model: nn.Module) -> list[int]:
    out = []
    for i in indices:
        if n is not None and not -n <= int(i) < n:
            raise UserError(f"feature level {i} does not exist in {type(model).__name__}",
                            where="feature indices",
                            fix=f"use levels 0..{n - 1} (0 = stem, k = stage k)")
        out.append(int(i) % n if n is not None else int(i))
    return out


def extract(model: nn.Module, x: torch.Tensor,
            indices: Sequence[int] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits plus the features at ``feature_info`` levels ``indices``, in the order asked.

    Uses ``forward_intermediates`` + ``forward_head`` (one pass); models without them fall
    back to temporary forward hooks on the modules ``feature_info`` names.
    """
    if isinstance(model, ResizeInput):
        return extract(model.model, model.resize(x), indices)
    if not indices:
        return model(x), []
    info = _feature_dicts(model)
    wanted = _normalise_indices(indices, len(info) if info else None, model)
    if hasattr(model, "forward_intermediates") and hasattr(model, "forward_head"):
        unique = sorted(set(wanted))
        final, feats = model.forward_intermediates(x, indices=unique)
        by_index = dict(zip(unique, feats))
        return model.forward_head(final), [by_index[i] for i in wanted]
    if not info:
        raise UserError(
            f"{type(model).__name__} has neither forward_intermediates nor feature_info, so its "
            "stage features cannot be taken",
            where="model", fix="use a timm model or one of the *_cifar models, or a response-based "
            "method (no feature levels)")
    names = [info[i]["module"] for i in wanted]
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in dict.fromkeys(names):
            try:
                module = model.get_submodule(name)
            except AttributeError as e:
                raise UserError(f"feature_info names a module {name!r} that {type(model).__name__} "
                                "does not have", where="model feature_info") from e

            def hook(_m: nn.Module, _i: Any, out: Any, _name: str = name) -> None:
                outputs[_name] = out[0] if isinstance(out, (tuple, list)) else out

            handles.append(module.register_forward_hook(hook))
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits, [outputs[n] for n in names]
