"""What cache keys and the run's hash are derived from: slices of the resolved config (see
:attr:`distill2deploy.stages.Stage.reads`), with each method's options as it will run them."""
from __future__ import annotations

from typing import Any

from ._io import obj_sha256
from .config import PipelineConfig, config_dict

#: config keys that never change a result: left out of every cache key and of :func:`config_hash`
INERT_KEYS: tuple[str, ...] = ("data.num_workers",)
#: what the exported models derive from (:func:`config_hash` covers exactly these; not the run name, thread
#: count, quantization or validation settings, so changing those re-exports nothing)
MODEL_SECTIONS: tuple[str, ...] = ("seed", "data", "teacher", "student", "distill", "export")


def effective_options(cfg: PipelineConfig) -> dict[str, Any]:
    """The method's options with its defaults filled in: a key over what the user wrote alone would let a
    changed default (e.g. ReviewKD's ``teacher_features``) reuse results trained under the old one."""
    from .methods import get_method

    method = get_method(cfg.distill.method)
    return method.options_dict(method.parse_options(dict(cfg.distill.options or {})))


def config_slice(cfg: PipelineConfig, paths: tuple[str, ...]) -> dict[str, Any]:
    """The part of the config at ``paths`` (sections like ``data`` or keys like ``distill.mixed_precision``),
    as a nested dict shaped like :func:`config_dict`, without :data:`INERT_KEYS`: what a stage's cache
    key is derived from (see :attr:`distill2deploy.stages.Stage.reads`)."""
    full, out = config_dict(cfg), {}
    for path in paths:
        *parents, leaf = path.split(".")
        src, dst = full, out
        for part in parents:
            src, dst = src[part], dst.setdefault(part, {})
        dst[leaf] = src[leaf]
    if isinstance(out.get("distill"), dict) and "options" in out["distill"]:
        out["distill"]["options"] = effective_options(cfg)
    for path in INERT_KEYS:
        *parents, leaf = path.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def config_hash(cfg: PipelineConfig) -> str:
    """The run's one hash: of everything that determines the exported models (:data:`MODEL_SECTIONS`).
    The ONNX metadata, ``config.sha256`` and the report all carry it."""
    return obj_sha256(config_slice(cfg, MODEL_SECTIONS))
