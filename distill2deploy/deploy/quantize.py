"""Static INT8 quantization of an exported ONNX model with onnxruntime.quantization.

Defaults, measured on ResNet-56/CIFAR-100 with benchmarks/quantize_latency.py (onnxruntime 1.31,
2-core AVX-512 VNNI EPYC, fp32 and all variants timed interleaved in one run):

* QDQ format: onnxruntime fuses QuantizeLinear/DequantizeLinear around Conv/Add/Gemm into
  QLinearConv/QLinearAdd/QGemm at session load, and the file stays readable by any ONNX runtime.
* uint8 activations + int8 weights (U8S8): x86 int8 kernels are U8S8 (VNNI ``vpdpbusd`` multiplies
  unsigned by signed bytes). U8S8 ran at 0.43-0.45x fp32's p50 latency at batch 1 with one
  thread (0.55-0.70x with onnxruntime's default two threads on a busy machine) and ~0.47x at
  batch 64; S8S8 ran 1.3-2.3x *slower* than fp32 (int8 activations take a slower path).
* per-channel weight scales: same speed as per-tensor, top-1 72.25% vs 71.75% per-tensor (fp32:
  72.25%) -- BN-folded conv weights differ a lot in range between output channels.
* ``quant_pre_process`` (symbolic shape inference + onnxruntime's basic optimisation) first: speed
  and accuracy were identical with and without it on ResNet-56 (onnxruntime's session-time
  optimiser ends with the same fused graph), and it costs ~1 s. It stays on because it is what
  onnxruntime recommends before quantize_static: the quantizer relies on inferred tensor shapes
  (the TorchScript exporter writes none), and graphs with un-fused patterns (e.g. un-folded BN
  or Conv+Mul) are cleaned up before scales are chosen.
* ranges are computed here (:func:`calibrate`), not inside ``quantize_static``: ``quantize_static``
  forwards only ``CalibTensorRangeSymmetric``/``CalibMovingAverage``/... to its calibrator, never the
  histogram sizes, so ``entropy`` ran with 128 histogram bins and 128 quantized bins -- one
  candidate threshold, the whole range: scales identical to minmax on all 143 tensors of ResNet-56.
  With :data:`ENTROPY_BINS` bins 142 of 143 ranges differ. The ranges go to ``quantize_static``
  through its calibration cache, which also lets a search reuse one calibration for many variants.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

from .._io import atomic_path, refuse_overwrite, scratch_dir
from ..data import Split, preprocess, stratified_subset
from ..errors import UserError, suggest
from .evaluate import agreement, make_session, run_batched
from .export import _has_dynamic_batch
from .metadata import graph_input, load_model, set_props

_QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
#: ops that only a quantized graph has
_QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                        "MatMulInteger", "DynamicQuantizeLinear"})
_CALIB_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
    "distribution": CalibrationMethod.Distribution,
}

#: entropy (KL) calibration histogram: 512 bins searched down to 128 quantized bins, i.e. thresholds
#: from 1/4 of the observed range to all of it. 2048 bins (TensorRT's choice) reach 1/16 but took
#: 300 s instead of ~40 s on ResNet-56: onnxruntime's KL search is a Python loop over thresholds.
ENTROPY_BINS = {"num_bins": 512, "num_quantized_bins": 128}
_CALIB_OPTIONS = {"entropy": ENTROPY_BINS}


class BatchCalibrationReader(CalibrationDataReader):
    """Feeds calibration data in equal-size batches, dropping the remainder.

    onnxruntime's histogram calibrators (entropy, percentile) concatenate per-batch outputs and
    fail on a short last batch, so every batch has exactly ``batch_size`` samples.
    """

    def __init__(self, inputs: np.ndarray, input_name: str, batch_size: int) -> None:
        if batch_size < 1:
            raise UserError(f"calib_batch_size must be >= 1, got {batch_size}")
        self.input_name, self.batch_size = input_name, int(batch_size)
        self.num_batches = len(inputs) // self.batch_size
        self.inputs = np.ascontiguousarray(inputs[: self.num_batches * self.batch_size], dtype=np.float32)
        self._it: Iterator[dict[str, np.ndarray]] = self._batches()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(self.num_batches):
            yield {self.input_name: self.inputs[i * self.batch_size:(i + 1) * self.batch_size]}

    def __len__(self) -> int:
        return self.num_batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._batches()


def _choice(value: str, choices: dict[str, Any], what: str) -> Any:
    if value not in choices:
        hint = suggest(str(value), choices)
        raise UserError(f"unknown {what} {value!r}" + (f"; {hint}" if hint else ""),
                        fix="choose one of " + ", ".join(choices))
    return choices[value]


def _graph_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    return graph_input(model, fix="quantize a classifier exported by distill2deploy")


def calibration_inputs(train: Split, *, samples: int, batch_size: int, seed: int, mean: Sequence[float],
                       std: Sequence[float], input_size: int, batch_key: str) -> np.ndarray:
    """The calibration set of the quantize stage and the ``quantize`` command alike: ``samples`` training
    images (all of a smaller split) rounded down to whole batches of ``batch_size``, stratified by class
    with ``seed``, preprocessed as the model expects. ``batch_key`` (config key or flag) is named when the
    split holds less than one batch."""
    n = min(samples, len(train.labels)) // batch_size * batch_size
    if n == 0:
        raise UserError(f"the calibration set has {len(train.labels)} images, fewer than one batch of {batch_size}",
                        where=batch_key, fix=f"lower {batch_key}, or calibrate on more training images")
    idx = stratified_subset(train.labels, n, seed)
    return preprocess(train.images[idx], mean=mean, std=std, input_size=input_size)


def calibrate(model_path: Path, reader: BatchCalibrationReader, calibrate_method: str, cache_path: Path,
              work_dir: Path) -> Path:
    """Activation ranges of ``model_path`` on ``reader``'s batches, saved as onnxruntime's calibration
    cache at ``cache_path`` (what ``quantize_static(calibration_cache_path=...)`` reads back)."""
    calibrator = create_calibrator(model_path, None, augmented_model_path=str(work_dir / "augmented.onnx"),
                                   calibrate_method=_choice(calibrate_method, _CALIB_METHODS, "calibrate_method"),
                                   extra_options=dict(_CALIB_OPTIONS.get(calibrate_method, {})))
    reader.rewind()
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print bin counts per call
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
    save_tensors_data(ranges, cache_path)
    return cache_path


def quantize_int8(
    fp32_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    calib_inputs: np.ndarray,
    *,
    calib_batch_size: int = 32,
    activation_type: str = "uint8",
    weight_type: str = "int8",
    per_channel: bool = True,
    calibrate_method: str = "minmax",
    preprocess: bool = True,
    threads: int | None = None,
    nodes_to_exclude: Sequence[str] = (),
    calibration_cache: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Statically quantize ``fp32_path`` to QDQ INT8 at ``out_path`` (written atomically).

    ``calib_inputs`` are float32 NCHW, normalised like the model's inputs (a few hundred training
    images are enough for minmax). Only whole batches are used: ``calib_samples`` in the result is
    ``len(calib_inputs)`` rounded down to a multiple of ``calib_batch_size``. The fp32 model's
    metadata is copied and ``quantization`` (JSON of the settings) added. The result also reports
    ``calib_agreement``: how often the int8 and fp32 models agree on the calibration images, a
    cheap sanity check that is not an accuracy estimate. ``threads`` is onnxruntime's intra-op threads
    for that check. ``out_path`` may not be ``fp32_path``, and an already quantized model is refused.
    Intermediate files live in a hidden folder beside ``out_path``, removed even on failure.
    """
    act = _choice(activation_type, _QUANT_TYPES, "activation_type")
    wt = _choice(weight_type, _QUANT_TYPES, "weight_type")
    method = _choice(calibrate_method, _CALIB_METHODS, "calibrate_method")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    refuse_overwrite(out_path, [fp32_path], "--out")
    fp32 = load_model(fp32_path)
    quantized = sorted({n.op_type for n in fp32.graph.node if n.op_type in _QUANT_OPS})
    if quantized or any(p.key == "quantization" for p in fp32.metadata_props):
        raise UserError(f"the model is already quantized (it has {', '.join(quantized) or 'quantization metadata'})",
                        where=str(fp32_path), fix="quantize the fp32 model it came from (e.g. export/student.onnx)")
    graph_input = _graph_input(fp32)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in graph_input.type.tensor_type.shape.dim]
    if (not isinstance(calib_inputs, np.ndarray) or calib_inputs.ndim != len(dims)
            or any(d is not None and d != s for d, s in zip(dims[1:], calib_inputs.shape[1:]))):
        raise UserError(f"calibration inputs must be float32 of shape (N, {', '.join(map(str, dims[1:]))}), "
                        f"got {type(calib_inputs).__name__} {getattr(calib_inputs, 'shape', None)}",
                        where=str(fp32_path), fix="preprocess the images with the model's mean/std/input_size")
    if len(calib_inputs) < calib_batch_size:
        raise UserError(f"{len(calib_inputs)} calibration samples are fewer than one batch of {calib_batch_size}",
                        fix="give more calibration images or a smaller calib_batch_size")
    reader = BatchCalibrationReader(calib_inputs, graph_input.name, calib_batch_size)
    settings = {
        "format": "QDQ",
        "activation_type": activation_type,
        "weight_type": weight_type,
        "per_channel": bool(per_channel),
        "calibrate_method": calibrate_method,
        "calib_batch_size": int(calib_batch_size),
        "calib_samples": len(reader) * reader.batch_size,
        "preprocess": bool(preprocess),
        "nodes_to_exclude": sorted(nodes_to_exclude),
        "onnxruntime": ort.__version__,
    }
    if calibrate_method in _CALIB_OPTIONS:
        settings["calibrator"] = _CALIB_OPTIONS[calibrate_method]

    with scratch_dir(out_path, "quantize") as tmp:
        src = fp32_path
        if preprocess:
            src = Path(tmp) / "preprocessed.onnx"
            quant_pre_process(str(fp32_path), str(src))
        raw = Path(tmp) / "int8.onnx"
        cache = Path(calibration_cache) if calibration_cache is not None else Path(tmp) / "ranges.json"
        if not cache.is_file():
            calibrate(src, reader, calibrate_method, cache, Path(tmp))
        quantize_static(
            str(src), str(raw), None,
            quant_format=QuantFormat.QDQ,
            activation_type=act,
            weight_type=wt,
            per_channel=bool(per_channel),
            # reduce_range (7-bit weights) only matters on pre-VNNI AVX2/AVX-512 CPUs, where u8*s8
            # pairs can saturate; it costs accuracy, so it stays off.
            reduce_range=False,
            calibrate_method=method,
            nodes_to_exclude=list(nodes_to_exclude) or None,
            calibration_cache_path=str(cache),
        )
        model = onnx.load(str(raw))
    if not _has_dynamic_batch(_graph_input(model)):
        raise RuntimeError("quantization fixed the batch dimension")
    props = {p.key: p.value for p in fp32.metadata_props}
    props["quantization"] = json.dumps(settings)
    del model.metadata_props[:]  # drop the quantizer's own bookkeeping keys; keep ours
    set_props(model, props)
    onnx.checker.check_model(model)

    with atomic_path(out_path) as tmp_path:
        onnx.save(model, str(tmp_path))
        check = reader.inputs[: min(len(reader.inputs), 256)]
        q_logits = run_batched(make_session(tmp_path, threads=threads), check, 128)
        f_logits = run_batched(make_session(fp32_path, threads=threads), check, 128)
        if not np.isfinite(q_logits).all():
            raise RuntimeError("the quantized model produced non-finite logits")
    return {
        "path": str(out_path),
        "bytes": out_path.stat().st_size,
        "calib_samples": settings["calib_samples"],
        "calib_agreement": agreement(q_logits, f_logits),
        "settings": settings,
    }
