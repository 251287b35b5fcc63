"""Quantization-aware distillation: fine-tune the student through fake quantization, KD still on.

When no post-training INT8 variant stays within the accuracy budget, the student is fine-tuned for a
few epochs with the rounding and clipping of INT8 simulated in its forward pass, so its weights adapt
to them, while the configured distillation loss (teacher soft targets) keeps pulling it towards the
teacher. PyTorch's current API for this is PT2E in torchao (``torch.ao.quantization.quantize_pt2e``
moved there; torch 2.14 no longer ships it):

1. ``torch.export`` the student in training mode with a dynamic batch;
2. ``prepare_qat_pt2e`` with ``X86InductorQuantizer``'s QAT config: uint8 activations and int8
   symmetric weights, per channel (or per tensor, ``quantize.qat.per_channel: false``), i.e. the U8S8
   scheme of :mod:`~distill2deploy.deploy.quantize` that onnxruntime's x86 kernels run. Conv+BN pairs
   stay separate: the quantizer simulates the fold (the weight scaled by ``gamma / sqrt(running_var)``
   is fake-quantized, BN statistics still update) and the graph's parameters and BN buffers are the
   eager student's, same tensors and names (copied back by name after training,
   :func:`sync_tuned_student`, since a device move replaces buffers);
3. train with the project's trainer (same method, loaders, checkpoints, resume, progress, metrics);
4. :func:`requantize`: the eager student, now holding the tuned weights, is exported fp32 by the
   project's exporter and quantized by :func:`~distill2deploy.deploy.quantize.quantize_int8` with the
   settings of the search's choice. The file is then the same graph as post-training INT8, which
   onnxruntime fuses into INT8 kernels everywhere. torchao's own QDQ export (:func:`convert_qat`) is
   not: the X86 quantizer leaves the output of a conv that feeds a residual Add unquantized (for
   Inductor's conv+add kernel), so onnxruntime keeps those convs in float. Measured on the
   MobileNetV2-x0.5 CIFAR-10 student (docs/qat.md): torchao's file 1.03-1.16x fp32 time, the
   re-quantized one as fast as post-training INT8.

Methods that read the student's intermediate features (hooks on its modules) cannot run on an
exported graph; for those the logit KD loss is used instead (:func:`qat_method`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import UserError

_INSTALL = 'pip install "distill2deploy[qat]"  (torchao)'


def _torchao() -> Any:
    try:
        import torchao.quantization.pt2e as pt2e
        from torchao.quantization.pt2e import quantize_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError as e:
        raise UserError(f"quantization-aware distillation needs torchao ({e})", where="quantize.qat.epochs",
                        fix=f"{_INSTALL}, or set quantize.qat.epochs: 0") from None
    return pt2e, quantize_pt2e, x86


def _quantization_config(x86: Any, per_channel: bool) -> Any:
    """The X86 quantizer's QAT config; with ``per_channel=False`` one symmetric scale per weight tensor
    (the faster onnxruntime kernels that post-training quantization can break, see docs/qat.md)."""
    import dataclasses

    from torchao.quantization.pt2e import MovingAverageMinMaxObserver
    from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize

    config = x86.get_default_x86_inductor_quantization_config(is_qat=True)
    if per_channel:
        return config
    weight = dataclasses.replace(config.weight, qscheme=torch.per_tensor_symmetric, ch_axis=None,
                                 observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(
                                     eps=2**-12, observer=MovingAverageMinMaxObserver))
    return dataclasses.replace(config, weight=weight)


def prepare_qat(student: nn.Module, input_size: int, in_chans: int = 3, *, per_channel: bool = True
                ) -> torch.fx.GraphModule:
    """The student as an exported graph with fake quantization inserted (trainable, ``.train()``/``.eval()``
    work). The caller's module is exported as it is: the graph's parameters and BN buffers are the
    module's own tensors (same names); after training, :func:`sync_tuned_student` makes ``student`` the
    tuned one even when the graph was moved to another device."""
    pt2e, quantize_pt2e, x86 = _torchao()
    student = student.cpu().train()
    batch = torch.export.Dim("batch", min=1)  # as export_onnx exports it
    example = torch.randn(4, in_chans, input_size, input_size)
    graph = torch.export.export(student, (example,), dynamic_shapes=({0: batch},)).module()
    quantizer = x86.X86InductorQuantizer().set_global(_quantization_config(x86, per_channel))
    try:
        prepared = quantize_pt2e.prepare_qat_pt2e(graph, quantizer)
    except ValueError as e:  # measured: ResNet-56's conv+bn+add+relu blocks ("more than one output node")
        raise UserError(f"torchao's X86 quantizer cannot prepare {type(student).__name__} for quantization-aware "
                        f"training ({e})", where="quantize.qat.epochs",
                        fix="set quantize.qat.epochs: 0 (the search's post-training INT8 file is kept)") from None
    pt2e.allow_exported_model_train_eval(prepared)
    return prepared


def convert_qat(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Fold the learned scales into quantize/dequantize ops: the graph :func:`export_onnx` then exports."""
    pt2e, quantize_pt2e, _ = _torchao()
    pt2e.move_exported_model_to_eval(prepared)
    converted = quantize_pt2e.convert_pt2e(prepared)
    pt2e.allow_exported_model_train_eval(converted)
    return converted


def qat_method(method_cls: type, options: Any, student: nn.Module, prepared: nn.Module,
               teachers: list[nn.Module], *, num_classes: int, input_size: int) -> tuple[nn.Module, str]:
    """The distillation method that fine-tunes ``prepared``, and its name: the configured one when it only
    needs the student's logits (decided on the eager ``student``), else KD with its default options
    (feature hooks need the eager student's modules)."""
    from .methods import get_method

    kw = {"num_classes": num_classes, "input_size": input_size}
    probe = method_cls(student, teachers, options, **kw)
    if probe.teacher_feature_indices() is None and not probe.extra_eval_models():
        return method_cls(prepared, teachers, options, **kw), method_cls.name
    kd = get_method("kd")
    return kd(prepared, teachers[:1], kd.parse_options({}), **kw), "kd"


def sync_tuned_student(student: nn.Module, prepared: nn.Module) -> nn.Module:
    """Copy the trained graph's parameters and BN buffers back into ``student`` by name (on the CPU).

    :func:`prepare_qat` shares the student's tensors with the graph, but only until something moves the
    graph: ``Module.to(device)`` keeps Parameter objects yet replaces *buffers* with copies, so after
    GPU training the eager student would hold the pre-QAT BatchNorm statistics beside the tuned weights.
    Copying by name makes the student the tuned one wherever it trained."""
    own = student.state_dict()
    tuned = {k: v.detach().cpu() for k, v in prepared.state_dict().items() if k in own}
    missing = sorted(set(own) - set(tuned))
    if missing:  # a torchao/torch.export change that renames the graph's tensors must not ship stale ones
        raise RuntimeError(f"the QAT graph lacks the student's tensors {missing[:5]} (of {len(missing)})")
    student.load_state_dict(tuned)
    return student.cpu()


def requantize(student: nn.Module, out_path: Path, *, fp32_path: Path, calib: np.ndarray, settings: dict[str, Any],
               qat: dict[str, Any], input_size: int, opset: int, calib_batch_size: int, threads: int | None
               ) -> dict[str, Any]:
    """The QAT-tuned eager ``student`` as INT8: exported fp32 beside ``out_path`` (``.fp32.onnx``, the
    metadata of ``fp32_path`` plus ``qat``, the fine-tune as JSON, which the INT8 file inherits), then
    :func:`~distill2deploy.deploy.quantize.quantize_int8` with ``settings`` (a search row's
    ``per_channel``, ``calibrate_method``, ``activation_type``, ``nodes_to_exclude``) calibrated on
    ``calib``. Returns quantize_int8's result plus ``fp32_path`` and the export's parity."""
    from .deploy.export import export_onnx
    from .deploy.metadata import load_model
    from .deploy.quantize import quantize_int8

    props = {p.key: p.value for p in load_model(fp32_path).metadata_props}
    tuned = out_path.with_name(out_path.name.replace(".int8.onnx", "") + ".fp32.onnx")
    exported = export_onnx(student.eval(), tuned, input_size=input_size, opset=opset,
                           metadata={**props, "qat": json.dumps(qat, sort_keys=True)},
                           parity_inputs=calib[:128], threads=threads)
    info = quantize_int8(tuned, out_path, calib, calib_batch_size=calib_batch_size, threads=threads,
                         per_channel=settings["per_channel"], calibrate_method=settings["calibrate_method"],
                         activation_type=settings["activation_type"],
                         nodes_to_exclude=settings.get("nodes_to_exclude", ()))
    return {**info, "fp32_path": str(tuned), "parity": exported["parity"]}
