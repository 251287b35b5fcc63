"""How the INT8 search scores a candidate's accuracy and breaks latency ties, robust to memorised images.

The search may only look at training images, and a network has usually memorised those: pretrained
ResNet-20/32/44/56 scored 94.7 / 98.8 / 100 / 100% top-1 on held-out CIFAR-100 *training* images
(71.0 / 69.5 / 73.8 / 72.3% on the test split). There INT8 rarely flips a prediction, every sane
candidate "drops 0.00", and the search kept a ResNet-56 candidate that lost 1.25 points on the test
split. Three measured answers (``benchmarks/quantize_search.py``; numbers in docs/quantize_search.md):

* **unseen views** (:func:`unseen_views`): each held-out image is also scored as a few seeded,
  deterministic TrivialAugmentWide + flip views. The training augmentation itself (pad-4 crop +
  flip) stays memorised (92-99% top-1); random-resized crops overshoot (32-44%, 2-3x the test split's
  INT8/fp32 disagreement); TrivialAugmentWide views land nearest the test split (59-65% top-1);
* **a one-sided 95% upper bound of the paired drop** (:func:`paired_drop`): the budget is on the drop
  the deployment sees, and a few hundred images estimate it to about a point; the bound grows with
  how often INT8 and fp32 disagree, so of two candidates that both "drop 0.0" the one flipping more
  predictions (and so more likely to lose points on new images) scores worse;
* **latency ties** (:func:`pick`): a candidate whose per-round latency ratios overlap the fastest
  one's (interquartile ranges over the interleaved rounds) is not measurably slower on a loaded
  machine, so among those the lowest bound wins.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: one-sided 95% normal quantile: the bound a candidate's drop must keep within the budget
Z_95 = 1.645


def unseen_views(images: np.ndarray, views: int, seed: int,
                 transform: Callable[[Any], Any] | None = None) -> np.ndarray:
    """``views`` augmented copies of uint8 NHWC ``images``, view-major (``views * len(images)``, same
    shape per image): horizontal flip then TrivialAugmentWide (one random photometric or geometric op
    of random strength), or ``transform`` (a torchvision v2 transform on uint8 CHW tensors, for
    comparing others). Seeded through a forked torch RNG, so the same call gives the same bytes and
    the caller's random state is left as it was."""
    import torch
    from torchvision.transforms import v2

    x = np.asarray(images)
    if views < 1 or len(x) == 0:
        return x[:0]
    tf = transform or v2.Compose([v2.RandomHorizontalFlip(), v2.TrivialAugmentWide()])
    chw = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        # one image at a time: v2 draws one set of parameters per call, a batch would share it
        out = [tf(im) for _ in range(int(views)) for im in chw]
    return torch.stack(out).permute(0, 2, 3, 1).contiguous().numpy()


def paired_drop(fp32_logits: np.ndarray, int8_logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 points INT8 loses against fp32 on the same inputs, with a one-sided 95% upper bound.

    ``labels`` has one entry per image; the logits hold ``k * len(labels)`` rows, view-major (the
    original images first, then each view). Views of one image are not independent, so the standard
    error is over images of their per-image mean difference. Returns ``drop_pt`` (mean),
    ``drop_ucb_pt`` (mean + 1.645 standard errors) and ``disagreement`` (share of rows whose top-1
    differs: an upper bound of the net drop, and what drives its uncertainty).
    """
    labels = np.asarray(labels)
    n = len(labels)
    f, q = np.asarray(fp32_logits).argmax(1), np.asarray(int8_logits).argmax(1)
    if n == 0 or len(f) != len(q) or len(f) % n:
        raise ValueError(f"{len(f)} fp32 and {len(q)} INT8 rows are not whole views of {n} labels")
    y = np.tile(labels, len(f) // n)
    per_image = ((f == y).astype(float) - (q == y)).reshape(-1, n).mean(0)
    se = per_image.std(ddof=1) / np.sqrt(n) if n > 1 else 0.0
    return {"drop_pt": float(100 * per_image.mean()), "drop_ucb_pt": float(100 * (per_image.mean() + Z_95 * se)),
            "disagreement": float(np.mean(f != q))}


def latency_fields(candidate: dict[str, Any], fp32: dict[str, Any]) -> dict[str, Any]:
    """A row's latency against fp32 from two ``latency_ms`` results of one interleaved
    :func:`~distill2deploy.deploy.latency.measure_latency_many` call: ``latency_ms`` (p50 per batch
    size), ``latency_ratio`` (p50 over fp32's, mean over batch sizes), ``latency_ratio_rounds`` (per
    round, the candidate's p50 over fp32's of the *same* round: a load change within a round hits
    both) and ``latency_ratio_range``, the middle half of those rounds, which :func:`pick` compares
    (one preempted round must not make a candidate tie with everything)."""
    per_bs = [np.asarray(candidate[bs]["round_p50"]) / np.asarray(fp32[bs]["round_p50"]) for bs in fp32]
    rounds = [float(r) for r in np.mean(per_bs, axis=0)]
    return {"latency_ms": {bs: candidate[bs]["p50"] for bs in candidate},
            "latency_ratio": float(np.mean([candidate[bs]["p50"] / fp32[bs]["p50"] for bs in fp32])),
            "latency_ratio_rounds": rounds,
            "latency_ratio_range": [float(v) for v in np.percentile(rounds, [25, 75])]}


def pick(rows: Sequence[dict[str, Any]], max_drop: float, score: str = "drop_pt") -> int | None:
    """Index of the row to keep: among rows whose ``score`` is within ``max_drop``, the fastest (lowest
    ``latency_ratio``) and every row tied with it, then the lowest ``score`` among those (then the
    lowest ratio). The search, and the quantize stage for its QAT row, decide on ``drop_ucb_pt``. A
    row is tied when the range of its per-round ratios (``latency_ratio_range``, [low, high]; the search uses their interquartile
    range) overlaps the fastest row's range; rows without ranges tie only on equal ratios. ``None``
    when no row fits."""
    fits = [i for i, r in enumerate(rows) if r[score] <= max_drop]
    if not fits:
        return None
    fastest = rows[min(fits, key=lambda i: (rows[i]["latency_ratio"], rows[i][score]))]
    top = fastest.get("latency_ratio_range", [fastest["latency_ratio"]] * 2)[1]
    tied = [i for i in fits if rows[i].get("latency_ratio_range", [rows[i]["latency_ratio"]])[0] <= top]
    return min(tied, key=lambda i: (rows[i][score], rows[i]["latency_ratio"]))
