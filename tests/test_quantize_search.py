"""Quantization search, calibration methods and quantization-aware distillation (issue 11)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from distill2deploy.deploy import quantize_int8

from .test_deploy import _inputs, exported  # noqa: F401  (the tiny exported model fixture)


def _activation_scales(path) -> dict[str, float]:
    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in proto.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def test_entropy_calibration_is_not_minmax(exported, tmp_path):  # noqa: F811
    """onnxruntime's quantize_static ran entropy with as many histogram bins as quantized bins, i.e.
    minmax; calibrated here, entropy clips the long tails of heavy-tailed activations."""
    x = _inputs(64, seed=3) * np.random.default_rng(4).standard_t(2, size=(64, 1, 1, 1)).astype(np.float32)
    scales = {}
    for method in ("minmax", "entropy"):
        quantize_int8(exported[0], tmp_path / f"{method}.onnx", x, calibrate_method=method, preprocess=False)
        scales[method] = _activation_scales(tmp_path / f"{method}.onnx")
    assert scales["minmax"].keys() == scales["entropy"].keys() and scales["minmax"]
    differ = [k for k in scales["minmax"] if not np.isclose(scales["minmax"][k], scales["entropy"][k])]
    assert len(differ) >= len(scales["minmax"]) // 2
    # the KL threshold lies inside the observed range: never a wider scale than minmax
    assert all(scales["entropy"][k] <= scales["minmax"][k] * (1 + 1e-6) for k in scales["minmax"])
