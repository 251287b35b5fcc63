"""The one way the pipeline builds models: ``timm.create_model`` plus user-facing checks.

Everything a user can get wrong when naming a teacher or student -- an unknown model name,
``pretrained`` where no weights exist, no internet for the download, a checkpoint of another
architecture or class count -- becomes a :class:`~distill2deploy.errors.UserError` that says
what to change, instead of a deep timm/torch traceback or (worse) silently random weights.

It also owns the two model-shape adapters the methods rely on: :class:`ResizeInput` (a teacher
pre-trained at 224 px fed 32 px data) and :func:`extract` (logits plus stage features at the
``feature_info`` levels, for any timm model).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg, parse_model_name, split_model_name_tag
from torch import nn

from ..errors import UserError, suggest

__all__ = ["ResizeInput", "create_model", "extract", "load_checkpoint", "read_state_dict", "stage_count"]

# Keys under which training scripts commonly nest the weights (timm, torchvision refs,
# CRD/DKD ``{'model': ...}``, Lightning-style ``state_dict``), outermost first.
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net")
# Wrapper prefixes: DataParallel/DDP, torch.compile, and our own ResizeInput.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def _download_errors() -> tuple[type[BaseException], ...]:
    # URLError, HTTPError, socket errors, hub LocalEntryNotFound/HfHubHTTPError are OSErrors;
    # EntryNotFoundError is not.
    errors: list[type[BaseException]] = [OSError]
    try:
        from huggingface_hub.errors import EntryNotFoundError
        errors.append(EntryNotFoundError)
    except ImportError:  # pragma: no cover - huggingface_hub is a timm dependency
        pass
    return tuple(errors)


def _checkpoint_key(role: str | None) -> str:
    return f"{role}.checkpoint" if role else "<teacher|student>.checkpoint"


def check_model_name(name: str, where: str = "model name") -> None:
    """Unknown architecture or pretrained tag -> UserError with close matches (checked before any work)."""
    source, model_id = parse_model_name(name)
    if source:  # hf-hub:/local-dir: names are resolved (and validated) by timm itself
        return
    arch, tag = split_model_name_tag(model_id)
    if not timm.is_model(arch):
        hint = suggest(arch, timm.list_models())
        raise UserError(
            f"unknown model {name!r}",
            where=where,
            fix=(hint + " " if hint else "")
            + "list the available names with timm.list_models('*pattern*'), "
            "e.g. timm.list_models('*_cifar') for the CIFAR-sized models",
        )
    if tag:
        tags = sorted(t for t in (split_model_name_tag(k)[1] for k in get_arch_pretrained_cfgs(arch)) if t)
        if tag not in tags:
            raise UserError(
                f"model {arch!r} has no pretrained tag {tag!r}",
                where=where,
                fix=(f"use one of {', '.join(repr(f'{arch}.{t}') for t in tags)}"
                     if tags else f"use {arch!r} without a tag"),
            )


def has_pretrained(name: str) -> bool:
    """Whether timm has weights registered for ``name`` (hub names ``hf-hub:...`` are assumed to)."""
    if parse_model_name(name)[0]:
        return True
    cfg = get_pretrained_cfg(name)
    return cfg is not None and bool(cfg.has_weights)


def _check_pretrained_exists(name: str, role: str | None) -> None:
    if not has_pretrained(name):
        arch = split_model_name_tag(name)[0]
        others = timm.list_pretrained(f"{arch}.*")
        raise UserError(
            f"no pretrained weights are registered for {name!r}",
            where="pretrained",
            fix=(f"set pretrained: false, give local weights with {_checkpoint_key(role)}: PATH"
                 + (f", or use one of {others}" if others else "")
                 + "; models with weights: timm.list_pretrained('*pattern*')"),
        )


def create_model(
    name: str,
    *,
    num_classes: int,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    input_size: int | None = None,
    data_input_size: int = 32,
    role: str | None = None,
    reset_head: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build ``name`` with timm, load weights, adapt the input size.

    Args:
        name: any timm model name (``arch`` or ``arch.tag``), including the ``*_cifar`` zoo.
        num_classes: classifier width; when it differs from the pretrained head, timm
            re-initialises the head (fine-tuning).
        pretrained: download the registered weights (timm's cache is used when present).
        checkpoint: local weights (.pth/.pt/.safetensors) loaded strictly after building;
            takes precedence over ``pretrained`` (no download is attempted).
        input_size: the resolution the model should see; when it differs from
            ``data_input_size`` the model is wrapped in :class:`ResizeInput`.
        data_input_size: the resolution of the data the pipeline feeds.
        role: the config section (``teacher``/``student``) named in error messages.
        reset_head: keep the classifier of the pretrained weights or checkpoint out of the load
            (it is re-initialised for ``num_classes``); without it a pretrained head of another
            class count is an error instead of a silently random classifier.
        **kwargs: passed through to ``timm.create_model`` (``drop_rate``, ``in_chans``, ...).
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}",
                        where=f"{role}.num_classes" if role else "num_classes",
                        fix="set num_classes to the number of classes of the dataset (100 for CIFAR-100)")
    if input_size is not None and (not isinstance(input_size, int) or input_size < 1):
        raise UserError(f"input_size must be a positive integer, got {input_size!r}",
                        where=f"{role}.input_size" if role else "input_size",
                        fix="set input_size to the resolution the model expects, e.g. 224, or remove it")
    check_model_name(name, f"{role}.model" if role else "model name")
    download = bool(pretrained) and checkpoint is None
    if download:
        _check_pretrained_exists(name, role)
        trained_for = getattr(get_pretrained_cfg(name), "num_classes", None) if not parse_model_name(name)[0] else None
        if trained_for and trained_for != num_classes and not reset_head:
            raise UserError(f"the pretrained weights of {name!r} have a {trained_for}-class head but the data has "
                            f"{num_classes} classes", where=f"{role}.pretrained" if role else "pretrained",
                            fix=_head_fix(role, trained_for, num_classes))
    try:
        model = timm.create_model(name, pretrained=download, num_classes=num_classes, **kwargs)
    except _download_errors() as e:
        if not download:
            raise
        url = getattr(get_pretrained_cfg(name), "url", None) if not parse_model_name(name)[0] else None
        raise UserError(
            f"could not download the pretrained weights of {name!r} ({type(e).__name__}: {e})",
            where=role or "pretrained",
            fix=f"set {_checkpoint_key(role)}: PATH to local weights (.pth/.pt/.safetensors)"
            + (f" -- e.g. fetch {url} on a machine with internet" if url else "")
            + ", or set pretrained: false",
        ) from e
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise UserError(f"model {name!r} does not accept an option: {e}",
                        where=role or "model options",
                        fix=f"remove or rename it; the options given were {sorted(kwargs)}") from e
    except ValueError as e:  # e.g. depth=7 for a 6n+2 ResNet: the constructor names the valid values
        if not kwargs:
            raise
        raise UserError(f"model {name!r} rejected its options {kwargs}: {e}",
                        where=f"{role}.model_kwargs" if role else "model options",
                        fix="change the value the message names, or remove the option") from e
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, role=role, skip_head=reset_head)
    if input_size is not None and input_size != data_input_size:
        model = ResizeInput(model, input_size)
    return model


# --- checkpoints ---------------------------------------------------------------------------
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


def _head_fix(role: str | None, trained_for: int, wanted: int) -> str:
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
                   + _head_fix(role, head[0][0], n_model))
        else:
            fix = ("check that the model name is the architecture the checkpoint was trained with "
                   "(timm.list_models('*pattern*')) and that num_classes (or --num-classes) matches it")
        arch = (getattr(target, "pretrained_cfg", None) or {}).get("architecture") or type(target).__name__
        raise UserError(f"{Path(path)} does not fit model {arch!r}: " + "; ".join(parts),
                        where="checkpoint", fix=fix)
    target.load_state_dict(sd, strict=True)
    return model


# --- input-size adapter -----------------------------------------------------------------------
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
