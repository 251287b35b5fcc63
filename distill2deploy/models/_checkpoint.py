"""Checkpoint reading and strict loading: local weights fit the model exactly, or a UserError says why.

Weights come as saved by timm, torchvision's references, Lightning, DataParallel/DDP, torch.compile,
and the KD benchmark (CRD/RepDistiller and mdistiller's ``cifar_teachers/*/ckpt_epoch_240.pth``: a
dict with the state dict under ``model``); the registered ``*_cifar`` models use the benchmark's
module names, so its checkpoints load with ``strict=True`` and no renaming.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .features import ResizeInput

__all__ = ["checkpoint_option", "head_fix", "load_checkpoint", "read_state_dict"]

# Keys under which training scripts commonly nest the weights (timm, torchvision refs,
# CRD/DKD ``{'model': ...}``, Lightning-style ``state_dict``), outermost first.
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net")
# Wrapper prefixes: DataParallel/DDP, torch.compile, and our own ResizeInput.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def checkpoint_option(role: str | None) -> str:
    """The config key that gives ``role``'s local weights, for error messages."""
    return f"{role}.checkpoint" if role else "<teacher|student>.checkpoint"


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a plain ``{name: tensor}`` dict from .pth/.pt (weights only) or .safetensors."""
    p = Path(path).expanduser()
    fix = ("give a state_dict saved with torch.save(model.state_dict(), PATH) "
           "or a .safetensors file")
    if not p.is_file():
        raise UserError(f"checkpoint file not found: {p}", where="checkpoint",
                        fix="check the path (relative paths are relative to the working directory)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to parse means "not a checkpoint" to the user
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"{p} is not a readable checkpoint ({type(e).__name__}: {first})",
                        where="checkpoint", fix=fix) from e
    for _ in range(len(_CONTAINER_KEYS)):
        if _is_state_dict(obj) or not isinstance(obj, Mapping):
            break
        key = next((k for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    if not _is_state_dict(obj):
        found = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise UserError(f"{p} holds no state_dict of tensors (found: {found})", where="checkpoint",
                        fix=fix + f"; nested weights are looked up under {list(_CONTAINER_KEYS)}")
    return dict(obj)


def _strip_prefixes(sd: dict[str, torch.Tensor], target_keys: set[str]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd) and not any(k.startswith(prefix) for k in target_keys):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def _few(items: Sequence[Any], n: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def head_fix(role: str | None, trained_for: int, wanted: int) -> str:
    """How to reconcile a classifier trained for ``trained_for`` classes with data of ``wanted``: a real key or flag."""
    if role == "teacher":
        return (f"set teacher.reset_head: true (with teacher.train.epochs >= 1) to fine-tune a new {wanted}-class "
                f"head, or use data with {trained_for} classes (check data.source's labels; data.num_classes sets "
                "the count of an npz without fine_label_names)")
    if role == "student":
        return f"give student.checkpoint weights for {wanted} classes, or remove student.checkpoint"
    return f"build the model with num_classes={trained_for} (CLI: --num-classes {trained_for})"


def _head_prefix(model: nn.Module) -> str | None:
    """The state-dict prefix of the classifier (``fc.``, ``head.fc.``, ...), from timm's get_classifier."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        return None
    return next((f"{n}." for n, m in model.named_modules() if m is head and n), None)


def load_checkpoint(model: nn.Module, path: str | Path, *, role: str | None = None,
                    skip_head: bool = False) -> nn.Module:
    """Load local weights strictly; a checkpoint that does not fit is a UserError, never partial.

    ``skip_head`` loads everything but the classifier (which keeps its fresh initialisation), for
    fine-tuning on another class count; ``role`` picks the config key the error messages name.
    """
    sd = read_state_dict(path)
    target = model.model if isinstance(model, ResizeInput) else model
    own = target.state_dict()
    sd = _strip_prefixes(sd, set(own))
    if skip_head:
        prefix = _head_prefix(target)
        if prefix is None:
            raise UserError(f"{type(target).__name__} has no classifier that timm's get_classifier() names",
                            where=f"{role}.reset_head" if role else "reset_head",
                            fix="use a timm model with a classifier head, or reset_head: false")
        sd = {k: v for k, v in sd.items() if not k.startswith(prefix)}
        sd.update({k: v for k, v in own.items() if k.startswith(prefix)})
    # BN step counters are absent from some older/exported checkpoints and never affect outputs
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = v
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [(k, tuple(sd[k].shape), tuple(own[k].shape))
                  for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        if mismatched:
            parts.append("shape mismatches (checkpoint vs model): "
                         + _few([f"{k} {a} vs {b}" for k, a, b in mismatched]))
        n_model = getattr(target, "num_classes", None)
        head = [(a[0], b[0]) for _, a, b in mismatched
                if len(a) in (1, 2) and len(a) == len(b) and a[1:] == b[1:] and b[0] == n_model]
        if head and not missing and not unexpected:
            fix = (f"the checkpoint's classifier has {head[0][0]} outputs but the model has {n_model}: "
                   + head_fix(role, head[0][0], n_model))
        else:
            fix = ("check that the model name is the architecture the checkpoint was trained with "
                   "(timm.list_models('*pattern*')) and that num_classes (or --num-classes) matches it")
        arch = (getattr(target, "pretrained_cfg", None) or {}).get("architecture") or type(target).__name__
        raise UserError(f"{Path(path)} does not fit model {arch!r}: " + "; ".join(parts),
                        where="checkpoint", fix=fix)
    target.load_state_dict(sd, strict=True)
    return model
