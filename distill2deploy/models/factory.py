"""Model creation: ``timm.create_model`` plus the checks that turn a user's mistake into advice.

Everything a user can get wrong when naming a teacher or student -- an unknown model name,
``pretrained`` where no weights exist, no internet for the download, options the constructor
rejects -- becomes a :class:`~distill2deploy.errors.UserError` that says what to change, instead of
a deep timm/torch traceback or (worse) silently random weights. Local weights are loaded by
:mod:`._checkpoint`; inputs of another resolution are adapted by :class:`.features.ResizeInput`.
(timm splits the same way: ``_factory``, ``_helpers.load_checkpoint``, ``_features``.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg, parse_model_name, split_model_name_tag
from torch import nn

from ..errors import UserError, suggest
from ._checkpoint import checkpoint_option, head_fix, load_checkpoint
from .features import ResizeInput

__all__ = ["check_model_name", "create_model"]


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
            fix=(f"set pretrained: false, give local weights with {checkpoint_option(role)}: PATH"
                 + (f", or use one of {others}" if others else "")
                 + "; models with weights: timm.list_pretrained('*pattern*')"),
        )


def random_init_model(name: str, *, num_classes: int, seed: int = 0, **kwargs: Any) -> nn.Module:
    """``name`` with seeded random weights: the same graph and weights on every call (same exported
    bytes), for latency benchmarks of architectures without trained weights. The caller's random
    state is left as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name, num_classes=num_classes, **kwargs)


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
                            fix=head_fix(role, trained_for, num_classes))
    try:
        model = timm.create_model(name, pretrained=download, num_classes=num_classes, **kwargs)
    except _download_errors() as e:
        if not download:
            raise
        url = getattr(get_pretrained_cfg(name), "url", None) if not parse_model_name(name)[0] else None
        raise UserError(
            f"could not download the pretrained weights of {name!r} ({type(e).__name__}: {e})",
            where=role or "pretrained",
            fix=f"set {checkpoint_option(role)}: PATH to local weights (.pth/.pt/.safetensors)"
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
