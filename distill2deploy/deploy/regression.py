"""Is a figure worse than its baseline by more than the budget, with confidence? Statistics and verdicts.

Both figures follow one rule, the "threshold AND significance" rule of asv and pyperf made
one-sided against the budget: a figure regresses only when its change exceeds the budget *and* a
test rejects "the change is within budget" at level ``alpha``. Noise alone then almost never
fails a CI run, and a real regression well past the budget fails every time.

- Latency: per-round relative latencies (see :mod:`.benchmark`) now vs baseline, a one-sided
  Mann-Whitney U test of ``now`` against ``baseline * (1 + max_slowdown)``; the change is the ratio
  of medians with a bootstrap 95% interval.
- Accuracy: top-1 on the same images, paired per image (McNemar): the drop with a 95% interval,
  and an exact binomial test of the discordant images against the budget.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

OK, REGRESSION, IMPROVED, INFO = "ok", "REGRESSION", "improved", "info"


def _bootstrap_ratio_ci(base: np.ndarray, now: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of median(now) / median(base), by resampling both (fixed seed: same input, same bytes)."""
    rng = np.random.default_rng(seed)
    b = np.median(base[rng.integers(0, len(base), (n, len(base)))], axis=1)
    m = np.median(now[rng.integers(0, len(now), (n, len(now)))], axis=1)
    lo, hi = np.percentile(m / b, [2.5, 97.5])
    return float(lo), float(hi)


def compare_latency(base: Sequence[float], now: Sequence[float], *, max_slowdown: float,
                    alpha: float) -> dict[str, Any]:
    """Verdict on per-round relative latencies: REGRESSION, improved (significantly faster by more
    than the budget) or ok. ``change`` and ``ci95`` are fractions (0.25 = 25% slower)."""
    b, m = np.asarray(base, float), np.asarray(now, float)
    ratio = float(np.median(m) / np.median(b))
    lo, hi = _bootstrap_ratio_ci(b, m)
    slower = stats.mannwhitneyu(m, b * (1 + max_slowdown), alternative="greater").pvalue
    faster = stats.mannwhitneyu(m, b * (1 - max_slowdown), alternative="less").pvalue
    if ratio - 1 > max_slowdown and slower < alpha:
        verdict, p = REGRESSION, slower
    elif 1 - ratio > max_slowdown and faster < alpha:
        verdict, p = IMPROVED, faster
    else:
        verdict, p = OK, slower
    return {"baseline": float(np.median(b)), "now": float(np.median(m)), "change": ratio - 1,
            "ci95": [lo - 1, hi - 1], "p": float(p), "budget": max_slowdown, "verdict": verdict,
            "rounds": [len(b), len(m)]}


def paired_accuracy(base_correct: np.ndarray, now_correct: np.ndarray) -> dict[str, Any]:
    """Top-1 change on the same images (now - base, in points) with a paired 95% interval.

    Only the discordant images carry information: ``lost`` were right before and wrong now,
    ``gained`` the reverse. The interval is the Wald interval of a paired difference of
    proportions (Agresti & Min), which stays sensible at 0 discordant images (width 0).
    """
    a, c = np.asarray(base_correct, bool), np.asarray(now_correct, bool)
    if a.shape != c.shape:
        raise ValueError(f"per-image results of different lengths: {a.shape} vs {c.shape}")
    n = len(a)
    lost, gained = int((a & ~c).sum()), int((~a & c).sum())
    diff = (gained - lost) / n
    se = math.sqrt(max(lost + gained - (gained - lost) ** 2 / n, 0.0)) / n
    return {"baseline": float(a.mean()), "now": float(c.mean()), "change_pts": 100 * diff,
            "ci95_pts": [100 * (diff - 1.96 * se), 100 * (diff + 1.96 * se)],
            "n": n, "lost": lost, "gained": gained}


def compare_accuracy(base_correct: np.ndarray, now_correct: np.ndarray, *, max_drop: float,
                     alpha: float) -> dict[str, Any]:
    """Verdict on a top-1 drop of more than ``max_drop`` points on the same images.

    Exact test: under "the drop is at most max_drop points", a discordant image is a lost one with
    probability at most ``(D + d) / (2D)`` where D is the discordant fraction and d the budget; the
    one-sided binomial test of ``lost`` against that bound gives ``p``.
    """
    r = paired_accuracy(base_correct, now_correct)
    k = r["lost"] + r["gained"]
    d = max_drop / 100
    if k == 0:
        p = 1.0
    else:
        disc = k / r["n"]
        p0 = min(1.0, (disc + d) / (2 * disc))
        p = 1.0 if p0 >= 1 else float(stats.binomtest(r["lost"], k, p0, alternative="greater").pvalue)
    drop = -r["change_pts"]
    verdict = REGRESSION if drop > max_drop and p < alpha else OK
    return {**r, "p": p, "budget_pts": max_drop, "verdict": verdict}


def noise_warnings(latency_ms: dict[str, dict[str, float]], what: str, *, tail: float = 3.0,
                   spread: float = 0.2) -> list[str]:
    """Warnings when latency figures are dominated by noise: p99 more than ``tail`` x p50 (runs were
    preempted), or per-round p50s that differ by more than ``spread`` (the load changed meanwhile)."""
    out = []
    for bs, lat in latency_ms.items():
        if lat.get("p50") and lat.get("p99", 0) > tail * lat["p50"]:
            out.append(f"{what} @bs{bs}: p99 is {lat['p99'] / lat['p50']:.1f}x p50 (other load preempted runs)")
        if lat.get("round_spread", 0) > spread:
            out.append(f"{what} @bs{bs}: p50 moved by {100 * lat['round_spread']:.0f}% between rounds "
                       "(the machine's load changed during the measurement)")
    return out


def _fmt_pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def latency_row(figure: str, r: dict[str, Any]) -> list[str]:
    lo, hi = r["ci95"]
    return [figure, f"{r['baseline']:.3f}", f"{r['now']:.3f}", f"{_fmt_pct(r['change'])} [{_fmt_pct(lo)}, {_fmt_pct(hi)}]",
            f"<= {_fmt_pct(r['budget'])}", f"p={r['p']:.2g}", r["verdict"]]


def accuracy_row(figure: str, r: dict[str, Any]) -> list[str]:
    lo, hi = r["ci95_pts"]
    return [figure, f"{100 * r['baseline']:.2f}%", f"{100 * r['now']:.2f}%",
            f"{r['change_pts']:+.2f} pts [{lo:+.2f}, {hi:+.2f}]", f"drop <= {r['budget_pts']:g} pts",
            f"p={r['p']:.2g} (-{r['lost']}/+{r['gained']} images)", r["verdict"]]


TABLE_HEAD = ["figure", "baseline", "now", "change [95% CI]", "budget", "confidence", "verdict"]


def format_table(rows: list[list[str]], head: Sequence[str] = TABLE_HEAD) -> str:
    """A fixed-width text table (what a CI log shows)."""
    widths = [max(len(str(r[i])) for r in [list(head), *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])
