"""Which runtime to deploy on? The answer from a :func:`~.validate.validate_models` run over several runtimes.

Per model, each runtime's top-1 on the same images (with the paired change against the reference
runtime, the first of ``validate.runtimes``, and the fraction of equal predictions) and its p50
latency as a ratio to the reference runtime running the same file, timed in the same interleaved
rounds (plus, for an INT8 model, the ratio to the fp32 model in the reference runtime: the
"is INT8 worth it" figure on the other runtime). A runtime whose top-1 differs *significantly
and materially* is flagged and never recommended: a faster runtime that computes something else
is not a deployment option. The terminal (``pipeline``, ``validate``) and report.md/report.json
show the same numbers.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .latency import spread

#: A runtime disagrees when its paired top-1 change is significant (95% interval excludes 0) and
#: at least this large: a handful of flipped near-ties between kernels is not a disagreement.
TOP1_TOLERANCE_PTS = 0.1


def _disagrees(change: dict[str, Any] | None) -> bool:
    if not change:
        return False
    lo, hi = change["ci95_pts"]
    return (lo > 0 or hi < 0) and abs(change["change_pts"]) >= TOP1_TOLERANCE_PTS


def _ratios(block: dict[str, Any], ref: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """p50 ratio block/ref per batch size and how much it moved between the interleaved rounds."""
    ratio, moved = {}, {}
    for bs, lat in block["latency_ms"].items():
        ratio[bs] = lat["p50"] / ref["latency_ms"][bs]["p50"]
        moved[bs] = spread(np.asarray(lat["round_p50"]) / np.asarray(ref["latency_ms"][bs]["round_p50"]))
    return ratio, moved


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def runtime_summary(result: dict[str, Any]) -> dict[str, Any]:
    """``{"reference", "runtimes", "versions", "models": {key: {runtime: {...}}}, "disagreements",
    "recommendation"}``; empty when only one runtime was measured."""
    others = result.get("runtimes") or {}
    if not others:
        return {}
    settings = result.get("settings", {})
    first = settings.get("runtime", "onnxruntime")
    versions = {first: settings.get("machine", {}).get(first)}
    models, disagreements = {}, []
    for key, base in result["models"].items():
        fp32 = key[: -len(".int8")] if key.endswith(".int8") and key[: -len(".int8")] in result["models"] else None
        rows = {first: {"top1": base["accuracy"]["top1"], "agreement": 1.0, "top1_change": None,
                        "p50_ms": {bs: v["p50"] for bs, v in base["latency_ms"].items()},
                        "ratio": {bs: 1.0 for bs in base["latency_ms"]}, "ratio_spread": {}}}
        for runtime, blocks in others.items():
            block = blocks[key]
            versions[runtime] = block.get("machine", {}).get(runtime)
            ratio, moved = _ratios(block, base)
            rows[runtime] = {"top1": block["accuracy"]["top1"], "agreement": block["agreement"],
                             "top1_change": block["top1_change"],
                             "p50_ms": {bs: v["p50"] for bs, v in block["latency_ms"].items()},
                             "ratio": ratio, "ratio_spread": moved}
            if _disagrees(block["top1_change"]):
                c = block["top1_change"]
                disagreements.append(f"{key} on {runtime}: top-1 {c['change_pts']:+.2f} pts "
                                     f"[95% CI {c['ci95_pts'][0]:+.2f}, {c['ci95_pts'][1]:+.2f}] against {first} "
                                     f"({100 * block['agreement']:.1f}% same predictions)")
        if fp32:
            ref = result["models"][fp32]
            for runtime, row in rows.items():
                block = base if runtime == first else others[runtime][key]
                row["ratio_to_fp32"] = _ratios(block, ref)[0]
        models[key] = rows
    return {"reference": first, "runtimes": [first, *others], "versions": versions, "models": models,
            "disagreements": disagreements, "recommendation": _recommend(models, first)}


def _recommend(models: dict[str, dict[str, Any]], first: str) -> dict[str, Any]:
    """The runtime for the model one deploys (the INT8 one if there is one, else the last listed):
    the fastest by the geometric mean of its p50 ratios over the batch sizes, among the runtimes
    whose accuracy agrees with the reference runtime's."""
    key = next((k for k in reversed(models) if k.endswith(".int8")), next(reversed(models)))
    rows = models[key]
    ok = {r: row for r, row in rows.items() if r == first or not _disagrees(row["top1_change"])}
    best = min(ok, key=lambda r: _geomean(list(ok[r]["ratio"].values())))
    per_bs = {bs: min(ok, key=lambda r: ok[r]["ratio"][bs]) for bs in rows[first]["ratio"]}
    everywhere = all(r == best for r in per_bs.values())
    why = (f"fastest at {'every batch size' if everywhere else 'the geometric mean of the batch sizes'}"
           f"{'' if everywhere else ' (' + ', '.join(f'@bs{bs}: {r}' for bs, r in per_bs.items()) + ')'}"
           + ("" if best == first else f", accuracy agrees with {first}"))
    excluded = sorted(set(rows) - set(ok))
    if excluded:
        why += f"; not considered because their accuracy differs: {', '.join(excluded)}"
    return {"model": key, "runtime": best, "ratio": rows[best]["ratio"], "fastest_per_batch_size": per_bs,
            "why": why}


def _ratio_text(ratio: dict[str, float], moved: dict[str, float]) -> str:
    return ", ".join(f"{r:.2f}x @bs{bs}" + (f" (moved {100 * moved[bs]:.0f}%)" if bs in moved else "")
                     for bs, r in ratio.items())


def runtime_lines(summary: dict[str, Any]) -> list[str]:
    """Plain-text lines: each other runtime against the reference per model, the flags, the pick."""
    if not summary:
        return []
    first, v = summary["reference"], summary["versions"]
    lines = []
    for key, rows in summary["models"].items():
        for runtime, row in rows.items():
            if runtime == first:
                continue
            c = row["top1_change"]
            lines.append(f"runtime {key}: {runtime} {v.get(runtime)} vs {first} {v.get(first)}: top-1 "
                         f"{100 * row['top1']:.2f}% vs {100 * rows[first]['top1']:.2f}% ({c['change_pts']:+.2f} pts, "
                         f"{100 * row['agreement']:.1f}% same predictions); p50 {_ratio_text(row['ratio'], row['ratio_spread'])}"
                         + (f"; x {first} fp32: " + _ratio_text(row["ratio_to_fp32"], {}) if "ratio_to_fp32" in row else ""))
    lines += [f"warning: runtimes disagree: {d}" for d in summary["disagreements"]]
    rec = summary["recommendation"]
    lines.append(f"deploy {rec['model']} on {rec['runtime']} on this machine: {rec['why']}")
    return lines


def runtime_markdown(summary: dict[str, Any]) -> list[str]:
    """The report's "Which runtime?" section: one table per model, the flags, the pick."""
    if not summary:
        return []
    first, v = summary["reference"], summary["versions"]
    rec = summary["recommendation"]
    lines = ["## Which runtime?", "",
             f"**Deploy `{rec['model']}` on {rec['runtime']}** on this machine: {rec['why']}.", ""]
    for key, rows in summary["models"].items():
        sizes = list(rows[first]["p50_ms"])
        int8 = "ratio_to_fp32" in rows[first]
        head = ["runtime", "top-1", f"vs {first}", "same predictions",
                *(f"p50 ms @bs{bs} (x {first})" for bs in sizes),
                *((f"x {first} fp32 @bs{bs}" for bs in sizes) if int8 else ())]
        lines += [f"`{key}`:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for runtime, row in rows.items():
            c = row["top1_change"]
            change = "reference" if c is None else (f"{c['change_pts']:+.2f} pts [{c['ci95_pts'][0]:+.2f}, "
                                                    f"{c['ci95_pts'][1]:+.2f}]")
            cells = [f"{runtime} {v.get(runtime) or ''}".strip(), f"{100 * row['top1']:.2f}%", change,
                     f"{100 * row['agreement']:.2f}%",
                     *(f"{row['p50_ms'][bs]:.3f} ({row['ratio'][bs]:.2f}x)" for bs in sizes),
                     *((f"{row['ratio_to_fp32'][bs]:.2f}x" for bs in sizes) if int8 else ())]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if summary["disagreements"]:
        lines += ["**Runtimes disagree on accuracy** (not recommended where they do):", ""]
        lines += [f"- {d}" for d in summary["disagreements"]] + [""]
    lines += [f"Same files, same test images, timed in the same interleaved rounds; a runtime disagrees when its "
              f"paired top-1 change is significant (95% CI excludes 0) and at least {TOP1_TOLERANCE_PTS} pts.", ""]
    return lines
