"""Accuracy of ONNX models as a runtime runs them (the numbers a deployment will see)."""
from __future__ import annotations

import os

import numpy as np

from ..errors import UserError
from .runtimes import Session, make_session, session_options  # noqa: F401  (the one place sessions are built)


def run_batched(session: Session, inputs: np.ndarray, batch_size: int,
                output_name: str | None = None) -> np.ndarray:
    """Run ``inputs`` through ``session`` in chunks; check the shape against the graph first.

    ``output_name`` (the metadata's ``output_name``) picks the output; ``None`` takes the first.
    """
    shape, outputs = session.inputs[0].shape, [o.name for o in session.outputs]
    if output_name is not None and output_name not in outputs:
        raise UserError(f"the metadata names output {output_name!r} but the graph's outputs are {outputs}",
                        fix="re-export the model with distill2deploy (or correct metadata output_name)")
    if not isinstance(inputs, np.ndarray) or inputs.ndim != len(shape):
        raise UserError(f"inputs must be a {len(shape)}-d float32 array {shape}, "
                        f"got {type(inputs).__name__} {getattr(inputs, 'shape', None)}")
    for i, (want, got) in enumerate(zip(shape[1:], inputs.shape[1:]), start=1):
        if isinstance(want, int) and want != got:
            raise UserError(f"input dim {i} is {got} but the model expects {want} (model input {shape})",
                            fix="preprocess with the model's own input_size/mean/std (see its metadata)")
    if len(inputs) == 0:
        raise UserError("no inputs to run")
    if int(batch_size) < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    return np.concatenate([session.run(inputs[i:i + batch_size], output_name)
                           for i in range(0, len(inputs), int(batch_size))])


def predict_onnx(path: str | os.PathLike[str], inputs: np.ndarray, *, batch_size: int = 256,
                 threads: int | None = None, runtime: str = "onnxruntime") -> np.ndarray:
    """Logits of ``inputs`` (float32 NCHW, already normalised) from the ONNX model at ``path``."""
    return run_batched(make_session(path, threads=threads, runtime=runtime), inputs, batch_size)


def _check_logits(logits: np.ndarray, what: str = "logits") -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 2 or len(logits) == 0:
        raise UserError(f"{what} must be a non-empty (N, classes) array, got shape {logits.shape}")
    return logits


def accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float | int]:
    """Top-1 and top-5 as fractions in [0, 1] (top-5 is top-k with k = min(5, classes))."""
    logits, labels = _check_logits(logits), np.asarray(labels).reshape(-1)
    if len(labels) != len(logits):
        raise UserError(f"{len(logits)} predictions but {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise UserError(f"labels must lie in [0, {logits.shape[1] - 1}], got {labels.min()}..{labels.max()}",
                        fix="check that the data's classes match the model's")
    k = min(5, logits.shape[1])
    # argpartition is O(N*C); ties are broken arbitrarily, as in torch.topk.
    topk = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return {
        "top1": float((logits.argmax(1) == labels).mean()),
        "top5": float((topk == labels[:, None]).any(1).mean()),
        "n": int(len(labels)),
    }


def agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """Fraction of samples on which two models predict the same class."""
    a, b = _check_logits(logits_a, "logits_a"), _check_logits(logits_b, "logits_b")
    if a.shape != b.shape:
        raise UserError(f"cannot compare logits of shapes {a.shape} and {b.shape}")
    return float((a.argmax(1) == b.argmax(1)).mean())
