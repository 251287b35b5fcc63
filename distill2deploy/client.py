"""A small Python client for a ``distill2deploy serve`` server (or any Open Inference Protocol server for ``infer``).

    from distill2deploy.client import Client
    with Client("http://127.0.0.1:8000") as c:
        print(c.classify("student.int8", ["cat.jpg"], top_k=3))
        logits = c.infer("student.int8", x)   # x: float32 NCHW, preprocessed as c.metadata(...) says

Errors the server reports come back as :class:`ServerError` with its status and message.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np


class ServerError(Exception):
    """The server answered with an error status; ``message`` is its ``{"error": ...}`` text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class Client:
    """Blocking client over one keep-alive connection pool (``httpx.Client``)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, timeout: float = 60.0) -> None:
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            raise ServerError(response.status_code, message)
        return response.json()

    def ready(self) -> bool:
        """True when the server answers ``/v2/health/ready`` with 200."""
        try:
            return self._http.get("/v2/health/ready").status_code == 200
        except httpx.TransportError:
            return False

    def metadata(self, model: str) -> dict[str, Any]:
        """The model's protocol metadata (inputs, outputs; ``parameters`` has class names, mean/std, input size)."""
        return self._json(self._http.get(f"/v2/models/{model}"))

    def classify(self, model: str, images: Sequence[str | os.PathLike[str] | bytes], *,
                 top_k: int = 5) -> list[list[dict[str, Any]]]:
        """Per image (file path or encoded bytes), its top-k ``{"index", "label", "probability"}``."""
        files = [("file", (Path(im).name if not isinstance(im, bytes) else f"image{i}",
                           im if isinstance(im, bytes) else Path(im).read_bytes()))
                 for i, im in enumerate(images)]
        body = self._json(self._http.post(f"/v2/models/{model}/classify", params={"top_k": top_k}, files=files))
        return [p["top_k"] for p in body["predictions"]]

    def infer(self, model: str, inputs: np.ndarray, *, input_name: str = "input") -> np.ndarray:
        """The model's first output for a float32 batch, via the protocol's JSON tensors."""
        x = np.ascontiguousarray(inputs, dtype=np.float32)
        req = {"inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32",
                           "data": x.ravel().tolist()}]}
        out = self._json(self._http.post(f"/v2/models/{model}/infer", json=req))["outputs"][0]
        return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
