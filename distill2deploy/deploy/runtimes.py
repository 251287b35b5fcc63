"""Inference runtimes behind one small session interface: onnxruntime (default) and OpenVINO (optional extra).

Both run the *same* ONNX file (OpenVINO reads ONNX directly, QDQ INT8 included), so validate,
check, serve and predict can measure or serve a model on either without a conversion step. A
session here is what those commands need and no more: the input's name and shape, the output
names, and ``run(batch) -> array``. Each backend keeps its own options explicit, because the
defaults differ in ways that change the numbers:

- threads: onnxruntime's intra-op pool and OpenVINO's ``INFERENCE_NUM_THREADS`` both follow the
  project's ``threads`` / ``--threads`` (one stream, so a call runs on that many threads);
- precision: OpenVINO's CPU plugin runs fp32 graphs in bf16 by default on CPUs with bf16 units
  (AMX / AVX512_BF16); ``INFERENCE_PRECISION_HINT`` is set to f32 so an fp32 model is measured
  and served as fp32 (INT8 QDQ graphs still run their quantized ops as INT8);
- shapes: OpenVINO compiles a static batch per batch size it is called with (see
  :class:`OpenVinoSession`), because its dynamic-batch path costs more per call than a small net;
- graph rewrites: onnxruntime runs with every optimisation but :data:`DISABLED_ORT_OPTIMIZERS`,
  which would change what an INT8 file computes.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from ..errors import UserError

RUNTIMES = ("onnxruntime", "openvino")
DEFAULT_RUNTIME = "onnxruntime"
OPENVINO_INSTALL = 'pip install "distill2deploy[openvino]"'


class Port(NamedTuple):
    """A graph input or output, as onnxruntime's ``NodeArg`` describes it (same attribute names)."""

    name: str
    #: ONNX type string, e.g. ``tensor(float)``
    type: str
    #: dims: ``int`` where fixed, a name or None where dynamic (the batch)
    shape: list[Any]


class Session(Protocol):
    """A loaded model on one runtime. ``run`` is not re-entrant: one caller at a time (serve's
    batcher has one worker per model; validate and check call it from one thread)."""

    runtime: str
    inputs: list[Port]
    outputs: list[Port]

    def run(self, batch: np.ndarray, output_name: str | None = None) -> np.ndarray:
        """Outputs of one float32 batch for the first input: the output ``output_name``, or the first."""


def check_runtime(name: str, where: str = "--runtime") -> str:
    if name not in RUNTIMES:
        raise UserError(f"unknown runtime {name!r}", where=where, fix=f"use one of: {', '.join(RUNTIMES)}")
    return name


def _openvino(where: str = "--runtime openvino") -> Any:
    """The ``openvino`` module, or the UserError that says how to install it."""
    try:
        import openvino
    except ImportError:
        raise UserError("the openvino runtime is not installed", where=where,
                        fix=f"install the extra: {OPENVINO_INSTALL} (or use the onnxruntime runtime)") from None
    return openvino


def runtime_version(name: str, where: str = "--runtime") -> str:
    """Version of an installed runtime (a missing OpenVINO is the install UserError, naming ``where``)."""
    if check_runtime(name, where) == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    return _openvino(where).__version__.split("-")[0]


class OnnxRuntimeSession:
    """An onnxruntime ``InferenceSession`` (built by :func:`make_session`)."""

    runtime = "onnxruntime"

    def __init__(self, session: Any) -> None:
        self.ort = session  # the raw session, for onnxruntime-only tools (profiling, providers)
        self.inputs = [Port(p.name, p.type, list(p.shape)) for p in session.get_inputs()]
        self.outputs = [Port(p.name, p.type, list(p.shape)) for p in session.get_outputs()]

    def run(self, batch: np.ndarray, output_name: str | None = None) -> np.ndarray:
        return self.ort.run([output_name or self.outputs[0].name], {self.inputs[0].name: batch})[0]


#: OpenVINO element types -> ONNX type strings (what the server reports as the tensor's datatype)
_OV_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "f64": "tensor(double)", "u8": "tensor(uint8)",
             "i8": "tensor(int8)", "i32": "tensor(int32)", "i64": "tensor(int64)", "boolean": "tensor(bool)"}


def _ov_port(port: Any) -> Port:
    name = port.get_element_type().get_type_name()
    return Port(port.get_any_name(), _OV_TYPES.get(name, name),
                [d.get_length() if d.is_static else None for d in port.get_partial_shape()])


#: batch sizes an OpenVINO session compiles a static-shape model for; calls with other sizes share one
#: dynamic-batch compilation. Static shapes cut the per-call CPU of MobileNetV2-x0.5 INT8 at batch 1
#: from ~0.65 to ~0.3 ms (benchmarks/README.md); each compilation costs ~0.2-0.8 s once.
STATIC_BATCHES = 8


class OpenVinoSession:
    """An OpenVINO model compiled for the CPU with explicit precision and threads.

    OpenVINO's CPU plugin plans memory and picks kernels per shape, and a dynamic batch pays for that
    on every call (about 0.3 ms of CPU for a 32x32 MobileNetV2, more than the whole network at batch
    1). So the model is compiled for a static batch the first time each batch size is seen (batch 1
    at load, which also makes a model OpenVINO cannot compile fail at load), up to ``static_batches``
    sizes; other sizes share one dynamic-batch compilation. Each compilation keeps one infer request,
    and the input is handed to it without a copy.
    """

    runtime = "openvino"

    def __init__(self, path: Path, *, threads: int | None, hint: str = "LATENCY",
                 static_batches: int = STATIC_BATCHES) -> None:
        """``hint`` is OpenVINO's ``PERFORMANCE_HINT``: LATENCY (one stream: a call uses every thread)
        or THROUGHPUT (several streams for concurrent requests; with one thread, the same)."""
        self._ov = _openvino()
        self._config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": hint}
        if threads is not None:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        self._core, self._path, self._static_batches = self._ov.Core(), path, int(static_batches)
        self._model = self._load(lambda: self._core.read_model(str(path)))
        self.inputs = [_ov_port(p) for p in self._model.inputs]
        self.outputs = [_ov_port(p) for p in self._model.outputs]
        self._names = [p.name for p in self.outputs]
        self._fixed_batch = self.inputs[0].shape[0] if self.inputs[0].shape else None
        #: batch size (None: the dynamic-batch compilation) -> (compiled model, its infer request)
        self._compiled: dict[int | None, tuple[Any, Any]] = {}
        self._lock = threading.Lock()  # an infer request must not be used by two threads at once
        self._request(self._fixed_batch or 1)

    def _load(self, step: Any) -> Any:
        try:
            return step()
        except Exception as e:  # noqa: BLE001
            raise UserError(f"OpenVINO cannot load the model ({type(e).__name__}: {str(e)[:300]})",
                            where=str(self._path), fix="re-export it with distill2deploy, or use --runtime onnxruntime") from None

    def _request(self, batch: int) -> Any:
        """The infer request compiled for ``batch`` (compiled now if needed; see the class docstring)."""
        if self._fixed_batch is not None:
            key: int | None = self._fixed_batch  # the file's own static batch (others are OpenVINO's error)
        elif batch in self._compiled or sum(k is not None for k in self._compiled) < self._static_batches:
            key = batch
        else:
            key = None
        if key not in self._compiled:
            model = self._model
            if key is not None and self._fixed_batch is None:
                model = self._model.clone()
                shape = self._model.inputs[0].get_partial_shape()
                shape[0] = key
                model.reshape({0: shape})
            compiled = self._load(lambda: self._core.compile_model(model, "CPU", self._config))
            self._compiled[key] = (compiled, compiled.create_infer_request())
        return self._compiled[key][1]

    def compiled_batches(self) -> list[int | None]:
        """Batch sizes compiled so far (None: the shared dynamic-batch compilation)."""
        return list(self._compiled)

    def property(self, key: str) -> Any:
        """A property of the compiled model as OpenVINO applied it (e.g. ``INFERENCE_PRECISION_HINT``)."""
        with self._lock:  # run() may be adding a compilation from another thread
            return next(iter(self._compiled.values()))[0].get_property(key)

    def run(self, batch: np.ndarray, output_name: str | None = None) -> np.ndarray:
        i = self._names.index(output_name) if output_name else 0
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        with self._lock:
            request = self._request(len(batch))
            # the request reads the caller's array in place; the output is copied out of its buffer,
            # which the next call overwrites
            request.set_input_tensor(self._ov.Tensor(batch, shared_memory=True))
            request.infer()
            return request.get_output_tensor(i).data.copy()


#: onnxruntime graph optimizers every session here turns off. ``WeightBiasQuantization`` quantizes
#: the float weights of a Conv/Gemm whose input comes from a DequantizeLinear, *per tensor*: it undoes
#: ``quantize.nodes_to_exclude`` (a node kept in float on purpose) and, on depthwise convs whose
#: channels differ in range, silently wrecks the result (measured: MobileNetV2-x0.5 with its 17
#: depthwise convs kept in float agreed with fp32 on 9% of images instead of 93%).
DISABLED_ORT_OPTIMIZERS = ("WeightBiasQuantization",)


def session_options(threads: int | None = None, *, spin: bool = True) -> Any:
    """onnxruntime options every session here uses: all graph optimisations (QDQ -> QLinear* fusion needs them).

    ``threads`` sets the intra-op thread count; ``None`` keeps onnxruntime's default (one per
    physical core). Inter-op parallelism stays off: these CNNs are a chain of ops, and a second
    pool only competes for the same cores. ``spin=False`` stops idle intra-op threads from
    busy-waiting for the next call: right for a server, whose event loop needs those cores between
    batches; timing loops keep the default, which is faster for back-to-back calls.
    """
    import onnxruntime as ort

    if threads is not None and int(threads) < 1:
        raise UserError(f"threads must be >= 1, got {threads}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # onnxruntime's warnings are about its own fusions, not user input
    return opts


def make_session(path: str | os.PathLike[str], *, threads: int | None = None, spin: bool = True,
                 runtime: str = DEFAULT_RUNTIME) -> Session:
    """A CPU session for the model file at ``path`` on ``runtime``; ``threads=None`` keeps the runtime's default.

    ``spin`` only applies to onnxruntime (see :func:`session_options`); OpenVINO's pool has no such
    switch. A file neither runtime can load gets :func:`~.metadata.load_model`'s message when it
    applies (missing, not ONNX), else the runtime's own.
    """
    from .metadata import load_model

    check_runtime(runtime)
    if threads is not None and int(threads) < 1:
        raise UserError(f"threads must be >= 1, got {threads}")
    p = Path(path)
    if runtime == "openvino":
        _openvino()  # a missing extra is reported before anything else
        load_model(p, load_external_data=False)
        return OpenVinoSession(p, threads=threads)
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(p), session_options(threads, spin=spin), providers=["CPUExecutionProvider"],
                                       disabled_optimizers=list(DISABLED_ORT_OPTIMIZERS))
    except Exception as e:  # noqa: BLE001
        load_model(p, load_external_data=False)  # raises the friendlier UserError when it applies
        raise UserError(f"onnxruntime cannot load the model ({type(e).__name__}: {str(e)[:300]})",
                        where=str(p), fix="re-export the model with distill2deploy") from None
    return OnnxRuntimeSession(session)
