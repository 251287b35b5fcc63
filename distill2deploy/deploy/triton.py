"""A Triton Inference Server model repository from exported ONNX files.

Layout (Triton's documented one)::

    REPO/<name>/config.pbtxt
    REPO/<name>/labels.txt        class names, one a line, wired to the output by label_filename
    REPO/<name>/1/model.onnx

The config is written out in full rather than left to Triton's auto-complete, so what is served
(batch limit, batching delay, thread counts) is reviewable in the repository and does not change
with the Triton version. Names, datatypes and dims come from the ONNX graph itself; dims omit the
batch axis because ``max_batch_size > 0`` makes Triton add it.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from .. import _io
from ..errors import UserError
from .metadata import graph_input, load_model, read_metadata
from .validate import model_names

#: ONNX element type -> Triton ``DataType`` enum name (the types an exported classifier can have).
_TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.BOOL: "TYPE_BOOL",
}
LABELS_FILE = "labels.txt"


def _tensor_spec(vi: onnx.ValueInfoProto, where: str) -> dict[str, Any]:
    """Name, Triton datatype and dims without the batch axis of one graph input/output."""
    tt = vi.type.tensor_type
    if tt.elem_type not in _TRITON_TYPES:
        raise UserError(f"tensor {vi.name!r} has ONNX element type {tt.elem_type}, which Triton cannot serve",
                        where=where)
    dims = list(tt.shape.dim)
    if not dims or dims[0].HasField("dim_value"):
        raise UserError(f"tensor {vi.name!r} has no dynamic batch axis (shape "
                        f"{[d.dim_value or d.dim_param for d in dims]})", where=where,
                        fix="re-export with distill2deploy, which makes axis 0 dynamic")
    rest = [d.dim_value if d.HasField("dim_value") else -1 for d in dims[1:]]
    return {"name": vi.name, "data_type": _TRITON_TYPES[tt.elem_type], "dims": rest}


def _block(key: str, spec: dict[str, Any], extra: str = "") -> str:
    dims = ", ".join(str(d) for d in spec["dims"])
    return (f"{key} [\n  {{\n    name: {json.dumps(spec['name'])}\n    data_type: {spec['data_type']}\n"
            f"    dims: [ {dims} ]\n{extra}  }}\n]\n")


def triton_config(model: onnx.ModelProto, *, name: str, class_names: Sequence[str], max_batch: int,
                  instances: int, threads: int, max_delay_us: int, where: str = "model") -> str:
    """The ``config.pbtxt`` text (protobuf text format of Triton's ``ModelConfig``)."""
    graph_in = graph_input(model, where=where)
    if len(model.graph.output) != 1:
        raise UserError(f"expected one output, got {len(model.graph.output)}", where=where,
                        fix="export a single-output classifier with distill2deploy")
    inp, out = _tensor_spec(graph_in, where), _tensor_spec(model.graph.output[0], where)
    if out["dims"] != [len(class_names)]:
        raise UserError(f"output {out['name']!r} has dims {out['dims']} but the metadata lists "
                        f"{len(class_names)} class names", where=where, fix="re-export the model")
    for flag, value in (("--max-batch", max_batch), ("--instances", instances), ("--threads", threads)):
        if int(value) < 1:
            raise UserError(f"{flag} must be >= 1, got {value}", where="export-triton")
    return (
        f"name: {json.dumps(name)}\n"
        'backend: "onnxruntime"\n'
        f"max_batch_size: {int(max_batch)}\n"
        + _block("input", inp, "    format: FORMAT_NCHW\n" if len(inp["dims"]) == 3 else "")
        + _block("output", out, f"    label_filename: {json.dumps(LABELS_FILE)}\n")
        + f"dynamic_batching {{\n  max_queue_delay_microseconds: {int(max_delay_us)}\n}}\n"
        + f"instance_group [\n  {{\n    count: {int(instances)}\n    kind: KIND_CPU\n  }}\n]\n"
        # The onnxruntime backend reads these model parameters; without them every instance sizes its
        # pools to all cores, and several instances oversubscribe the CPU.
        + f'parameters {{\n  key: "intra_op_thread_count"\n  value: {{ string_value: "{int(threads)}" }}\n}}\n'
        + 'parameters {\n  key: "inter_op_thread_count"\n  value: { string_value: "1" }\n}\n'
    )


def export_triton(onnx_paths: Sequence[str | os.PathLike[str]], repo: str | os.PathLike[str], *,
                  names: Sequence[str] | None = None, max_batch: int = 32, instances: int = 1,
                  threads: int = 1, max_delay_us: int = 5000) -> list[Path]:
    """Write one Triton model directory per ONNX file under ``repo``; returns the directories.

    Each model directory is built aside and renamed into place (:func:`_io.atomic_dir`), so a
    Triton polling the repository never sees half a model. Other models already in ``repo`` stay.
    """
    names = model_names(onnx_paths, names, where="export-triton")
    written = []
    for path, name in zip(onnx_paths, names):
        meta = read_metadata(path)
        model = load_model(path)
        text = triton_config(model, name=name, class_names=meta["class_names"], max_batch=max_batch,
                             instances=instances, threads=threads, max_delay_us=max_delay_us, where=str(path))
        target = Path(repo) / name
        with _io.atomic_dir(target) as tmp:
            (tmp / "1").mkdir()
            shutil.copyfile(path, tmp / "1" / "model.onnx")
            (tmp / "config.pbtxt").write_text(text)
            (tmp / LABELS_FILE).write_text("".join(f"{c}\n" for c in meta["class_names"]))
        written.append(target)
    return written
