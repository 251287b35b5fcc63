"""PyTorch -> ONNX export with a dynamic batch dimension, metadata and a parity check.

The torch.export-based exporter (``dynamo=True``) is used first: it is the maintained path in
torch >= 2.9, folds BatchNorm into the convolutions and handles the reshape/transpose of
ShuffleNet's channel shuffle with a symbolic batch. If it fails on some model, the legacy
TorchScript exporter is tried (the result says which one produced the file) -- both give the same
graph for the CNNs here, and the parity check below guards either way. For opset 17 TorchScript
goes first, since dynamo only writes opset >= 18 natively.
"""
from __future__ import annotations

import copy
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn

from .._io import atomic_path, scratch_dir
from ..data import preprocess
from ..errors import UserError
from .evaluate import make_session, run_batched
from .metadata import INPUT_NAME, LAYOUT, OUTPUT_NAME, build_metadata, set_props

from ..config import MIN_OPSET  # one bound, checked when the config loads and here
DYNAMO_MIN_OPSET = 18


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            opset_version=opset, dynamo=True, dynamic_shapes=({0: batch},), external_data=False,
            verbose=False,
        )


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation notice
        torch.onnx.export(
            model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            opset_version=opset, dynamo=False,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


_EXPORTERS = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def _has_dynamic_batch(value_info: onnx.ValueInfoProto) -> bool:
    dims = value_info.type.tensor_type.shape.dim
    return bool(dims) and not dims[0].HasField("dim_value")


def _check_parity(model: nn.Module, path: Path, inputs: np.ndarray, batch_size: int,
                  threads: int | None) -> dict[str, Any]:
    """Worst-case logit difference and argmax agreement between PyTorch and onnxruntime."""
    session = make_session(path, threads=threads)
    onnx_logits = run_batched(session, inputs, batch_size)
    with torch.inference_mode():
        torch_logits = np.concatenate([
            model(torch.from_numpy(np.ascontiguousarray(inputs[i:i + batch_size]))).numpy()
            for i in range(0, len(inputs), batch_size)
        ])
    for what, logits in (("PyTorch", torch_logits), ("onnxruntime", onnx_logits)):
        _require_finite(logits, f"{what} on the parity images")
    return {
        "max_abs_diff": float(np.abs(onnx_logits - torch_logits).max()),
        "top1_agreement": float((onnx_logits.argmax(1) == torch_logits.argmax(1)).mean()),
        "n": int(len(inputs)),
    }


def export_classifier(model: nn.Module, path: str | os.PathLike[str], *, model_name: str, class_names: list[str],
                      mean: Sequence[float], std: Sequence[float], input_size: int, opset: int, config_hash: str,
                      test_images: np.ndarray | None, parity_samples: int, threads: int | None) -> dict[str, Any]:
    """The export stage's and the ``export`` command's one path: metadata a server needs, then
    :func:`export_onnx` with parity measured on the first ``parity_samples`` of ``test_images`` (uint8
    NHWC, preprocessed here as the metadata says; None skips the parity check)."""
    meta = build_metadata(model_name=model_name, class_names=class_names, mean=mean, std=std,
                          input_size=input_size, config_hash=config_hash)
    parity = None
    if test_images is not None:
        parity = preprocess(test_images[:parity_samples], mean=mean, std=std, input_size=input_size)
    return export_onnx(model.eval(), path, input_size=input_size, opset=opset, metadata=meta,
                       parity_inputs=parity, threads=threads)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    input_size: int,
    opset: int = 18,
    metadata: dict[str, str],
    parity_inputs: np.ndarray | None = None,
    in_chans: int = 3,
    exporter: str = "auto",
    parity_batch_size: int = 128,
    threads: int | None = None,
) -> dict[str, Any]:
    """Export ``model`` to one self-contained ``.onnx`` file at ``path`` (written atomically).

    The graph takes ``input`` (float32 NCHW, already normalised, any batch size) and returns
    ``logits``. ``metadata`` goes into ``metadata_props`` (non-string values become JSON). With
    ``parity_inputs`` the same inputs run through PyTorch and onnxruntime and the result reports
    ``{"max_abs_diff", "top1_agreement", "n"}``. ``exporter`` is ``"auto"`` (dynamo, falling back to
    TorchScript; TorchScript first for opset 17), ``"dynamo"`` or ``"torchscript"``. ``opset`` in the
    result is the one actually written. The caller's model is not modified (a CPU copy
    in eval mode is exported). ``threads`` is onnxruntime's intra-op threads for the checks.
    Intermediate files live in a hidden folder beside ``path``, removed even when the export fails.

    Returns ``{"path", "bytes", "opset", "exporter", "parity"}``.
    """
    if not isinstance(model, nn.Module):
        raise UserError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if int(opset) < MIN_OPSET:
        raise UserError(f"opset {opset} is too old", fix=f"use opset >= {MIN_OPSET} (default 18)")
    if exporter not in ("auto", *_EXPORTERS):
        raise UserError(f"unknown exporter {exporter!r}", fix="use 'auto', 'dynamo' or 'torchscript'")
    if int(input_size) != input_size or input_size <= 0:
        raise UserError(f"input_size must be a positive integer, got {input_size!r}")
    input_size = int(input_size)
    if parity_inputs is not None:
        parity_inputs = _check_inputs(parity_inputs, in_chans, input_size, "parity_inputs")

    model = copy.deepcopy(model).float().cpu().eval()
    # Batch 2, not 1: exporters specialise size-1 dims, which would pin the batch to 1.
    example = torch.randn(2, in_chans, input_size, input_size)
    with torch.inference_mode():
        ref_out = model(example)
    if not isinstance(ref_out, torch.Tensor) or ref_out.ndim != 2:
        raise UserError(f"model output must be a (batch, classes) tensor, got {_describe(ref_out)}",
                        fix="export a classifier whose forward returns logits")
    num_classes = int(ref_out.shape[1])
    props = dict(metadata)
    if "num_classes" in props and int(props["num_classes"]) != num_classes:
        raise UserError(f"metadata says {props['num_classes']} classes but the model outputs {num_classes}",
                        fix="pass the class names of the dataset the model was trained on")
    props.setdefault("input_name", INPUT_NAME)
    props.setdefault("output_name", OUTPUT_NAME)
    props.setdefault("layout", LAYOUT)
    props.setdefault("input_size", str(input_size))
    props.setdefault("num_classes", str(num_classes))

    path = Path(path)
    if exporter != "auto":
        order = [exporter]
    elif int(opset) < DYNAMO_MIN_OPSET:
        # dynamo emits opset 18 and down-converts, which fails on Reduce* ops (axes became an input
        # in 18) and then silently keeps 18; TorchScript writes opset 17 natively.
        order = ["torchscript", "dynamo"]
    else:
        order = ["dynamo", "torchscript"]
    errors: list[str] = []
    with scratch_dir(path, "export") as tmp:
        raw = Path(tmp) / "model.onnx"
        for i, name in enumerate(order):
            try:
                _EXPORTERS[name](model, example, raw, int(opset))
                used = name
                break
            except Exception as e:  # noqa: BLE001  (try the next exporter, report all if none works)
                errors.append(f"{name}: {type(e).__name__}: {_first_line(e)}")
                if i + 1 < len(order):
                    warnings.warn(f"{name} ONNX export failed ({type(e).__name__}: {_first_line(e)}); "
                                  f"trying the {order[i + 1]} exporter", stacklevel=2)
        else:
            raise RuntimeError("ONNX export failed:\n" + "\n".join(errors))
        proto = onnx.load(str(raw))  # pulls in external data if the exporter wrote any
    actual_opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if actual_opset != int(opset):
        raise UserError(f"asked for ONNX opset {opset}, the {used} exporter wrote {actual_opset}", where="export.opset",
                        fix=f"use opset {actual_opset} (export.opset / --opset)")
    if not (_has_dynamic_batch(proto.graph.input[0]) and _has_dynamic_batch(proto.graph.output[0])):
        raise RuntimeError(f"{used} exporter produced a fixed batch dimension")
    proto.doc_string = f"distill2deploy export of {props.get('model_name', type(model).__name__)}"
    set_props(proto, props)
    onnx.checker.check_model(proto, full_check=True)

    with atomic_path(path) as tmp_path:
        onnx.save(proto, str(tmp_path))
        # Smoke-test the file itself at two batch sizes: the dynamic batch must really work.
        session = make_session(tmp_path, threads=threads)
        for b in (1, 3):
            out = session.run(np.zeros((b, in_chans, input_size, input_size), np.float32), OUTPUT_NAME)
            if out.shape != (b, num_classes):
                raise RuntimeError(f"exported model returned shape {out.shape} for batch {b}")
            _require_finite(out, "onnxruntime on a blank image")
        parity = ({} if parity_inputs is None
                  else _check_parity(model, tmp_path, parity_inputs, parity_batch_size, threads))
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "opset": int(actual_opset),
        "exporter": used,
        "parity": parity,
    }


def _require_finite(logits: np.ndarray, what: str) -> None:
    """NaN/inf logits mean NaN/inf weights (a diverged training run): never ship or score them."""
    if not np.isfinite(logits).all():
        raise UserError(f"the model's logits are NaN or infinite ({what}): its weights are not finite",
                        fix="retrain it (a diverged run: lower the learning rate) or export other weights")


def _first_line(e: Exception) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return (text.splitlines() or [""])[0][:300]


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _check_inputs(x: Any, in_chans: int, input_size: int, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[1:] != (in_chans, input_size, input_size):
        shape = getattr(x, "shape", None)
        raise UserError(f"{what} must be float32 NCHW of shape (N, {in_chans}, {input_size}, {input_size}), "
                        f"got {type(x).__name__} {shape}",
                        fix="preprocess images (uint8 NHWC) with distill2deploy.data.preprocess first")
    if len(x) == 0:
        raise UserError(f"{what} is empty")
    return np.ascontiguousarray(x, dtype=np.float32)
