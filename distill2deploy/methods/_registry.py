"""Name -> method class, the way timm's ``@register_model`` maps names to model builders."""
from __future__ import annotations

from typing import TypeVar

from ..errors import UserError, suggest

_METHODS: dict[str, type] = {}
M = TypeVar("M", bound=type)


def register_method(cls: M) -> M:
    name = cls.name  # type: ignore[attr-defined]
    if not name or name in _METHODS:
        raise ValueError(f"method name {name!r} is empty or already registered")
    _METHODS[name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> type:
    try:
        return _METHODS[name]
    except KeyError:
        hint = suggest(name, _METHODS)
        raise UserError(f"unknown distillation method '{name}'" + (f" ({hint})" if hint else ""),
                        where="distill.method", fix=f"use one of: {', '.join(list_methods())}") from None
