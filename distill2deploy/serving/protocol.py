"""The Open Inference Protocol (KServe v2) JSON messages and their checks against a model.

Triton, KServe, MLServer and OpenVINO Model Server all speak this protocol, so a client written for
any of them can call this server. Request bodies are pydantic models (FastAPI answers malformed
JSON and missing fields itself); :func:`request_tensor` then checks the tensor against the ONNX
graph and turns every mismatch into a :class:`ProtocolError` that names the expected value.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, Field

#: Open Inference Protocol datatype names -> numpy dtypes (the protocol's "Tensor Data Types").
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(bool), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
#: onnxruntime's type strings -> protocol datatypes.
ORT_TO_DATATYPE = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
                   "tensor(uint8)": "UINT8", "tensor(int8)": "INT8", "tensor(int32)": "INT32",
                   "tensor(int64)": "INT64", "tensor(bool)": "BOOL"}


class ProtocolError(Exception):
    """A request the protocol or the model rejects; rendered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class TensorSpec(BaseModel):
    """One graph input/output as the metadata endpoint reports it (-1: any size, here the batch axis)."""

    name: str
    datatype: str
    shape: list[int]


def tensor_spec(node: Any) -> TensorSpec:
    """An onnxruntime ``NodeArg`` or a session's :class:`~distill2deploy.deploy.runtimes.Port` ->
    :class:`TensorSpec` (symbolic dims become -1)."""
    return TensorSpec(name=node.name, datatype=ORT_TO_DATATYPE.get(node.type, node.type),
                      shape=[d if isinstance(d, int) else -1 for d in node.shape])


def request_tensor(req: InferenceRequest, spec: TensorSpec, output: str) -> np.ndarray:
    """The request's one input as an array of ``spec``'s dtype and shape; :class:`ProtocolError` otherwise."""
    if len(req.inputs) != 1:
        raise ProtocolError(400, f"the model has one input {spec.name!r}, the request has {len(req.inputs)}")
    inp = req.inputs[0]
    if inp.name != spec.name:
        raise ProtocolError(400, f"unknown input {inp.name!r}; the model's input is {spec.name!r}")
    if inp.datatype != spec.datatype:
        raise ProtocolError(400, f"input {inp.name!r} has datatype {inp.datatype!r}, the model expects "
                            f"{spec.datatype!r}")
    for o in req.outputs or []:
        if o.name != output:
            raise ProtocolError(400, f"unknown output {o.name!r}; the model's output is {output!r}")
    want = spec.shape
    ok = len(inp.shape) == len(want) and inp.shape[0] >= 1 and all(
        w in (-1, g) for w, g in zip(want[1:], inp.shape[1:]))
    if not ok:
        raise ProtocolError(400, f"input {inp.name!r} has shape {inp.shape}, the model expects {want} "
                            "(-1: any batch size >= 1)")
    try:
        arr = np.asarray(inp.data, dtype=DATATYPES[spec.datatype])
    except (ValueError, TypeError, OverflowError):
        raise ProtocolError(400, f"input {inp.name!r}: data must be {spec.datatype} numbers "
                            "(a flat row-major list or nested lists)") from None
    if arr.size != int(np.prod(inp.shape)):
        raise ProtocolError(400, f"input {inp.name!r}: shape {inp.shape} needs {int(np.prod(inp.shape))} "
                            f"values, data has {arr.size}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ProtocolError(400, f"input {inp.name!r}: data contains NaN or infinity")
    return arr.reshape(inp.shape)


def response_tensor(name: str, arr: np.ndarray) -> dict[str, Any]:
    """One output tensor in the protocol's JSON form (flat row-major data)."""
    datatype = next(k for k, v in DATATYPES.items() if v == arr.dtype)
    return {"name": name, "shape": list(arr.shape), "datatype": datatype, "data": arr.ravel().tolist()}
