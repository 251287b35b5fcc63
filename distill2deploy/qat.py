"""Quantization-aware distillation: fine-tune the student through fake quantization, KD still on.

When no post-training INT8 variant stays within the accuracy budget, the student is fine-tuned for a
few epochs with the rounding and clipping of INT8 simulated in its forward pass, so its weights adapt
to them, while the configured distillation loss (teacher soft targets) keeps pulling it towards the
teacher. PyTorch's current API for this is PT2E in torchao (``torch.ao.quantization.quantize_pt2e``
moved there; torch 2.14 no longer ships it):

1. ``torch.export`` the student in training mode with a dynamic batch;
2. ``prepare_qat_pt2e`` with ``X86InductorQuantizer``'s QAT config: uint8 activations and int8
   symmetric per-channel weights, i.e. the U8S8 scheme of :mod:`~distill2deploy.deploy.quantize` that
   onnxruntime's x86 kernels run; Conv+BN pairs are kept foldable (BN statistics still update);
3. train with the project's trainer (same method, loaders, checkpoints, progress, metrics);
4. ``convert_pt2e`` and export with the dynamo ONNX exporter: the quantize/dequantize ops become
   QuantizeLinear/DequantizeLinear around float Conv/Gemm, a QDQ file onnxruntime fuses into INT8
   kernels exactly like the post-training one.

Methods that read the student's intermediate features (hooks on its modules) cannot run on an
exported graph; for those the logit KD loss is used instead (:func:`qat_method`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def prepare_qat(student: nn.Module, input_size: int, in_chans: int = 3) -> torch.fx.GraphModule:
    """The student as an exported graph with fake quantization inserted (trainable, ``.train()``/``.eval()``
    work). The caller's module is exported as it is (its weights are shared, not copied)."""
    pt2e, quantize_pt2e, x86 = _torchao()
    student = student.cpu().train()
    batch = torch.export.Dim("batch", min=1)  # as export_onnx exports it
    example = torch.randn(4, in_chans, input_size, input_size)
    graph = torch.export.export(student, (example,), dynamic_shapes=({0: batch},)).module()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config(is_qat=True))
    prepared = quantize_pt2e.prepare_qat_pt2e(graph, quantizer)
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


def export_qat(converted: nn.Module, path: Path, *, fp32_path: Path, input_size: int, opset: int,
               parity_inputs: Any, threads: int | None, settings: dict[str, Any]) -> dict[str, Any]:
    """Export the converted graph as a QDQ ONNX file carrying the fp32 model's metadata, plus
    ``quantization`` (``settings`` as JSON), like :func:`~distill2deploy.deploy.quantize.quantize_int8`."""
    from .deploy.export import export_onnx
    from .deploy.metadata import load_model

    props = {p.key: p.value for p in load_model(fp32_path).metadata_props}
    props["quantization"] = json.dumps({"format": "QDQ", "method": "qat", **settings})
    return export_onnx(converted, path, input_size=input_size, opset=opset, metadata=props,
                       parity_inputs=parity_inputs, threads=threads)
