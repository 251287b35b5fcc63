"""Validate exported models side by side: accuracy, latency and int8-vs-fp32 agreement."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data import preprocess
from ..errors import UserError
from .evaluate import accuracy, agreement, make_session, run_batched
from .latency import measure_latency_many, spread
from .metadata import read_metadata
from .regression import paired_accuracy
from .runtimes import DEFAULT_RUNTIME, check_runtime

Images = np.ndarray | Callable[[dict[str, Any]], np.ndarray]


def per_model_inputs(images_uint8: np.ndarray) -> Callable[[dict[str, Any]], np.ndarray]:
    """``images`` for :func:`validate_models`: each model gets the preprocessing its metadata records (mean,
    std, input size), computed once per distinct preprocessing."""
    cache: dict[str, np.ndarray] = {}

    def images(meta: dict[str, Any]) -> np.ndarray:
        key = json.dumps([meta["mean"], meta["std"], meta["input_size"]])
        if key not in cache:
            cache[key] = preprocess(images_uint8, mean=meta["mean"], std=meta["std"], input_size=meta["input_size"])
        return cache[key]

    return images


def model_key(path: str | os.PathLike[str]) -> str:
    """Report key of a model file: the name without ``.onnx`` (``student.int8.onnx`` -> ``student.int8``)."""
    name = Path(path).name
    return name[: -len(".onnx")] if name.endswith(".onnx") else name


def model_names(paths: Sequence[str | os.PathLike[str]], names: Sequence[str] | None, *, where: str) -> list[str]:
    """One unique name per model file: ``names`` when given, else each file's :func:`model_key`."""
    out = list(names) if names else [model_key(p) for p in paths]
    if len(out) != len(paths) or len(set(out)) != len(out):
        raise UserError(f"model names must be unique, one per file, got {out}", where=where,
                        fix="rename the files or pass --name NAME once per model, in order")
    return out


def _fp32_sibling(key: str) -> str | None:
    return key[: -len(".int8")] if key.endswith(".int8") else None


def check_classes(meta: dict[str, Any], data_names: list[str], named: bool, path: Path) -> None:
    """Refuse a model whose metadata's classes are not the data's (by name, or by count without names)."""
    model_names = meta.get("class_names")
    count = len(model_names) if isinstance(model_names, list) else meta.get("num_classes")
    if count is None:
        return
    if count != len(data_names) or (named and isinstance(model_names, list) and model_names != data_names):
        differ = ""
        if count == len(data_names):
            i = next(i for i, (a, b) in enumerate(zip(model_names, data_names)) if a != b)
            differ = f"; class {i} is {model_names[i]!r} in the model but {data_names[i]!r} in the data"
        raise UserError(f"the model was trained on {count} classes but the data has {len(data_names)}{differ}: its "
                        "accuracy on these labels would be meaningless", where=str(path),
                        fix="validate with the data set the model was trained on (--data / data.source)")


def validate_models(
    paths: Sequence[str | os.PathLike[str]],
    images: Images,
    labels: np.ndarray,
    *,
    batch_sizes: Iterable[int] = (1, 64),
    warmup: int = 20,
    runs: int = 200,
    threads: int | None = None,
    progress: bool = True,
    eval_batch_size: int = 256,
    class_names: Sequence[str] | None = None,
    named: bool = True,
    keep_correct: bool = False,
    runtimes: Sequence[str] = (DEFAULT_RUNTIME,),
) -> dict[str, Any]:
    """Accuracy and latency of each model in onnxruntime (or other ``runtimes``), plus int8/fp32 agreement.

    ``images`` is either one float32 NCHW array (already normalised) used for every model, or a
    callable ``images(metadata) -> float32 NCHW`` called once per model with that model's parsed
    metadata (see :func:`~distill2deploy.deploy.metadata.read_metadata`), so models with different
    input sizes or normalisations are each fed what they were trained on. With a callable every
    model must carry distill2deploy metadata.

    Each ``X.int8.onnx`` is paired with ``X.onnx`` from ``paths`` (if present): ``agreement`` holds
    the fraction of equal argmax and ``latency_ratio`` the int8/fp32 ratio of p50 latency per batch
    size (below 1 means int8 is faster), ``latency_ratio_spread`` how much that ratio moved between
    the interleaved rounds, and ``top1_change`` the paired top-1 difference int8 - fp32 on the same
    images with its 95% interval (see :func:`~distill2deploy.deploy.regression.paired_accuracy`).
    With ``keep_correct`` the result also holds ``correct``: per model, the per-image top-1 hits
    (a numpy array, for baselines; drop it before writing JSON).

    ``class_names`` are the data's classes (``named=False``: only their count is meaningful): a
    model whose metadata lists other classes is refused rather than scored against the wrong labels.
    Logits are read from the metadata's ``output_name`` when the model has one.

    ``runtimes`` (see :mod:`.runtimes`): the first is the one every figure above is measured in;
    each further runtime runs the same files on the same images, timed in the same interleaved
    rounds, and lands in ``result["runtimes"][name][key]`` (``accuracy``, ``latency_ms``,
    ``throughput_ips``, ``correct``-free): :func:`~.runtime_report.runtime_summary` compares them.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no models to validate", fix="pass at least one .onnx file")
    keys = [model_key(p) for p in paths]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise UserError(f"several models share the name(s) {dupes}; the report is keyed by file name",
                        fix="validate them separately or rename them")
    labels = np.asarray(labels).reshape(-1)
    batch_sizes = tuple(int(b) for b in batch_sizes)
    runtimes = [check_runtime(r, where="validate.runtimes") for r in runtimes]
    if not runtimes or len(set(runtimes)) != len(runtimes):
        raise UserError(f"runtimes must be distinct and at least one, got {runtimes}", where="validate.runtimes",
                        fix="e.g. [onnxruntime, openvino]")
    first, others = runtimes[0], runtimes[1:]

    models: dict[str, Any] = {}
    logits: dict[str, np.ndarray] = {}
    other: dict[str, dict[str, Any]] = {r: {} for r in others}
    other_logits: dict[str, dict[str, np.ndarray]] = {r: {} for r in others}
    sizes = []
    for key, path in zip(keys, paths):
        meta = read_metadata(path, require=callable(images))
        if class_names is not None:
            check_classes(meta, list(class_names), named, path)
        x = images(meta) if callable(images) else images
        if not isinstance(x, np.ndarray) or x.ndim != 4:
            raise UserError(f"images for {key} must be a float32 NCHW array, got "
                            f"{type(x).__name__} {getattr(x, 'shape', None)}")
        if len(x) != len(labels):
            raise UserError(f"{len(x)} images but {len(labels)} labels")
        for runtime in runtimes:
            out = run_batched(make_session(path, threads=threads, runtime=runtime), x, eval_batch_size,
                              output_name=meta.get("output_name"))
            if runtime == first:
                logits[key] = out
            else:
                other_logits[runtime][key] = out
                other[runtime][key] = {"accuracy": accuracy(out, labels)}
        sizes.append(int(meta.get("input_size", x.shape[-1])))
        models[key] = {"path": str(path), "bytes": path.stat().st_size,
                       "accuracy": accuracy(logits[key], labels)}
    # All models (on every runtime) timed together, interleaved, so that their latency ratios are fair.
    lats = measure_latency_many([p for p in paths for _ in runtimes], input_sizes=[s for s in sizes for _ in runtimes],
                                runtimes=list(runtimes) * len(paths), batch_sizes=batch_sizes, warmup=warmup,
                                runs=runs, threads=threads, progress=progress)
    for i, key in enumerate(keys):
        for j, runtime in enumerate(runtimes):
            lat = lats[i * len(runtimes) + j]
            block = models[key] if runtime == first else other[runtime][key]
            block["latency_ms"], block["throughput_ips"] = lat["latency_ms"], lat["throughput_ips"]
            if runtime != first:
                block["agreement"] = agreement(other_logits[runtime][key], logits[key])
                block["top1_change"] = paired_accuracy(logits[key].argmax(1) == labels,
                                                       other_logits[runtime][key].argmax(1) == labels)
                block["machine"] = lat["settings"]["machine"]

    pairs = {}
    latency_ratio, ratio_spread, top1_change = {}, {}, {}
    correct = {k: v.argmax(1) == labels for k, v in logits.items()}
    for key in keys:
        ref = _fp32_sibling(key)
        if ref is None or ref not in logits:
            continue
        pair = f"{key} vs {ref}"
        if logits[key].shape != logits[ref].shape:
            raise UserError(f"{key} and {ref} output different shapes "
                            f"{logits[key].shape} vs {logits[ref].shape}")
        pairs[pair] = agreement(logits[key], logits[ref])
        latency_ratio[pair] = {
            bs: models[key]["latency_ms"][bs]["p50"] / models[ref]["latency_ms"][bs]["p50"]
            for bs in models[key]["latency_ms"]
        }
        ratio_spread[pair] = {bs: spread(np.asarray(models[key]["latency_ms"][bs]["round_p50"])
                                          / np.asarray(models[ref]["latency_ms"][bs]["round_p50"]))
                              for bs in models[key]["latency_ms"]}
        top1_change[pair] = paired_accuracy(correct[ref], correct[key])
    result = {"models": models, "agreement": pairs, "latency_ratio": latency_ratio,
              "latency_ratio_spread": ratio_spread, "top1_change": top1_change,
              "settings": {"batch_sizes": list(batch_sizes), **lats[0]["settings"]}}
    if others:
        result["runtimes"] = other
    if keep_correct:
        result["correct"] = correct
    return result

