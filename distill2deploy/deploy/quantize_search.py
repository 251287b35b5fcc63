"""Search INT8 variants under an accuracy budget: keep the fastest one that is accurate enough.

Which quantization settings are best depends on the network (measured in issue 11: per-tensor
weights were 5-7% faster at batch 1 for the depthwise-heavy students at no accuracy cost, but cost
ResNet-56 0.5 pt; percentile calibration gave ShuffleNetV2 1-2 points more INT8/fp32 agreement), so
instead of one default, candidates are built, scored and timed like Olive's auto-optimizer does:

* **accuracy** on a held-out slice of the *training* data (:func:`held_out_split`) and on seeded
  "unseen views" of it (:mod:`.quantize_score`): the test split stays untouched for validate, and
  the slice never overlaps the calibration images. A candidate fits when the one-sided 95% upper
  bound of its paired drop (``drop_ucb_pt``) is within the budget: a network that memorised its
  training images shows no drop on them at all, the views and the bound do;
* **latency** with explicit threads, all candidates and fp32 interleaved in rounds
  (:func:`~distill2deploy.deploy.latency.measure_latency_many`), so load on a shared machine hits
  them alike; "fastest" is the mean over batch sizes of p50 latency relative to fp32, and
  candidates whose per-round ratios (their interquartile ranges) overlap the fastest one's are tied:
  the lowest bound wins;
* **nodes kept in float** are chosen with onnxruntime's QDQ debugging tools
  (``qdq_loss_debug``): the activations with the lowest signal-to-quantization-noise ratio in the
  best-scoring plain per-channel candidate stay float (their producer and consumer nodes are excluded).

Activation type ``int8`` (S8S8) is not searched by default: on x86 onnxruntime's int8 kernels are
U8S8 (VNNI multiplies unsigned by signed bytes) and S8S8 ran 1.3-2.3x *slower* than fp32 on
ResNet-56 (see :mod:`~distill2deploy.deploy.quantize`); add it to the activation types to measure.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .._io import atomic_path, scratch_dir
from ..data import stratified_subset
from ..errors import UserError
from .evaluate import accuracy, agreement, make_session, run_batched
from .latency import measure_latency_many
from .quantize import quantize_int8
from .quantize_score import latency_fields, paired_drop, pick, unseen_views


#: fp32 top-1 on the held-out training slice from which its drops say little (see search_int8)
MEMORISED = 0.995


@dataclass(frozen=True)
class Candidate:
    """One set of quantize_int8 settings."""

    per_channel: bool = True
    calibrate_method: str = "minmax"
    calib_samples: int = 512
    activation_type: str = "uint8"
    #: the k activations with the worst SQNR kept in float (0: everything quantized)
    float_activations: int = 0

    @property
    def name(self) -> str:
        act = "u8" if self.activation_type == "uint8" else "s8"
        base = f"{'pc' if self.per_channel else 'pt'}-{self.calibrate_method}-{self.calib_samples}-{act}"
        return base + (f"-float{self.float_activations}" if self.float_activations else "")


def candidate_grid(methods: Sequence[str], calib_sizes: Sequence[int],
                   activation_types: Sequence[str] = ("uint8",)) -> list[Candidate]:
    """Every combination of weight granularity, calibration method and size, and activation type."""
    return [Candidate(per_channel=pc, calibrate_method=m, calib_samples=int(n), activation_type=a)
            for a in dict.fromkeys(activation_types) for m in dict.fromkeys(methods)
            for n in sorted(set(calib_sizes)) for pc in (True, False)]


def held_out_split(labels: np.ndarray, calib_samples: int, eval_samples: int, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, evaluation) indices into the *training* labels, disjoint and both stratified.

    The evaluation slice is drawn first (at most half the images), calibration from the rest, so a
    small training set still gets both; callers must never pass test labels here.
    """
    labels = np.asarray(labels)
    n_eval = min(int(eval_samples), len(labels) // 2)
    if n_eval < 1:
        raise UserError(f"{len(labels)} training images are too few to hold out an evaluation slice",
                        where="quantize.search_samples", fix="give more training images")
    eval_idx = stratified_subset(labels, n_eval, seed)
    rest = np.setdiff1d(np.arange(len(labels)), eval_idx)
    calib_idx = rest[stratified_subset(labels[rest], min(int(calib_samples), len(rest)), seed + 1)]
    return calib_idx, eval_idx


def worst_sqnr_nodes(float_path: Path, qdq_path: Path, inputs: np.ndarray, k: int, work: Path
                     ) -> tuple[list[str], list[dict[str, Any]]]:
    """Node names to exclude so that the ``k`` activations of ``qdq_path`` with the lowest local SQNR
    (onnxruntime's ``qdq_err``: the tensor before vs after its QuantizeLinear/DequantizeLinear) stay
    float. ``float_path`` is the graph ``qdq_path`` was quantized from (the same tensor names)."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    from .quantize import BatchCalibrationReader

    name = make_session(float_path).inputs[0].name
    acts = {}
    for tag, path in (("float", float_path), ("qdq", qdq_path)):
        aug = work / f"{tag}.debug.onnx"
        modify_model_output_intermediate_tensors(str(path), str(aug))
        acts[tag] = collect_activations(str(aug), BatchCalibrationReader(inputs, name, len(inputs)))
    errors = compute_activation_error(create_activation_matching(acts["qdq"], acts["float"]))
    ranked = sorted(((e["qdq_err"], t) for t, e in errors.items() if np.isfinite(e.get("qdq_err", np.nan))))
    graph = onnx.load(str(float_path)).graph
    nodes: list[str] = []
    for _, tensor in ranked[:k]:
        for node in graph.node:
            if (tensor in node.output or tensor in node.input) and node.name not in nodes:
                nodes.append(node.name)
    return nodes, [{"tensor": t, "sqnr_db": float(e)} for e, t in ranked[:k]]


def search_int8(fp32_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *, calib_pool: np.ndarray,
                eval_inputs: np.ndarray, eval_labels: np.ndarray, candidates: Sequence[Candidate],
                view_inputs: np.ndarray | None = None,
                float_activations: Sequence[int] = (), max_drop: float = 1.0, threads: int,
                batch_sizes: Sequence[int] = (1, 64), runs: int = 60, rounds: int = 6,
                calib_batch_size: int = 32, input_size: int, progress: bool = True,
                on_candidate: Callable[[dict[str, Any], Path], None] | None = None) -> dict[str, Any]:
    """Quantize ``fp32_path`` with every candidate, score and time them, and write the fastest one within
    ``max_drop`` top-1 points of fp32 (95% bound on ``eval_inputs`` and ``view_inputs``) to ``out_path``.

    ``calib_pool`` holds the calibration images (the first ``calib_samples`` are used by each
    candidate); ``view_inputs`` holds k views of each ``eval_inputs`` image, view-major
    (:func:`~.quantize_score.unseen_views`): candidates are scored on both, and fit when the upper
    bound of their drop (``drop_ucb_pt``) is within ``max_drop``; ``drop_pt`` and ``top1`` stay the
    plain slice's. Each ``float_activations`` entry adds a variant of the best-scoring per-channel
    candidate with that many worst-SQNR activations in float. ``on_candidate(row, path)`` sees each
    candidate's file while it exists (the benchmark scores it on the test split; the search never
    does). When nothing fits, the candidate with the lowest bound is written and ``within_budget`` is
    false (the caller may then train with fake quantization instead). Returns the table of every
    candidate (``rows``) and the choice.
    """
    if threads is None or int(threads) < 1:
        raise ValueError("the search times candidates with an explicit thread count")
    if view_inputs is not None and len(view_inputs) % len(eval_labels):
        raise ValueError(f"{len(view_inputs)} view inputs are not whole views of {len(eval_labels)} images")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    rows: list[dict[str, Any]] = []
    with scratch_dir(out_path, "search") as tmp:
        tmp = Path(tmp)
        n_eval = len(eval_labels)
        scored = eval_inputs if view_inputs is None else np.concatenate([eval_inputs, view_inputs])
        f_all = run_batched(make_session(fp32_path, threads=threads), scored, 128)
        f_logits = f_all[:n_eval]
        fp32_top1 = accuracy(f_logits, eval_labels)["top1"]
        views = len(scored) // n_eval - 1
        fp32_view_top1 = (accuracy(f_all[n_eval:], np.tile(eval_labels, views))["top1"] if views else None)
        warning = None
        seen = min(fp32_top1, fp32_view_top1 if views else 1.0)
        if seen >= MEMORISED:
            # measured: pretrained ResNet-56 scored 100% on its training images, every minmax/percentile
            # candidate too, yet the kept per-tensor one lost 1.25 points on the test split (67% on its views)
            where = "the held-out training images" + (" and their unseen views" if views else "")
            warning = (f"fp32 scores {100 * seen:.1f}% or more on {where}: the model has memorised them, so the "
                       "drops measured there understate what INT8 costs on new images"
                       + ("" if views else " (set quantize.search_views)"))
            print(f"[quantize search] warning: {warning}")
        paths: list[Path] = []

        def fit(c: Candidate) -> Candidate:  # whole batches of what the pool holds
            return replace(c, calib_samples=min(c.calib_samples, len(calib_pool)) // calib_batch_size * calib_batch_size)

        def build(c: Candidate, exclude: Sequence[str] = ()) -> dict[str, Any]:
            n = c.calib_samples
            cache = tmp / f"ranges-{c.calibrate_method}-{n}.json"  # one calibration per method and size
            path = tmp / f"{c.name}.onnx"
            info = quantize_int8(fp32_path, path, calib_pool[:n], calib_batch_size=calib_batch_size,
                                 activation_type=c.activation_type, per_channel=c.per_channel,
                                 calibrate_method=c.calibrate_method, threads=threads,
                                 nodes_to_exclude=exclude, calibration_cache=cache)
            q_all = run_batched(make_session(path, threads=threads), scored, 128)
            logits = q_all[:n_eval]
            top1 = accuracy(logits, eval_labels)["top1"]
            score = paired_drop(f_all, q_all, eval_labels)
            row = {"name": c.name, **asdict(c), "top1": top1, "drop_pt": 100 * (fp32_top1 - top1),
                   "agreement": agreement(logits, f_logits), "est_drop_pt": score["drop_pt"],
                   "drop_ucb_pt": score["drop_ucb_pt"], "disagreement": score["disagreement"],
                   "bytes": info["bytes"], "nodes_to_exclude": list(exclude)}
            rows.append(row)
            paths.append(path)
            if on_candidate is not None:
                on_candidate(row, path)
            if progress:
                print(f"[quantize search] {c.name}: top-1 {100 * top1:.2f}% (fp32 {100 * fp32_top1:.2f}%), "
                      f"drop {score['drop_pt']:+.2f} pts, bound {score['drop_ucb_pt']:+.2f} over {views} view(s) + "
                      f"the image")
            return row

        # sizes above the pool fit to the same one: each distinct candidate is built, scored and timed once
        for c in dict.fromkeys(fit(c) for c in candidates):
            build(c)
        sqnr: list[dict[str, Any]] = []
        base = min((r for r in rows if r["per_channel"] and not r["float_activations"]),
                   key=lambda r: r["drop_ucb_pt"], default=None)
        if base is not None and any(k > 0 for k in float_activations):
            from onnxruntime.quantization import quant_pre_process

            pre = tmp / "preprocessed.onnx"  # the graph quantize_int8 quantizes: the same node names
            quant_pre_process(str(fp32_path), str(pre))
            qdq = paths[rows.index(base)]
            for k in sorted({int(k) for k in float_activations if k > 0}):
                exclude, sqnr = worst_sqnr_nodes(pre, qdq, eval_inputs[:64], k, tmp)
                fields = {f: base[f] for f in ("per_channel", "calibrate_method", "calib_samples", "activation_type")}
                build(Candidate(**fields, float_activations=k), exclude)

        # a few warm-up runs per model: the interleaved rounds already spread any warm-up left over
        timed = measure_latency_many([fp32_path, *paths], input_sizes=[input_size] * (len(paths) + 1),
                                     batch_sizes=batch_sizes, runs=runs, rounds=rounds, threads=threads,
                                     warmup=3, progress=progress)
        for row, t in zip(rows, timed[1:]):
            row.update(latency_fields(t["latency_ms"], timed[0]["latency_ms"]))
        chosen = pick(rows, max_drop, score="drop_ucb_pt")
        written = chosen if chosen is not None else min(range(len(rows)), key=lambda i: rows[i]["drop_ucb_pt"])
        with atomic_path(out_path) as dst:
            shutil.copyfile(paths[written], dst)
    return {
        "max_drop_pt": float(max_drop), "eval_samples": int(len(eval_labels)), "fp32_top1": fp32_top1,
        "views": views, "fp32_view_top1": fp32_view_top1, "score": "drop_ucb_pt",
        "fp32_latency_ms": {bs: v["p50"] for bs, v in timed[0]["latency_ms"].items()}, "threads": int(threads), "runs": int(runs), "rounds": int(rounds),
        "rows": rows, "worst_sqnr": sqnr, "warning": warning,
        "chosen": rows[written]["name"], "within_budget": chosen is not None,
        "settings": timed[0]["settings"],
    }


def search_from_config(fp32_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *, images: np.ndarray,
                       labels: np.ndarray, q: Any, mean: Sequence[float], std: Sequence[float], input_size: int,
                       seed: int, threads: int, batch_sizes: Sequence[int],
                       on_candidate: Callable[[dict[str, Any], Path], None] | None = None) -> dict[str, Any]:
    """:func:`search_int8` with the ``quantize.*`` settings of a config (``q``, a ``QuantizeConfig``) on
    uint8 NHWC *training* ``images``: what the pipeline's quantize stage and ``quantize --search`` run."""
    from ..data import preprocess

    calib_idx, eval_idx = held_out_split(labels, max(q.search_calib_samples), q.search_samples, seed)
    prep = {"mean": mean, "std": std, "input_size": input_size}
    print(f"[quantize search] {len(eval_idx)} held-out training images score (each also as {q.search_views} "
          f"unseen views), {len(calib_idx)} calibrate; budget {q.max_drop} top-1 points")
    views = unseen_views(images[eval_idx], q.search_views, seed) if q.search_views else None
    return search_int8(fp32_path, out_path, calib_pool=preprocess(images[calib_idx], **prep),
                       eval_inputs=preprocess(images[eval_idx], **prep), eval_labels=labels[eval_idx],
                       view_inputs=None if views is None else preprocess(views, **prep),
                       candidates=candidate_grid(q.search_methods, q.search_calib_samples,
                                                 q.search_activation_types),
                       float_activations=q.search_float_activations, max_drop=q.max_drop, threads=threads,
                       batch_sizes=batch_sizes, runs=q.search_runs, calib_batch_size=q.calib_batch_size,
                       input_size=input_size, on_candidate=on_candidate)
