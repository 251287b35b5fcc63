"""Accuracy-vs-latency scatter of a :func:`~distill2deploy.deploy.validate.validate_models` report."""
from __future__ import annotations

import os
from typing import Any

from .._io import atomic_path
from ..errors import UserError


def _spread_labels(ax: Any, points: list[tuple[str, float, float]], min_gap_px: float = 13.0) -> None:
    """Annotate points with labels pushed apart vertically (display space), with a leader line when moved.

    Models of one run often sit on top of each other (fp32 teacher and student at similar latency,
    INT8 next to its fp32 at equal accuracy); labels at a fixed offset would overprint.
    """
    ax.figure.canvas.draw()  # fix limits and transforms before measuring in pixels
    placed: list[tuple[float, float]] = []
    for name, x, y in sorted(points, key=lambda p: (p[2], p[1])):
        px, py = ax.transData.transform((x, y))
        ly = py
        for ox, oy in placed:  # only labels that would share the same stretch of text line collide
            if abs(ly - oy) < min_gap_px and abs(px - ox) < 90:
                ly = oy + min_gap_px
        placed.append((px, ly))
        moved = ly - py
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(7, 3 + moved * 72 / ax.figure.dpi),
                    fontsize=8, arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6} if moved > 1 else None)


def _runtime(report: dict[str, Any]) -> str:
    return (report.get("runtimes") or {}).get("reference") or "onnxruntime"


def _other_runtimes(report: dict[str, Any], bs: str) -> list[tuple[str, float, float, bool]]:
    """(label, p50 ms, top-1 %, is INT8) of every model on the runtimes after the reference one
    (the report's ``runtimes`` section, :func:`~.runtime_report.runtime_summary`)."""
    summary = report.get("runtimes") or {}
    return [(f"{name} [{runtime}]", row["p50_ms"][bs], 100.0 * row["top1"], name.endswith(".int8"))
            for name, rows in summary.get("models", {}).items() for runtime, row in rows.items()
            if runtime != summary["reference"] and bs in row["p50_ms"]]


def plot_accuracy_latency(report: dict[str, Any], path: str | os.PathLike[str], *,
                          title: str | None = None) -> str:
    """Write a PNG: p50 latency (x, ms) against top-1 (y, %), one panel per batch size, one labelled
    point per model (squares: INT8); models on further runtimes (the report's ``runtimes``) are
    hollow points beside them.

    Every batch size the models share gets a panel (single-image latency is what an interactive
    deployment sees, batch 64 what a throughput one sees). The x axis turns logarithmic when the
    latencies in a panel span 10x or more, and labels are placed apart where points overlap.

    Uses the object-oriented Agg API (no pyplot), so it works headless and leaves no global figure
    state behind.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    models = report.get("models") or {}
    if not models:
        raise UserError("the report has no models to plot", fix="run validation first")
    common = set.intersection(*(set(m.get("latency_ms", {})) for m in models.values()))
    if not common:
        raise UserError("the models in the report share no latency batch size", fix="validate them together")
    sizes = sorted(common, key=int)
    fig = Figure(figsize=(5.2 * len(sizes), 4.4), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(sizes), squeeze=False)[0]
    for ax, bs in zip(axes, sizes):
        points = []
        for name, m in models.items():
            x, y = m["latency_ms"][bs]["p50"], 100.0 * m["accuracy"]["top1"]
            int8 = name.endswith(".int8")
            ax.scatter([x], [y], marker="s" if int8 else "o", s=40, color="tab:orange" if int8 else "tab:blue",
                       zorder=3)
            points.append((name, x, y))
        for name, x, y, int8 in _other_runtimes(report, bs):
            ax.scatter([x], [y], marker="s" if int8 else "o", s=40, facecolors="none", edgecolors="tab:green",
                       zorder=3)
            points.append((name, x, y))
        xs = [p[1] for p in points]
        if max(xs) >= 10 * min(xs):
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"p50 wall latency at batch {bs} (ms, on the CPU)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"batch {bs}", fontsize=10)
        ax.grid(True, alpha=0.3, which="both")
        ax.margins(x=0.3, y=0.2)
        _spread_labels(ax, points)
    others = " hollow green: other runtimes;" if report.get("runtimes") else ""
    fig.suptitle(title or f"accuracy vs latency (squares: INT8;{others} {_runtime(report)} otherwise)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return os.fspath(path)


def plot_quantize_search(search: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Held-out top-1 drop against latency relative to fp32 for every searched INT8 candidate, with the
    budget as a line and the kept one marked: the trade-off the search made, at a glance."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = search["rows"]
    key = search.get("score", "drop_pt")  # what the search decided on; a QAT row has only its plain drop
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in rows:
        kept = r["name"] == search["chosen"]
        ax.scatter(r["latency_ratio"], r.get(key, r["drop_pt"]), s=60 if kept else 25, marker="*" if kept else "o",
                   color="tab:green" if kept else ("tab:purple" if "qat_epochs" in r else "tab:blue"), zorder=3)
    _spread_labels(ax, [(r["name"], r["latency_ratio"], r.get(key, r["drop_pt"])) for r in rows])
    ax.axhline(search["max_drop_pt"], color="tab:red", ls="--", lw=1, label=f"budget {search['max_drop_pt']:g} pts")
    ax.set_xlabel(f"p50 latency / fp32 (mean over batch sizes, {search['threads']} thread(s))")
    ax.set_ylabel("top-1 drop vs fp32, held-out training images (pts)" if key == "drop_pt" else
                  "95% bound of the top-1 drop vs fp32,\nheld-out training images + views (pts)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
