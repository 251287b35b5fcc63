"""Argument helpers the commands share: the thread count, required flags, what a positional argument is."""
from __future__ import annotations

import argparse

from ..errors import UserError


def is_onnx(path: str | None) -> bool:
    return bool(path) and str(path).endswith(".onnx")


def threads(args: argparse.Namespace) -> int:
    """``--threads``, else the library default (1: shared cores do not collapse)."""
    from .._threads import DEFAULT_THREADS

    n = DEFAULT_THREADS if args.threads is None else args.threads
    if n < 1:
        raise UserError(f"--threads must be >= 1, got {n}", where="--threads", fix="e.g. --threads 1")
    return n


def require(value: object, flag: str, command: str) -> None:
    if value is None:
        raise UserError(f"{flag} is required", where=command, fix=f"see: distill2deploy {command} --help")


def check_input_size(value: int, flag: str) -> None:
    from ..config import MAX_INPUT_SIZE, MIN_INPUT_SIZE

    if not MIN_INPUT_SIZE <= value <= MAX_INPUT_SIZE:
        raise UserError(f"{value} is out of range", where=flag, fix=f"use {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE}")
