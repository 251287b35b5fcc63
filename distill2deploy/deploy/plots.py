"""Accuracy-vs-latency scatter of a :func:`~distill2deploy.deploy.validate.validate_models` report."""
from __future__ import annotations

import os
from typing import Any

from .._io import atomic_path
from ..errors import UserError


def plot_accuracy_latency(report: dict[str, Any], path: str | os.PathLike[str], *,
                          batch_size: str | int | None = None, title: str | None = None) -> str:
    """Write a PNG: p50 latency at ``batch_size`` (x, ms) against top-1 (y, %), one labelled point per model.

    ``batch_size`` defaults to the smallest batch size every model was timed at (1 normally:
    single-image latency is what an interactive deployment sees).

    Uses the object-oriented Agg API (no pyplot), so it works headless and leaves no global figure
    state behind.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = report.get("models") or {}
    if not models:
        raise UserError("the report has no models to plot", fix="run validation first")
    if batch_size is None:
        common = set.intersection(*(set(m.get("latency_ms", {})) for m in models.values()))
        if not common:
            raise UserError("the models in the report share no latency batch size", fix="validate them together")
        batch_size = min(common, key=int)
    bs = str(batch_size)
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, m in models.items():
        if bs not in m.get("latency_ms", {}):
            raise UserError(f"model {name} has no latency at batch size {bs}",
                            fix=f"choose one of {sorted(m.get('latency_ms', {}))}")
        x, y = m["latency_ms"][bs]["p50"], 100.0 * m["accuracy"]["top1"]
        int8 = name.endswith(".int8")
        ax.scatter([x], [y], marker="s" if int8 else "o", s=40, color="tab:orange" if int8 else "tab:blue")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"p50 latency at batch {bs} (ms, onnxruntime CPU)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "accuracy vs latency (squares: INT8)")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.25, y=0.15)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return os.fspath(path)
