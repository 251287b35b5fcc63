"""Typed config plumbing: dataclasses in, validated dataclasses out, with helpful errors.

A schema is a (nested) dataclass. :func:`parse` checks a plain dict against it: unknown keys
are errors that suggest the closest valid key, values are coerced to the declared type where
that is unambiguous (``"5e-4"`` -> ``0.0005``: PyYAML reads that as a string), and every error
names the dotted path of the offending key.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .errors import UserError, suggest

T = TypeVar("T")


Bound = float | Callable[[], float] | None


def doc(default: Any = dataclasses.MISSING, help: str = "", *, ge: Bound = None, gt: Bound = None,
        le: Bound = None, **kw: Any) -> Any:
    """A dataclass field with a help text (shown in README's config reference) and optional bounds.

    ``ge``/``gt``/``le`` bound a number, or every number of a list; a callable bound is evaluated
    when a config is checked (e.g. the newest opset the installed exporter writes). :func:`parse`
    refuses a value outside them, naming the key and the allowed range.
    """
    meta = {"help": help, "bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le)) if v is not None}}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        value = default
        return dataclasses.field(default_factory=lambda: _copy(value), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<="}


def check_bounds(value: Any, bounds: dict[str, Bound], where: str) -> None:
    """Raise a UserError naming ``where`` when ``value`` (or an element of it) is outside ``bounds``."""
    if not bounds or value is None:
        return
    limits = {k: (b() if callable(b) else b) for k, b in bounds.items()}
    rule = " and ".join(f"{_BOUND_TEXT[k]} {v:g}" for k, v in limits.items())
    items = value if isinstance(value, list) else [value]
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        ok = (v >= limits.get("ge", -math.inf) and v > limits.get("gt", -math.inf)
              and v <= limits.get("le", math.inf) and not math.isnan(v))
        if not ok:
            what = f"{v!r} in {value!r}" if isinstance(value, list) else repr(v)
            raise UserError(f"{what} is out of range: every value must be {rule}" if isinstance(value, list)
                            else f"{what} is out of range: it must be {rule}", where=where,
                            fix=f"set {where} to a value {rule}")


def _copy(v: Any) -> Any:
    import copy

    return copy.deepcopy(v)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse(cls: type[T], data: Any, where: str = "") -> T:
    """Validate ``data`` against dataclass ``cls`` (recursively) and build it."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"expected a mapping of keys, got {type(data).__name__} {data!r}",
                        where=where or "config", fix=f"write '{where or 'config'}' as 'key: value' lines")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            hint = suggest(str(key), names)
            raise UserError(f"unknown key '{key}'" + (f" ({hint})" if hint else ""),
                            where=_join(where, str(key)),
                            fix=f"valid keys here: {', '.join(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = coerce(hints[f.name], data[f.name], _join(where, f.name))
            check_bounds(kwargs[f.name], f.metadata.get("bounds", {}), _join(where, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise UserError("required key is missing", where=_join(where, f.name),
                            fix=f"add '{f.name}: <{_type_name(hints[f.name])}>'")
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def coerce(tp: Any, value: Any, where: str) -> Any:
    """Coerce one value to type ``tp`` or raise a UserError naming ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, where)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(a, value, where)
            except UserError as e:
                errors.append(e)
        raise _type_error(tp, value, where)
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        hint = suggest(str(value), [str(c) for c in choices])
        raise UserError(f"{value!r} is not one of {', '.join(repr(c) for c in choices)}"
                        + (f" ({hint})" if hint else ""), where=where,
                        fix=f"use one of: {', '.join(str(c) for c in choices)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(tp, value, where)
        args = get_args(tp)
        inner = args[0] if args else Any
        out = [coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return out
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(tp, value, where)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(tp, value, where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise _type_error(tp, value, where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(tp, value, where)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _type_error(tp, value, where)
    raise TypeError(f"unsupported schema type {tp!r} at {where}")  # a bug in the schema


def _type_error(tp: Any, value: Any, where: str) -> UserError:
    return UserError(f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}", where=where,
                     fix=f"give '{where.rsplit('.', 1)[-1]}' a value of type {_type_name(tp)}")


def to_dict(obj: Any) -> Any:
    """Plain dict/list form of a schema instance (what gets saved and hashed)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def field_type(cls: type, path: list[str], where: str = "") -> Any:
    """The declared type at a dotted path, for typing CLI overrides; unknown keys suggest."""
    tp: Any = cls
    for i, key in enumerate(path):
        while get_origin(tp) in (Union, types.UnionType):
            inner = [a for a in get_args(tp) if dataclasses.is_dataclass(a)]
            if not inner:
                break
            tp = inner[0]
        here = ".".join(path[: i + 1])
        if get_origin(tp) is dict or tp is Any:
            return Any
        if not dataclasses.is_dataclass(tp):
            raise UserError(f"'{'.'.join(path[:i])}' is a {_type_name(tp)}, it has no key '{key}'",
                            where=where or here, fix="override the whole value instead")
        names = [f.name for f in dataclasses.fields(tp)]
        if key not in names:
            prefix = ".".join(path[:i])
            hint = suggest(here, [_join(prefix, n) for n in names])
            raise UserError(f"unknown key '{here}'" + (f" ({hint})" if hint else ""), where=where or here,
                            fix=f"valid keys under '{'.'.join(path[:i]) or 'the top level'}': {', '.join(names)}")
        tp = _hints(tp)[key]
    return tp


def parse_scalar(text: str, tp: Any) -> Any:
    """Turn an override's text into a value: strings stay strings where the schema wants one."""
    if tp is str:
        return text
    if get_origin(tp) in (Union, types.UnionType) and str in get_args(tp):
        return None if text in ("null", "None", "~") else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) rows for every leaf of a schema: the README config reference."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append((key, _type_name(tp), repr(to_dict(default)), f.metadata.get("help", "")))
    return rows
