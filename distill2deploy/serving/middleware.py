"""Two small ASGI middlewares: a request-body limit (413) and per-request Prometheus metrics.

They are plain ASGI callables rather than Starlette's ``BaseHTTPMiddleware``, which would copy
every request through an extra task and cost throughput on every call.
"""
from __future__ import annotations

import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import ServerMetrics

#: A body over the limit is read and discarded up to this many bytes before answering 413, so the
#: client, still sending, reads the answer instead of a connection reset; past it the connection closes.
_DRAIN_LIMIT = 256 << 20


class _TooLarge(Exception):
    pass


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """Answer ``413 {"error": ...}`` to any request whose body exceeds ``max_bytes``.

    A declared ``Content-Length`` over the limit is refused before the app runs; a chunked body is
    counted as the app reads it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, int(max_bytes)

    def _message(self) -> dict[str, str]:
        return {"error": f"request body is larger than the server's limit of {self.max_bytes / 1e6:g} MB "
                         "(serve --max-body-mb); send fewer or smaller images per request"}

    async def _drain(self, receive: Receive) -> None:
        seen = 0
        while seen < _DRAIN_LIMIT:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            seen += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._drain(receive)
            await _send_json(send, 413, self._message())
            return
        received, started = 0, False

        async def counting_receive() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if started:
                raise
            await self._drain(receive)
            await _send_json(send, 413, self._message())


class RequestMetrics:
    """Count every HTTP request by route template, method and status, and time it."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), 500

        async def status_send(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, status_send)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(endpoint, scope["method"], status, time.perf_counter() - t0)
