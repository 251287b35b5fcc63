"""Cross-field checks of a pipeline config that its types alone cannot express, run by
:func:`~distill2deploy.config.load_config`: one place where a user's config is refused (library code
raises ValueError/TypeError; these raise :class:`~distill2deploy.errors.UserError` naming the key)."""
from __future__ import annotations

from .config import PipelineConfig
from .errors import UserError

#: timm.create_model arguments the pipeline sets itself (model_kwargs may not repeat them)
_RESERVED_KWARGS = frozenset({"num_classes", "pretrained", "checkpoint_path", "pretrained_cfg",
                              "pretrained_cfg_overlay"})


def check_normalization(mean: list[float], std: list[float], where: str) -> None:
    """A user's per-channel mean and std (config keys or CLI flags, named by ``where``)."""
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise UserError(f"mean and std need 3 values each (std > 0), got {mean} and {std}", where=where,
                        fix="give one value per RGB channel, e.g. the CIFAR-100 defaults")


def check_config(cfg: PipelineConfig) -> None:
    """Cross-field checks the types alone cannot express."""
    from .deploy.runtimes import runtime_version
    from .methods import get_method  # the method validates its own options
    from .models.factory import check_model_name

    check_model_name(cfg.teacher.model, "teacher.model")
    check_model_name(cfg.student.model, "student.model")

    check_normalization(cfg.data.mean, cfg.data.std, where="data.mean/data.std")
    if not cfg.validate.batch_sizes:
        raise UserError("no batch sizes to measure", where="validate.batch_sizes", fix="e.g. [1, 64]")
    runtimes = cfg.validate.runtimes
    if not runtimes or len(set(runtimes)) != len(runtimes):
        raise UserError(f"runtimes must be distinct and at least one, got {runtimes}", where="validate.runtimes",
                        fix="e.g. [onnxruntime] or [onnxruntime, openvino]")
    for runtime in runtimes:  # a missing extra fails now, not after hours of training
        runtime_version(runtime, where="validate.runtimes")
    if cfg.validate.baseline_rounds != 0 and cfg.validate.baseline_rounds < 5:
        raise UserError(f"baseline_rounds is {cfg.validate.baseline_rounds}: a significance test needs 5 or more",
                        where="validate.baseline_rounds", fix="use 15 (the default), or 0 to write no baseline")
    if cfg.quantize.calib_samples < cfg.quantize.calib_batch_size:
        raise UserError(f"calib_samples ({cfg.quantize.calib_samples}) must be at least one batch "
                        f"({cfg.quantize.calib_batch_size})", where="quantize.calib_samples",
                        fix=f"set quantize.calib_samples >= {cfg.quantize.calib_batch_size} or lower quantize.calib_batch_size")
    q = cfg.quantize
    for key in ("search_methods", "search_calib_samples", "search_activation_types"):
        if q.search and not getattr(q, key):
            raise UserError("the search needs at least one value here", where=f"quantize.{key}",
                            fix="list one or more values, or set quantize.search: false")
    if q.qat.epochs and not q.search:
        raise UserError("quantization-aware distillation is the search's fallback", where="quantize.qat.epochs",
                        fix="set quantize.search: true (with quantize.qat.always: true to always run it), or "
                            "quantize.qat.epochs: 0")
    if q.qat.epochs:  # fail now, not after teacher, distill, export and the whole search
        import importlib.util
        import os

        if importlib.util.find_spec("torchao") is None:
            raise UserError("quantization-aware distillation needs torchao", where="quantize.qat.epochs",
                            fix='pip install "distill2deploy[qat]", or set quantize.qat.epochs: 0')
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the quantize stage runs on the main process only
            raise UserError("quantization-aware distillation runs in one process; this is a multi-process launch",
                            where="quantize.qat.epochs",
                            fix="run the quantize stage afterwards without accelerate launch/torchrun "
                                "(distill2deploy quantize CONFIG), or set quantize.qat.epochs: 0")
    for role in ("teacher", "student"):
        taken = sorted(set(getattr(cfg, role).model_kwargs) & _RESERVED_KWARGS)
        if taken:
            raise UserError(f"{', '.join(taken)} cannot be set here: the pipeline sets it", where=f"{role}.model_kwargs",
                            fix="the class count comes from the data (data.num_classes for an npz without names); "
                                "to fit pretrained weights to it set teacher.reset_head: true; weights come from "
                                f"{role}.checkpoint" + (" or teacher.pretrained" if role == "teacher" else ""))
    if cfg.teacher.reset_head and cfg.teacher.train.epochs < 1:
        raise UserError("a re-initialised head is random until it is trained", where="teacher.reset_head",
                        fix="set teacher.train.epochs >= 1 to fine-tune the teacher, or reset_head: false")
    get_method(cfg.distill.method).parse_options(cfg.distill.options)
