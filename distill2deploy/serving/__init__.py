"""HTTP serving of exported models: Open Inference Protocol (KServe v2) REST, micro-batching, metrics."""
from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
