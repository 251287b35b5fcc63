"""The run's report: one JSON a CI gate can read, one Markdown page and PNG plots a person reads."""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import _io
from .deploy.int8_report import int8_markdown, int8_summary, search_markdown
from .deploy.runtime_report import runtime_markdown, runtime_summary


def build_report(run_dir: Path, manifests: dict[str, dict[str, Any]], config_hash: str, name: str) -> dict[str, Any]:
    validate = json.loads((run_dir / manifests["validate"]["outputs"]["results"]["path"]).read_text())
    settings = dict(validate.get("settings", {}))
    machine = settings.pop("machine", None)  # once, at the top level
    return {
        "name": name,
        "config_hash": config_hash,
        "models": validate["models"],
        "agreement": validate.get("agreement", {}),
        "int8": int8_summary(validate),
        "runtimes": runtime_summary(validate),
        "machine": machine,
        "latency_settings": settings,
        "teacher": manifests["teacher"]["summary"],
        "distill": manifests["distill"]["summary"],
        "export": manifests["export"]["summary"],
        "quantize": manifests.get("quantize", {}).get("summary", {}),
        "stages": {k: {"seconds": m.get("seconds"), "key": m.get("key")} for k, m in manifests.items()},
    }


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def render_markdown(report: dict[str, Any]) -> str:
    d, t = report["distill"], report["teacher"]
    lines = [
        f"# distill2deploy report: {report['name']}",
        "",
        f"Config hash `{report['config_hash'][:16]}` (the `config_hash` in every exported model's ONNX metadata "
        f"and in `config.sha256`). Teacher `{t['model']}` "
        f"(PyTorch test top-1 {_pct(t['test']['top1'])} on {t.get('test_images', '?')} images); "
        f"student `{d['student']}` ({d['params'] / 1e6:.2f}M params) distilled with `{d['method']}` for "
        f"{d['epochs']} epochs: PyTorch test top-1 {_pct(d['test_top1'])} (best epoch {d['best_epoch']}: "
        f"{_pct(d['best_top1'])}).",
        "",
        *int8_markdown(report.get("int8", {}), {**report.get("latency_settings", {}), "machine": report.get("machine")}),
        *search_markdown(report.get("quantize", {}).get("search", {})),
        *runtime_markdown(report.get("runtimes", {})),
        f"## Measured in {report.get('latency_settings', {}).get('runtime', 'onnxruntime')}",
        "",
    ]
    sizes = sorted({bs for m in report["models"].values() for bs in m["latency_ms"]}, key=int)
    head = "| model | size | top-1 | top-5 | " + " | ".join(f"p50 / p90 / p99 ms @bs{bs} | img/s @bs{bs}" for bs in sizes) + " |"
    lines += [head, "|" + "---|" * (4 + 2 * len(sizes))]
    for stem, m in report["models"].items():
        cells = [f"`{stem}`", f"{m['bytes'] / 1e6:.2f} MB", _pct(m["accuracy"]["top1"]), _pct(m["accuracy"]["top5"])]
        for bs in sizes:
            lat = m["latency_ms"][bs]
            cells += [f"{lat['p50']:.3f} / {lat['p90']:.3f} / {lat['p99']:.3f}", f"{m['throughput_ips'][bs]:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    n = next(iter(report["models"].values()))["accuracy"]["n"]
    lines += ["", f"Accuracy on {n} test images."]
    for pair, frac in report.get("agreement", {}).items():
        lines.append(f"Prediction agreement {pair}: {_pct(frac)}.")
    parity = report.get("export", {})
    for role, info in parity.items():
        p = info.get("parity") or {}
        if p:
            lines.append(f"Export parity `{role}` (PyTorch vs onnxruntime, {p['n']} images): max abs diff "
                         f"{p['max_abs_diff']:.2e}, top-1 agreement {_pct(p['top1_agreement'])}.")
    lines += ["", "Throughput is batch size / p50 latency (one stream, no outlier-dominated mean).", "",
              "![accuracy vs latency](accuracy_latency.png)", "", "![training curves](training_curves.png)", ""]
    return "\n".join(lines)


# Per-epoch keys under ``train_`` that are not loss terms: accuracy, counts, and the right/wrong
# fractions (final level ``trsw``..., level k ``l<k>_trsw``...), which are in [0, 1] and would
# share the loss axis otherwise.
_NOT_LOSSES = frozenset({"train_top1", "train_images"})
_MASK_KEYS = ("trsr", "trsw", "twsr", "twsw")
_MASK_FRACTION = re.compile(r"^train_(?:l\d+_)?(?:" + "|".join(_MASK_KEYS) + ")$")


def loss_keys(keys: Iterable[str]) -> list[str]:
    """The per-epoch keys that are training loss terms, sorted (the loss panel's curves)."""
    return sorted(k for k in keys if k.startswith("train_") and k not in _NOT_LOSSES and not _MASK_FRACTION.match(k))


def _series(metrics: list[dict[str, Any]], key: str, scale: float = 1.0) -> list[float]:
    return [scale * r[key] if isinstance(r.get(key), (int, float)) else math.nan for r in metrics]


def plot_training_curves(metrics: list[dict[str, Any]], path: Path, title: str,
                         teacher_top1: float | None = None) -> None:
    """Loss terms, top-1 and (where logged) the final-level right/wrong fractions per epoch: what a
    person checks first when a run looks wrong.

    The top-1 panel marks the best epoch of the student (the checkpoint kept as ``best.pt``) and
    the frozen teacher's test top-1 (``teacher_top1``) as a horizontal line; a co-trained teacher
    (bidirectional methods log ``test_teacher_top1``) is its own curve.

    Uses the object-oriented Agg API (no pyplot), like :mod:`~distill2deploy.deploy.plots`, so it
    neither switches a caller's matplotlib backend nor leaves global figure state behind.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in metrics]
    style = {"marker": "o", "markersize": 3} if len(epochs) <= 10 else {}  # one epoch: a point, not a line
    keys = sorted({k for r in metrics for k in r})
    mask_keys = [f"train_{k}" for k in _MASK_KEYS if f"train_{k}" in keys]
    fig = Figure(figsize=(15 if mask_keys else 10, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if mask_keys else 2)
    for key in loss_keys(keys):
        axes[0].plot(epochs, _series(metrics, key), label=key.removeprefix("train_"), **style)
    axes[0].set_xlabel("epoch"), axes[0].set_ylabel("training loss term"), axes[0].legend(fontsize=7)
    names = {"test_top1": "student (test)", "train_top1": "student (train)",
             "test_teacher_top1": "teacher, co-trained (test)"}
    for key in [k for k in keys if k.endswith("top1")]:
        axes[1].plot(epochs, _series(metrics, key, 100.0), label=names.get(key, key), **style)
    if teacher_top1 is not None:
        axes[1].axhline(100 * teacher_top1, color="0.3", ls=":", lw=1,
                        label=f"teacher before distillation {100 * teacher_top1:.1f}%")
    test = _series(metrics, "test_top1", 100.0)
    if any(math.isfinite(v) for v in test):
        best = max(range(len(test)), key=lambda i: test[i] if math.isfinite(test[i]) else -1)
        axes[1].axvline(epochs[best], color="tab:green", ls="--", lw=1,
                        label=f"best epoch {epochs[best]}: {test[best]:.1f}%")
        axes[1].plot([epochs[best]], [test[best]], "*", color="tab:green", ms=10)
    axes[1].set_xlabel("epoch"), axes[1].set_ylabel("top-1 %"), axes[1].legend(fontsize=7)
    if mask_keys:
        for key in mask_keys:
            axes[2].plot(epochs, _series(metrics, key, 100.0), label=key.removeprefix("train_"), **style)
        axes[2].set_xlabel("epoch"), axes[2].set_ylabel("% of training samples (final level)")
        axes[2].legend(fontsize=7)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    with _io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
