"""The HTTP server: Open Inference Protocol (KServe v2) REST endpoints over onnxruntime or OpenVINO, plus ``classify``.

``create_app`` loads every model up front (a broken file is a :class:`UserError` before the server
listens, not a 500 on the first request) and returns a FastAPI app holding all of its state: the
sessions, one :class:`MicroBatcher` per model and its own metrics registry. Nothing lives at module
level, so tests and embedding applications can create as many apps as they like.

Every error is a JSON body ``{"error": "..."}`` (the protocol's error shape) with a 4xx status:
unknown model 404, body over ``max_body_bytes`` 413, malformed JSON 400, a request that does not fit
the protocol's schema 422, anything that does not fit the model 400.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from .. import __version__
from ..deploy.evaluate import make_session, run_batched
from ..deploy.runtimes import DEFAULT_RUNTIME, Session
from ..data import preprocess
from ..deploy.images import decode_image, fit_images, top_k
from ..deploy.metadata import read_metadata
from ..deploy.validate import model_names
from ..errors import UserError
from .batcher import MicroBatcher
from .metrics import ServerMetrics
from .middleware import BodyLimit, RequestMetrics
from .protocol import InferenceRequest, ProtocolError, TensorSpec, request_tensor, response_tensor, tensor_spec

#: Triton's platform / backend names for ONNX files run by each runtime
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino"}
MAX_FILES = 1024  # image parts accepted in one multipart classify request
INLINE_DECODE_BYTES = 64 << 10  # smaller uploads are decoded on the event loop itself


@dataclass
class ServedModel:
    """One loaded model: its metadata, graph signature and micro-batcher (which owns the session's calls)."""

    name: str
    path: Path
    meta: dict[str, Any]
    input: TensorSpec
    output: TensorSpec
    batcher: MicroBatcher
    runtime: str = DEFAULT_RUNTIME

    def metadata(self) -> dict[str, Any]:
        """The protocol's model metadata, plus what a client needs to preprocess and read outputs."""
        return {"name": self.name, "versions": ["1"], "platform": PLATFORMS[self.runtime],
                "inputs": [self.input.model_dump()], "outputs": [self.output.model_dump()],
                "parameters": {"class_names": self.meta["class_names"], "mean": self.meta["mean"],
                               "std": self.meta["std"], "input_size": self.meta["input_size"],
                               "layout": self.meta.get("layout", "NCHW"),
                               "model_name": self.meta.get("model_name")}}


def load_models(paths: Sequence[str | os.PathLike[str]], *, names: Sequence[str] | None, threads: int,
                max_batch: int, max_delay_s: float, metrics: ServerMetrics,
                runtime: str = DEFAULT_RUNTIME) -> dict[str, ServedModel]:
    """Sessions and batchers for ``paths``; a model's name is its file stem unless ``names`` says otherwise."""
    names = model_names(paths, names, where="serve")
    models = {}
    for path, name in zip(paths, names):
        meta = read_metadata(path)  # a file without preprocessing metadata cannot be served correctly
        session = make_session(path, threads=threads, spin=False, runtime=runtime)
        if len(session.inputs) != 1 or len(session.outputs) != 1:
            raise UserError("expected a model with one input and one output", where=str(path))
        inp, out = tensor_spec(session.inputs[0]), tensor_spec(session.outputs[0])

        def run(parts: list[np.ndarray], session: Session = session, meta: dict = meta) -> np.ndarray:
            return run_batched(session, model_inputs(parts, meta), max_batch)

        batcher = MicroBatcher(name, run, max_batch=max_batch, max_delay_s=max_delay_s,
                               on_batch=lambda n, s, name=name: metrics.observe_batch(name, n, s),
                               on_queue=lambda d, name=name: metrics.set_queue_depth(name, d))
        models[name] = ServedModel(name, Path(path), meta, inp, out, batcher, runtime)
    return models


def model_inputs(parts: list[np.ndarray], meta: dict[str, Any]) -> np.ndarray:
    """One float32 batch from a micro-batch's parts, in order.

    uint8 parts are ``classify`` images (N, S, S, 3), already resized; they are normalised here with
    one :func:`~distill2deploy.data.preprocess` call per batch: its fixed cost is most of the work
    for small images (measured here: about 0.9 ms for one 32x32 image, 0.06-0.08 ms per image in a
    batch of 32). float32 parts are ``infer`` tensors, used as they are.
    """
    images = [p for p in parts if p.dtype == np.uint8]
    if images:
        normed = preprocess(np.concatenate(images), mean=meta["mean"], std=meta["std"],
                            input_size=int(meta["input_size"]))
        if len(images) == len(parts):  # only classify images (the usual batch): already the model's input
            return normed
    xs, at = [], 0
    for p in parts:
        if p.dtype == np.uint8:
            xs.append(normed[at:at + len(p)])
            at += len(p)
        else:
            xs.append(p)
    return xs[0] if len(xs) == 1 else np.concatenate(xs)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        return 400, "malformed JSON: " + "; ".join(str(e.get("ctx", {}).get("error", e["msg"])) for e in errs)
    parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in errs[:10]]
    return 422, "request does not match the Open Inference Protocol schema: " + "; ".join(parts)


def _decode(blobs: list[tuple[str, bytes]], input_size: int) -> np.ndarray:
    """Uploaded images -> uint8 (N, S, S, 3): decoded, RGB, resized (normalisation happens per batch)."""
    return fit_images([decode_image(data, where=where) for where, data in blobs], input_size)


async def _read_images(request: Request, k: int) -> tuple[list[tuple[str, bytes]], int]:
    """The images of a classify request (multipart parts in upload order, or the raw body) and top_k."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return [("request body", await request.body())], k
    form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
    try:
        blobs = [(f"file {i + 1} ({v.filename or 'unnamed'})", await v.read())
                 for i, v in enumerate(v for _, v in form.multi_items() if isinstance(v, UploadFile))]
        if "top_k" in form and not isinstance(form["top_k"], UploadFile):
            try:
                k = int(form["top_k"])
            except ValueError:
                raise ProtocolError(422, f"form field top_k must be an integer, got {form['top_k']!r}") from None
    finally:
        await form.close()
    if not blobs:
        raise ProtocolError(400, "the multipart form has no file parts; send images as files, "
                            "e.g. curl -F file=@cat.jpg")
    return blobs, k


def create_app(paths: Sequence[str | os.PathLike[str]], *, names: Sequence[str] | None = None, max_batch: int = 32,
               max_delay_ms: float = 5.0, threads: int = 1, max_body_bytes: int = 10_000_000,
               runtime: str = DEFAULT_RUNTIME) -> FastAPI:
    """A FastAPI app serving the ONNX models at ``paths`` on ``runtime`` (run it with uvicorn)."""
    if not paths:
        raise UserError("no models to serve", where="serve", fix="pass one or more .onnx files")
    if max_batch < 1 or max_delay_ms < 0 or max_body_bytes < 1:
        raise UserError(f"need --max-batch >= 1, --max-delay-ms >= 0 and --max-body-mb > 0, got {max_batch}, "
                        f"{max_delay_ms}, {max_body_bytes / 1e6:g}", where="serve")
    metrics = ServerMetrics()
    models = load_models(paths, names=names, threads=threads, max_batch=max_batch, max_delay_s=max_delay_ms / 1e3,
                         metrics=metrics, runtime=runtime)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        for m in models.values():
            await m.batcher.start()
        app.state.ready = True
        try:
            yield
        finally:  # uvicorn has finished the in-flight requests by now (graceful shutdown)
            app.state.ready = False
            for m in models.values():
                await m.batcher.close()

    app = FastAPI(title="distill2deploy", version=__version__, lifespan=lifespan,
                  summary="Open Inference Protocol (KServe v2) server for distill2deploy ONNX models")
    app.state.ready, app.state.models, app.state.metrics = False, models, metrics
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # added last = outermost: it also sees 413s

    app.add_exception_handler(ProtocolError, lambda r, e: _error(e.status, e.message))
    app.add_exception_handler(UserError, lambda r, e: _error(400, e.format()))
    app.add_exception_handler(HTTPException, lambda r, e: _error(e.status_code, str(e.detail)))
    app.add_exception_handler(RequestValidationError, lambda r, e: _error(*_validation_message(e)))

    def get_model(name: str) -> ServedModel:
        if name not in models:
            raise ProtocolError(404, f"unknown model {name!r}; this server serves: {', '.join(models)}")
        return models[name]

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "distill2deploy", "version": __version__, "extensions": ["classify", "metrics"]}

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = app.state.ready and all(m.batcher.running for m in models.values())
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str) -> JSONResponse:
        return JSONResponse(get_model(name).metadata())

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> JSONResponse:
        ok = get_model(name).batcher.running
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, req: InferenceRequest) -> JSONResponse:
        m = get_model(name)
        logits = await m.batcher.submit(request_tensor(req, m.input, m.output.name))
        body = {"model_name": name, "model_version": "1", "outputs": [response_tensor(m.output.name, logits)]}
        if req.id is not None:
            body["id"] = req.id
        return JSONResponse(body)

    @app.post("/v2/models/{name}/classify")
    async def classify(name: str, request: Request,
                       k: int = Query(5, alias="top_k", ge=1, description="classes per image")) -> JSONResponse:
        m = get_model(name)
        blobs, k = await _read_images(request, k)
        if k < 1:
            raise ProtocolError(422, f"top_k must be >= 1, got {k}")
        size = int(m.meta["input_size"])
        if sum(len(b) for _, b in blobs) <= INLINE_DECODE_BYTES:  # a thread hop costs more than this
            images = _decode(blobs, size)
        else:  # large files take milliseconds to decode: keep the event loop free meanwhile
            images = await run_in_threadpool(_decode, blobs, size)
        logits = await m.batcher.submit(images)
        preds = [{"top_k": t} for t in top_k(logits, m.meta["class_names"], k)]
        return JSONResponse({"model_name": name, "predictions": preds})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=metrics.content_type)

    return app
