"""Quantization-aware distillation: an INT8 file as fast as post-training INT8, and QAT that resumes.

The QAT-tuned student goes back through the project's fp32 export and onnxruntime's quantizer, so its
INT8 file is the post-training graph (which onnxruntime fuses everywhere) with other weights; a
killed QAT resumes from its last epoch checkpoint to the weights of an uninterrupted one, and a
rerun that changes only the search reuses the finished fine-tune.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from .conftest import kill_at_checkpoint
from .test_deploy import CLASSES, SIZE, _inputs, _tiny_model, exported  # noqa: F401


def _weight_scales(path: Path) -> list[np.ndarray]:
    """The scale of every int8 weight initializer's DequantizeLinear."""
    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    return [inits[n.input[1]] for n in proto.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8
            and inits[n.input[0]].ndim > 1]


@pytest.mark.slow
@pytest.mark.parametrize("per_channel", [True, False])
def test_requantized_qat_student_is_the_post_training_graph(exported, tmp_path, per_channel):  # noqa: F811
    """Training the prepared graph tunes the eager student's own tensors (BN statistics included), and
    the re-quantized file has exactly the op sequence of post-training INT8 of the same network (so
    onnxruntime fuses the same nodes), with one weight scale per channel or per tensor as asked."""
    pytest.importorskip("torchao")
    import torch

    from distill2deploy.deploy import quantize_int8
    from distill2deploy.deploy.metadata import read_metadata
    from distill2deploy.qat import prepare_qat, requantize

    torch.manual_seed(0)
    student = _tiny_model()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    prepared = prepare_qat(student, SIZE, per_channel=per_channel)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(prepared(torch.randn(8, 3, SIZE, SIZE)),
                                                 torch.randint(0, CLASSES, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.endswith("running_var") for k in changed) and any(k.endswith("weight") for k in changed)

    calib = _inputs(64, seed=1)
    settings = {"per_channel": per_channel, "calibrate_method": "minmax", "activation_type": "uint8"}
    out = tmp_path / "student.qat.int8.onnx"
    info = requantize(student, out, fp32_path=exported[0], calib=calib, settings=settings,
                      qat={"epochs": 1, "loss": "kd"}, input_size=SIZE, opset=18, calib_batch_size=32, threads=1)
    assert info["parity"]["top1_agreement"] == 1.0
    ptq = tmp_path / "ptq.int8.onnx"
    quantize_int8(exported[0], ptq, calib, per_channel=per_channel, threads=1)
    ops = [[n.op_type for n in onnx.load(str(p)).graph.node] for p in (out, ptq)]
    assert ops[0] == ops[1] and Counter(ops[0])["QuantizeLinear"] >= 3
    scales = _weight_scales(out)
    assert scales and all((s.size > 1) == per_channel for s in scales)
    meta = read_metadata(out)
    assert json.loads(meta["qat"]) == {"epochs": 1, "loss": "kd"}
    assert meta["quantization"]["per_channel"] == per_channel
    assert info["calib_agreement"] > 0.5


@pytest.mark.slow
def test_the_tuned_student_is_copied_back_after_the_graph_moved():
    """``Module.to(device)`` replaces buffers with copies (Parameters keep their identity): after the
    trainer moves the prepared graph to a GPU, the eager student no longer shares its BN statistics.
    A dtype move goes through the same ``_apply`` and stands in for the device here."""
    pytest.importorskip("torchao")
    import torch

    from distill2deploy.qat import prepare_qat, sync_tuned_student

    student = _tiny_model()
    prepared = prepare_qat(student, SIZE).to(torch.float64)
    stats = {k: v for k, v in prepared.state_dict().items() if k.endswith("running_mean")}
    assert stats
    for v in stats.values():
        v.fill_(0.5)  # what training on the device did to the statistics
    assert not any(torch.equal(student.state_dict()[k], v.float()) for k, v in stats.items())  # stale
    sync_tuned_student(student, prepared)
    assert all(torch.equal(student.state_dict()[k].double(), v.cpu()) for k, v in stats.items())


def _args(run_dir: Path, *extra: str) -> list[str]:
    from .test_pipeline import quick_args

    args = quick_args(run_dir, "-o", "quantize.search=true", "-o", "quantize.search_methods=[minmax]",
                      "-o", "quantize.search_calib_samples=[32]", "-o", "quantize.search_float_activations=[]",
                      "-o", "quantize.search_samples=64", "-o", "quantize.search_runs=2",
                      "-o", "quantize.qat.epochs=2", "-o", "quantize.qat.always=true",
                      "-o", "quantize.qat.batch_size=32", *extra)
    return ["quantize", *args[1:]]  # the stages up to quantize: validate and report are not under test


def _qat_row(run_dir: Path) -> dict:
    rows = json.loads((run_dir / "quantize" / "stage.json").read_text())["summary"]["search"]["rows"]
    return next(r for r in rows if "qat_epochs" in r)


@pytest.mark.slow
def test_killed_qat_resumes_and_a_finished_one_is_reused(tmp_path):
    """SIGKILL once QAT's first epoch checkpoint has landed; the same command resumes it and ends with
    the uninterrupted run's tuned weights and INT8 bytes. A rerun that only changes the search's timing
    reruns the stage but not the fine-tune."""
    pytest.importorskip("torchao")
    import torch

    from distill2deploy.cli import main
    from distill2deploy.training.checkpoint import recover_checkpoint

    reference = tmp_path / "reference"
    assert main(_args(reference)) == 0
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for stage in ("teacher", "distill", "export"):  # the same upstream: only quantize runs again
        shutil.copytree(reference / stage, run_dir / stage)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "distill2deploy", *_args(run_dir)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    state = kill_at_checkpoint(proc, run_dir, ".work/quantize-*/qat/checkpoints/last/trainer_state.json",
                               lambda s: s["next_epoch"] >= 1)
    recover_checkpoint(state.parent)
    killed_at = json.loads(state.read_text())["next_epoch"]
    assert not (run_dir / "quantize" / "stage.json").exists()

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"resuming after epoch {killed_at}/2" in out.stdout + out.stderr
    assert _qat_row(run_dir)["resumed_from_epoch"] == killed_at
    expected = torch.load(reference / "quantize" / "qat" / "student.pt")
    got = torch.load(run_dir / "quantize" / "qat" / "student.pt")
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    name = "quantize/qat/student.qat.int8.onnx"
    assert (reference / name).read_bytes() == (run_dir / name).read_bytes()
    metrics = (run_dir / "quantize" / "qat" / "metrics.jsonl").read_text()
    assert [json.loads(r)["epoch"] for r in metrics.splitlines()] == [1, 2]

    # only the search's timing changes: the quantize stage reruns, the fine-tune is reused as it was
    assert main(_args(run_dir, "-o", "quantize.search_runs=3")) == 0
    row = _qat_row(run_dir)
    assert row["resumed_from_epoch"] == 2 and (run_dir / "quantize" / "qat" / "metrics.jsonl").read_text() == metrics
    assert (run_dir / name).read_bytes() == (reference / name).read_bytes()


@pytest.mark.slow
def test_a_network_torchao_cannot_prepare_is_a_clear_error():
    """torchao 0.18's X86 quantizer fails on the CIFAR ResNets' conv+bn+add+relu blocks: the user is told
    which key turns quantization-aware distillation off instead of getting a traceback."""
    pytest.importorskip("torchao")
    from distill2deploy.errors import UserError
    from distill2deploy.models.factory import create_model
    from distill2deploy.qat import prepare_qat

    model = create_model("resnet20_cifar", num_classes=10, checkpoint=None, role="student")
    try:
        prepare_qat(model, 32)
    except UserError as e:
        assert e.where == "quantize.qat.epochs" and "quantize.qat.epochs: 0" in e.fix
    else:  # a later torchao that prepares these blocks: the error path is not reachable
        pytest.skip("this torchao prepares resnet20_cifar")
