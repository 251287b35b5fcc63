"""Is INT8 worth it? The answer from a :func:`~distill2deploy.deploy.validate.validate_models` result.

One summary per INT8/fp32 pair: the paired top-1 change with its 95% interval, the p50 latency
ratio at each batch size with how much it moved between rounds, the size ratio and the prediction
agreement, plus the machine and threads, and warnings when the latency figures are dominated by
noise. The terminal (``pipeline``, ``validate``) and report.md/report.json show the same numbers.
"""
from __future__ import annotations

from typing import Any

from .machine import describe
from .regression import noise_warnings

#: Above this round-to-round spread of the INT8/fp32 ratio, the ratio is flagged as noisy.
RATIO_SPREAD = 0.25


def int8_summary(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"<int8> vs <fp32>": {top1_change, latency_ratio, latency_ratio_spread, size_ratio, agreement,
    warnings}}`` for every pair in ``result``."""
    models, out = result["models"], {}
    for pair, agree in result.get("agreement", {}).items():
        int8, fp32 = pair.split(" vs ")
        spread = result.get("latency_ratio_spread", {}).get(pair, {})
        warnings = [*noise_warnings(models[fp32]["latency_ms"], fp32), *noise_warnings(models[int8]["latency_ms"], int8)]
        warnings += [f"INT8/fp32 latency ratio @bs{bs} moved by {100 * s:.0f}% between rounds"
                     for bs, s in spread.items() if s > RATIO_SPREAD]
        out[pair] = {"top1_change": result.get("top1_change", {}).get(pair),
                     "latency_ratio": result["latency_ratio"][pair], "latency_ratio_spread": spread,
                     "size_ratio": models[int8]["bytes"] / models[fp32]["bytes"], "agreement": agree,
                     "warnings": warnings}
    return out


def _speed(ratio: float) -> str:
    return f"{1 / ratio:.2f}x faster" if ratio < 1 else f"{ratio:.2f}x SLOWER"


def int8_lines(summary: dict[str, dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    """Plain-text lines: the verdict per pair, the machine, then any noise warnings."""
    lines = []
    for pair, s in summary.items():
        tc = s["top1_change"]
        acc = (f"top-1 {tc['change_pts']:+.2f} pts [95% CI {tc['ci95_pts'][0]:+.2f}, {tc['ci95_pts'][1]:+.2f}] "
               f"on {tc['n']} images" if tc else "top-1 change unknown")
        lat = ", ".join(f"{_speed(r)} @bs{bs} (p50 ratio {r:.2f}, moved {100 * s['latency_ratio_spread'].get(bs, 0):.0f}% "
                        "between rounds)" for bs, r in s["latency_ratio"].items())
        lines.append(f"INT8 {pair}: {acc}; {lat}; {1 / s['size_ratio']:.1f}x smaller; "
                     f"{100 * s['agreement']:.1f}% same predictions")
    machine = settings.get("machine")
    if machine:
        lines.append(f"measured on {describe(machine)}, {settings.get('runs')} timed runs per batch size "
                     f"in {settings.get('rounds')} interleaved rounds")
    for s in summary.values():
        lines += [f"warning: noisy latency: {w}" for w in s["warnings"]]
    return lines


def int8_markdown(summary: dict[str, dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    """The report's "Is INT8 worth it?" section."""
    if not summary:
        return []
    lines = ["## Is INT8 worth it?", ""]
    for pair, s in summary.items():
        int8, fp32 = pair.split(" vs ")
        tc = s["top1_change"]
        lines += [f"`{int8}` against `{fp32}`:", "", "| figure | INT8 vs fp32 | uncertainty |", "|---|---|---|"]
        if tc:
            lines.append(f"| top-1 (same {tc['n']} images) | {tc['change_pts']:+.2f} points | 95% CI "
                         f"[{tc['ci95_pts'][0]:+.2f}, {tc['ci95_pts'][1]:+.2f}] ({tc['lost']} images lost, "
                         f"{tc['gained']} gained) |")
        for bs, r in s["latency_ratio"].items():
            lines.append(f"| p50 latency @bs{bs} | {r:.2f}x ({_speed(r)}) | ratio moved "
                         f"{100 * s['latency_ratio_spread'].get(bs, 0):.0f}% between rounds |")
        lines += [f"| file size | {s['size_ratio']:.2f}x ({1 / s['size_ratio']:.1f}x smaller) | exact |",
                  f"| same top-1 prediction | {100 * s['agreement']:.2f}% | |", ""]
    machine = settings.get("machine")
    if machine:
        lines += [f"Measured on {describe(machine)}; {settings.get('runs')} timed runs per model and batch size "
                  f"in {settings.get('rounds')} interleaved rounds, so load hits fp32 and INT8 alike.", ""]
    warnings = [w for s in summary.values() for w in s["warnings"]]
    if warnings:
        lines += ["**Latency figures are noise-dominated here** (other load on the machine); compare the ratios, "
                  "and rerun `validate` on a quiet machine for absolute numbers:", ""]
        lines += [f"- {w}" for w in warnings] + [""]
    return lines


def search_markdown(search: dict[str, Any]) -> list[str]:
    """report.md's table of every INT8 candidate the quantize search scored (empty without a search)."""
    if not search or not search.get("rows"):
        return []
    verdict = "within" if search["within_budget"] else "**not** within"
    lines = ["## INT8 search", "",
             f"Kept `{search['chosen']}`, the fastest candidate {verdict} the budget of {search['max_drop_pt']:g} "
             f"top-1 points against fp32 ({100 * search['fp32_top1']:.2f}%) on {search['eval_samples']} held-out "
             f"training images (not the test split, not the calibration images)"
             + (f" and {search['views']} unseen views of each (fp32 {100 * search['fp32_view_top1']:.2f}% on the "
                "views); a candidate fits when the 95% upper bound of its drop there is within the budget, and "
                "among candidates not measurably slower than the fastest (interquartile ranges of per-round ratios "
                "overlap) the lowest "
                "bound is kept" if search.get("views") else "")
             + f". Latency: p50 relative to fp32, mean over batch sizes, {search['threads']} thread(s), candidates "
             f"and fp32 interleaved in {search['rounds']} rounds of {search['runs']} runs in all per batch size.", "",
             *([f"**Warning**: {search['warning']}.", ""] if search.get("warning") else []),
             ("| candidate | held-out top-1 | drop (pts) | drop with views (pts) | 95% bound (pts) | latency / fp32 | "
              "kept in float |"), "|---|---|---|---|---|---|---|"]
    for r in sorted(search["rows"], key=lambda r: r["latency_ratio"]):
        mark = " (kept)" if r["name"] == search["chosen"] else ""
        floats = len(r.get("nodes_to_exclude", [])) or ("-" if "qat_epochs" not in r else "QAT")
        est, ucb = (f"{r[k]:+.2f}" if k in r else "-" for k in ("est_drop_pt", "drop_ucb_pt"))
        lines.append(f"| `{r['name']}`{mark} | {100 * r['top1']:.2f}% | {r['drop_pt']:+.2f} | {est} | {ucb} | "
                     f"{r['latency_ratio']:.2f} | {floats} |")
    return [*lines, "", "![INT8 search](quantize_search.png)", ""]
