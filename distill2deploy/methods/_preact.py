"""Stage features *before* their final ReLU, as the KD benchmark code's ``preact=True`` returns them.

The CRD/ReviewKD CIFAR networks return, per stage, the sum ``bn2(conv2(x)) + shortcut`` of its last
block before the block's final ReLU; timm's ``forward_intermediates`` returns the stage output after
it, which has lost every negative value. This module finds, once per network and stage, the ReLU
module whose last call produces the stage feature, and at run time records that call's input with a
forward pre-hook (cloned: the ReLUs are in-place). Where no ReLU produces the feature (a stage that
ends in a linear bottleneck, a pre-activation WRN block) the feature already is pre-activation and
is kept as returned.
"""
from __future__ import annotations

from typing import Any

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.features import ResizeInput, extract


def _stage_module(model: nn.Module, index: int) -> nn.Module:
    info = model.feature_info
    dicts = list(info.get_dicts()) if hasattr(info, "get_dicts") else list(info)
    return model.get_submodule(dicts[index]["module"])


class PreActivation:
    """``(logits, features)`` of ``model`` at ``indices`` with the positions flagged in ``preact`` taken
    before their stage's final ReLU. Decided once, on random images, at construction."""

    def __init__(self, model: nn.Module, indices: list[int], preact: list[bool], input_size: int) -> None:
        self.indices = list(indices)
        inner = model.model if isinstance(model, ResizeInput) else model
        #: position in ``indices`` -> the ReLU whose last call's input is that feature's pre-activation
        self.relus: dict[int, nn.ReLU] = {}
        candidates: dict[int, nn.ReLU] = {}
        for pos, (index, wanted) in enumerate(zip(indices, preact)):
            relus = [m for m in _stage_module(inner, index).modules() if isinstance(m, nn.ReLU)] if wanted else []
            if relus:
                candidates[pos] = relus
        self._warn_kept = [index for index, wanted in zip(indices, preact) if wanted]
        if not candidates:
            self._warn(model)
            return
        was_training = model.training
        model.eval()
        try:
            param = next(model.parameters())
            g = torch.Generator(device=param.device).manual_seed(0)  # not the global RNG: runs must repeat
            x = torch.randn(2, 3, input_size, input_size, generator=g, device=param.device, dtype=param.dtype)
            last: dict[int, nn.ReLU] = {}
            order: list[nn.ReLU] = []
            handles = [r.register_forward_pre_hook(lambda m, _i: order.append(m))
                       for rs in candidates.values() for r in rs]
            with torch.no_grad():
                try:
                    _, feats = extract(model, x, self.indices)
                finally:
                    for h in handles:
                        h.remove()
                for pos, relus in candidates.items():
                    calls = [m for m in order if any(m is r for r in relus)]
                    if calls:
                        last[pos] = calls[-1]
                captured = self._capture(model, x, last)[1]
            for pos, relu in last.items():
                if torch.equal(F.relu(captured[pos]), feats[pos]):
                    self.relus[pos] = relu
        finally:
            model.train(was_training)
        self._warn_kept = [index for pos, (index, wanted) in enumerate(zip(indices, preact))
                           if wanted and pos not in self.relus]
        self._warn(model)

    def _warn(self, model: nn.Module) -> None:
        """Say where a requested pre-activation feature is the stage output as returned: no ``nn.ReLU``
        module ends that stage (a functional ReLU, a linear bottleneck, a pre-activation block)."""
        if self._warn_kept:
            name = type(model.model if isinstance(model, ResizeInput) else model).__name__
            warnings.warn(f"teacher_features: preact: {name} stage(s) {self._warn_kept} have no ReLU module that "
                          "ends them; their features are used as the network returns them", UserWarning,
                          stacklevel=3)

    def _capture(self, model: nn.Module, x: Tensor, relus: dict[int, nn.ReLU]) -> tuple[Tensor, list[Tensor]]:
        inputs: dict[int, Tensor] = {}

        def hook(pos: int) -> Any:
            def record(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
                inputs[pos] = args[0].clone()  # the in-place ReLU overwrites its input
            return record

        handles = [relu.register_forward_pre_hook(hook(pos)) for pos, relu in relus.items()]
        try:
            logits, feats = extract(model, x, self.indices)
        finally:
            for h in handles:
                h.remove()
        return logits, [inputs.get(pos, f) for pos, f in enumerate(feats)]

    def __call__(self, model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self._capture(model, x, self.relus)
