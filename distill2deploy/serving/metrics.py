"""Prometheus metrics of one server instance, in its own registry.

Each app gets a fresh :class:`prometheus_client.CollectorRegistry` instead of the library's global
default registry, so two apps in one process (tests, an embedding application) never share or
double-register counters. Request labels use the *route template* (``/v2/models/{name}/infer``), not
the raw path, so a client probing random model names cannot grow the label set without bound.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    """The server's counters, histograms and gauges (names follow Prometheus conventions)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("d2d_requests", "HTTP requests by route template, method and status code",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("d2d_request_duration_seconds", "HTTP request latency (receive to response)",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("d2d_batch_size", "images per onnxruntime call (micro-batch size)",
                                    ["model"], buckets=_BATCH_BUCKETS, registry=r)
        self.inference = Histogram("d2d_inference_duration_seconds", "time of one onnxruntime call",
                                   ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.images = Counter("d2d_images", "images (batch rows) inferred", ["model"], registry=r)
        self.queue_depth = Gauge("d2d_queue_depth", "images waiting for the next micro-batch", ["model"], registry=r)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.inference.labels(model).observe(seconds)
        self.images.labels(model).inc(size)

    def set_queue_depth(self, model: str, depth: int) -> None:
        self.queue_depth.labels(model).set(depth)

    def exposition(self) -> bytes:
        """The Prometheus text format of everything in this registry."""
        return generate_latest(self.registry)
