"""The metadata an exported ONNX file carries so it can be used without this project.

ONNX ``metadata_props`` are string -> string, so lists are stored as JSON. A deployed model has to
say how to preprocess its input and what its outputs mean; everything needed for that is here,
next to the weights, instead of in a config file that gets lost on the way to production.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from ..errors import UserError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
LAYOUT = "NCHW"
PREPROCESSING = "RGB, scale to [0,1], normalise with mean/std, NCHW float32"

#: Keys every distill2deploy export carries in ``metadata_props``.
METADATA_KEYS: tuple[str, ...] = (
    "class_names", "mean", "std", "input_size", "num_classes", "model_name", "config_hash",
    "input_name", "output_name", "layout", "preprocessing",
)
_JSON_KEYS = frozenset({"class_names", "mean", "std", "quantization"})
_INT_KEYS = frozenset({"input_size", "num_classes"})
#: Keys a model can be *used* without (they describe provenance, not behaviour).
_OPTIONAL_KEYS = frozenset({"model_name", "config_hash", "preprocessing", "layout"})


def build_metadata(
    *,
    model_name: str,
    class_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    input_size: int,
    config_hash: str,
) -> dict[str, str]:
    """Metadata for :func:`~distill2deploy.deploy.export.export_onnx`, all values strings."""
    class_names = [str(c) for c in class_names]
    if not class_names:
        raise UserError("class_names is empty", fix="pass the dataset's class names")
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != len(std) or not mean:
        raise UserError(f"mean has {len(mean)} values but std has {len(std)}",
                        fix="give one mean and one std per input channel")
    if any(s <= 0 for s in std):
        raise UserError(f"std must be positive, got {std}")
    if int(input_size) != input_size or input_size <= 0:
        raise UserError(f"input_size must be a positive integer, got {input_size!r}")
    return {
        "class_names": json.dumps(class_names),
        "mean": json.dumps(mean),
        "std": json.dumps(std),
        "input_size": str(int(input_size)),
        "num_classes": str(len(class_names)),
        "model_name": str(model_name),
        "config_hash": str(config_hash),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "layout": LAYOUT,
        "preprocessing": PREPROCESSING,
    }


def to_props(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Coerce values to the strings ONNX stores (non-strings become JSON)."""
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def set_props(model: onnx.ModelProto, metadata: Mapping[str, Any]) -> None:
    """Set ``metadata`` on ``model``, replacing keys it already has and keeping the others."""
    props = {p.key: p.value for p in model.metadata_props}
    props.update(to_props(metadata))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)


def graph_input(model: onnx.ModelProto, *, where: str | None = None,
                fix: str = "export a single-input classifier with distill2deploy") -> onnx.ValueInfoProto:
    """The graph's one real input (initializers listed as inputs by old exporters do not count)."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UserError(f"expected a model with one input, found {[i.name for i in inputs]}", where=where, fix=fix)
    return inputs[0]


def load_model(path: str | os.PathLike[str], *, load_external_data: bool = True) -> onnx.ModelProto:
    """``onnx.load`` with the errors a user can fix turned into :class:`UserError`."""
    p = Path(path)
    if not p.is_file():
        raise UserError("ONNX file not found", where=str(p),
                        fix="check the path, or run the export stage first")
    try:
        return onnx.load(str(p), load_external_data=load_external_data)
    except Exception as e:  # protobuf DecodeError, truncated files, wrong format ...
        raise UserError(f"not a readable ONNX model ({type(e).__name__}: {str(e)[:200]})",
                        where=str(p), fix="re-export the model; the file may be truncated or not ONNX") from None


def parse_props(props: Mapping[str, str]) -> dict[str, Any]:
    """String props -> Python values (JSON lists back to lists, int keys to int)."""
    out: dict[str, Any] = {}
    for k, v in props.items():
        try:
            if k in _JSON_KEYS:
                out[k] = json.loads(v)
            elif k in _INT_KEYS:
                out[k] = int(v)
            else:
                out[k] = v
        except ValueError:
            raise UserError(f"metadata key {k!r} has a malformed value {v[:80]!r}",
                            fix="re-export the model with distill2deploy") from None
    return out


def _check_values(meta: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Values a file could carry that would make us allocate absurd buffers or mislabel outputs."""
    from ..config import MAX_INPUT_SIZE, MIN_INPUT_SIZE

    fix = "re-export the model with distill2deploy (or correct its metadata_props)"
    size = meta.get("input_size")
    if size is not None and not MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE:
        raise UserError(f"metadata input_size {size} is outside {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE}", where=str(path),
                        fix=fix)
    names, count = meta.get("class_names"), meta.get("num_classes")
    if count is not None and count < 1:
        raise UserError(f"metadata num_classes {count} is not positive", where=str(path), fix=fix)
    if names is not None and (not isinstance(names, list) or (count is not None and len(names) != count)):
        raise UserError(f"metadata class_names does not list num_classes ({count}) names", where=str(path), fix=fix)
    for k in ("mean", "std"):
        v = meta.get(k)
        if v is not None and (not isinstance(v, list) or len(v) != 3
                              or not all(isinstance(x, (int, float)) for x in v) or (k == "std" and min(v) <= 0)):
            raise UserError(f"metadata {k} must be 3 numbers{' > 0' if k == 'std' else ''}, got {v!r}",
                            where=str(path), fix=fix)


def read_metadata(path: str | os.PathLike[str], *, require: bool = True) -> dict[str, Any]:
    """The parsed metadata of an ONNX file.

    With ``require`` (the default), a file that lacks the keys needed to preprocess inputs and name
    outputs raises a :class:`UserError` naming them; a model from elsewhere is usable only once
    someone states its preprocessing, and guessing it silently would give wrong accuracy.
    """
    model = load_model(path, load_external_data=False)
    meta = parse_props({p.key: p.value for p in model.metadata_props})
    _check_values(meta, path)
    missing = [k for k in METADATA_KEYS if k not in meta and k not in _OPTIONAL_KEYS]
    if require and missing:
        inp = model.graph.input[0].name if model.graph.input else "?"
        raise UserError(
            "not exported by distill2deploy: metadata key(s) missing: " + ", ".join(missing),
            where=str(path),
            fix=("export it with distill2deploy, or supply the missing values yourself "
                 f"(graph input is {inp!r}; CIFAR defaults would be mean "
                 "[0.5070, 0.4865, 0.4409], std [0.2673, 0.2564, 0.2761], input_size 32)"),
        )
    return meta
