"""Deployment: ONNX export, INT8 quantization and validation in onnxruntime."""
from __future__ import annotations

from .evaluate import accuracy, agreement, predict_onnx
from .export import export_onnx
from .latency import measure_latency
from .metadata import METADATA_KEYS, build_metadata, read_metadata
from .plots import plot_accuracy_latency
from .quantize import BatchCalibrationReader, quantize_int8
from .validate import model_key, validate_models

__all__ = [
    "METADATA_KEYS", "BatchCalibrationReader", "accuracy", "agreement", "build_metadata", "export_onnx",
    "measure_latency", "model_key", "plot_accuracy_latency", "predict_onnx", "quantize_int8",
    "read_metadata", "validate_models",
]
