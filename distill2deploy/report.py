"""The run's report: one JSON a CI gate can read, one Markdown page and PNG plots a person reads."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import _io


def build_report(run_dir: Path, manifests: dict[str, dict[str, Any]], config_hash: str, name: str) -> dict[str, Any]:
    validate = json.loads((run_dir / manifests["validate"]["outputs"]["results"]["path"]).read_text())
    return {
        "name": name,
        "config_hash": config_hash,
        "models": validate["models"],
        "agreement": validate.get("agreement", {}),
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
        f"Config hash `{report['config_hash'][:16]}`. Teacher `{t['model']}` "
        f"(PyTorch test top-1 {_pct(t['test']['top1'])} on {t.get('test_images', '?')} images); "
        f"student `{d['student']}` ({d['params'] / 1e6:.2f}M params) distilled with `{d['method']}` for "
        f"{d['epochs']} epochs: PyTorch test top-1 {_pct(d['test_top1'])} (best epoch {d['best_epoch']}: "
        f"{_pct(d['best_top1'])}).",
        "",
        "## Measured in onnxruntime",
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
    lines += ["", "![accuracy vs latency](accuracy_latency.png)", "", "![training curves](training_curves.png)", ""]
    return "\n".join(lines)


def plot_training_curves(metrics: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss and accuracy per epoch: what a person checks first when a run looks wrong."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in metrics]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({k for r in metrics for k in r if k.startswith("train_") and k != "train_top1"}):
        ax1.plot(epochs, [r.get(key) for r in metrics], label=key.removeprefix("train_"))
    ax1.set_xlabel("epoch"), ax1.set_ylabel("training loss"), ax1.legend(fontsize=7)
    for key in sorted({k for r in metrics for k in r if k.endswith("top1")}):
        ax2.plot(epochs, [100 * r[key] if r.get(key) is not None else None for r in metrics], label=key)
    ax2.set_xlabel("epoch"), ax2.set_ylabel("top-1 %"), ax2.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    with _io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
