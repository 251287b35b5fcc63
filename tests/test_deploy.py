"""Deployment layer: ONNX export, INT8 quantization, accuracy/latency validation in onnxruntime."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from distill2deploy.deploy import (
    METADATA_KEYS,
    BatchCalibrationReader,
    accuracy,
    agreement,
    build_metadata,
    export_onnx,
    measure_latency,
    model_key,
    plot_accuracy_latency,
    predict_onnx,
    quantize_int8,
    read_metadata,
    validate_models,
)
from distill2deploy.errors import UserError

from .conftest import SAMPLE_NPZ, SHARED, WEIGHTS

SIZE, CLASSES = 16, 10
MEAN, STD = (0.5070, 0.4865, 0.4409), (0.2673, 0.2564, 0.2761)


class TinyNet(nn.Module):
    """Conv-BN-ReLU x2 + residual + pooled linear head: the op mix of the real students."""

    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.block(x) + x)
        return self.head(x.mean((2, 3)))


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    m = TinyNet()
    with torch.no_grad():  # non-trivial BN statistics, so folding them is actually tested
        for bn in (m.stem[1], m.block[1]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _metadata() -> dict[str, str]:
    return build_metadata(model_name="tinynet", class_names=[f"c{i}" for i in range(CLASSES)],
                          mean=MEAN, std=STD, input_size=SIZE, config_hash="abc123")


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE), dtype=np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict, nn.Module]:
    path = tmp_path_factory.mktemp("export") / "student.onnx"
    model = _tiny_model()
    result = export_onnx(model, path, input_size=SIZE, metadata=_metadata(), parity_inputs=_inputs(40))
    return path, result, model


@pytest.fixture(scope="module")
def quantized(exported) -> tuple[Path, dict]:
    path = exported[0].with_name("student.int8.onnx")
    return path, quantize_int8(exported[0], path, _inputs(70, seed=1), calib_batch_size=32)


# ---------------------------------------------------------------- export
def test_export_dynamic_batch_checker_and_parity(exported):
    path, result, model = exported
    assert result["path"] == str(path) and result["bytes"] == path.stat().st_size > 0
    assert result["opset"] == 18 and result["exporter"] in ("dynamo", "torchscript")
    assert result["parity"]["n"] == 40
    assert result["parity"]["max_abs_diff"] < 1e-4
    assert result["parity"]["top1_agreement"] == 1.0
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert not proto.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    assert not list(path.parent.glob("*.data")), "must be one self-contained file"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = _inputs(batch, seed=batch)
        got = session.run(None, {"input": x})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert got.shape == (batch, CLASSES)
        np.testing.assert_allclose(got, want, atol=1e-4)
    # no tmp files left next to the artifact
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_export_torchscript_and_no_parity(tmp_path):
    model = _tiny_model().train()  # export must not depend on (or change) the caller's mode
    result = export_onnx(model, tmp_path / "ts.onnx", input_size=SIZE, metadata=_metadata(),
                         exporter="torchscript")
    assert model.training
    assert result["exporter"] == "torchscript" and result["parity"] == {}
    out = predict_onnx(tmp_path / "ts.onnx", _inputs(3))
    with torch.no_grad():
        np.testing.assert_allclose(out, _tiny_model()(torch.from_numpy(_inputs(3))).numpy(), atol=1e-4)


class _DataDependent(nn.Module):
    """Python control flow on a tensor value: torch.export (dynamo) refuses it, tracing does not."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _tiny_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y if bool(y.sum() > -1e9) else -y


@pytest.mark.slow
def test_export_falls_back_to_torchscript(tmp_path):
    with pytest.warns(UserWarning, match="dynamo ONNX export failed.*trying the torchscript"):
        result = export_onnx(_DataDependent(), tmp_path / "fb.onnx", input_size=SIZE, metadata=_metadata(),
                             parity_inputs=_inputs(4))
    assert result["exporter"] == "torchscript" and result["parity"]["top1_agreement"] == 1.0
    with pytest.raises(RuntimeError, match="ONNX export failed"):
        export_onnx(_DataDependent(), tmp_path / "x.onnx", input_size=SIZE, metadata=_metadata(), exporter="dynamo")
    assert not (tmp_path / "x.onnx").exists()


def test_export_reports_the_opset_it_wrote(tmp_path):
    result = export_onnx(_tiny_model(), tmp_path / "o17.onnx", input_size=SIZE, opset=17, metadata=_metadata())
    written = next(o.version for o in onnx.load(str(tmp_path / "o17.onnx")).opset_import if o.domain == "")
    assert result["opset"] == written == 17


def test_export_rejects_bad_input(tmp_path):
    model = _tiny_model()
    with pytest.raises(UserError, match="opset"):
        export_onnx(model, tmp_path / "a.onnx", input_size=SIZE, opset=13, metadata=_metadata())
    with pytest.raises(UserError, match="parity_inputs"):
        export_onnx(model, tmp_path / "a.onnx", input_size=SIZE, metadata=_metadata(),
                    parity_inputs=np.zeros((4, SIZE, SIZE, 3), np.float32))
    wrong = build_metadata(model_name="x", class_names=["a", "b"], mean=MEAN, std=STD,
                           input_size=SIZE, config_hash="h")
    with pytest.raises(UserError, match="2 classes but the model outputs 10"):
        export_onnx(model, tmp_path / "a.onnx", input_size=SIZE, metadata=wrong)
    assert not list(tmp_path.iterdir()), "a failed export must leave nothing behind"


# ---------------------------------------------------------------- metadata
def test_metadata_round_trip(exported):
    props = {p.key: p.value for p in onnx.load(str(exported[0])).metadata_props}
    assert set(METADATA_KEYS) <= set(props) and all(isinstance(v, str) for v in props.values())
    meta = read_metadata(exported[0])
    assert meta["class_names"] == [f"c{i}" for i in range(CLASSES)]
    assert meta["mean"] == pytest.approx(list(MEAN)) and meta["std"] == pytest.approx(list(STD))
    assert meta["input_size"] == SIZE and meta["num_classes"] == CLASSES
    assert meta["model_name"] == "tinynet" and meta["config_hash"] == "abc123"
    assert (meta["input_name"], meta["output_name"], meta["layout"]) == ("input", "logits", "NCHW")
    assert "mean/std" in meta["preprocessing"]


def test_build_metadata_validates():
    with pytest.raises(UserError, match="std"):
        build_metadata(model_name="m", class_names=["a"], mean=MEAN, std=(1.0, 1.0), input_size=32,
                       config_hash="h")
    with pytest.raises(UserError, match="input_size"):
        build_metadata(model_name="m", class_names=["a"], mean=MEAN, std=STD, input_size=0, config_hash="h")


def _foreign_model(path: Path) -> Path:
    """A valid ONNX model not made by distill2deploy (no metadata)."""
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), str(path))
    return path


def test_read_metadata_of_foreign_model(tmp_path):
    path = _foreign_model(tmp_path / "foreign.onnx")
    with pytest.raises(UserError, match="not exported by distill2deploy") as e:
        read_metadata(path)
    assert "class_names" in str(e.value) and "input_size" in str(e.value) and "mean" in str(e.value)
    assert read_metadata(path, require=False) == {}


def test_missing_and_corrupt_files(tmp_path, exported):
    missing, corrupt = tmp_path / "nope.onnx", tmp_path / "bad.onnx"
    corrupt.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    truncated = tmp_path / "trunc.onnx"
    truncated.write_bytes(exported[0].read_bytes()[:2000])
    for bad in (missing, corrupt, truncated):
        with pytest.raises(UserError, match=str(bad.name)):
            read_metadata(bad)
        with pytest.raises(UserError):
            predict_onnx(bad, _inputs(2))
        with pytest.raises(UserError):
            measure_latency(bad, input_size=SIZE, runs=1, warmup=0, progress=False)
        with pytest.raises(UserError):
            quantize_int8(bad, tmp_path / "q.onnx", _inputs(40))
    with pytest.raises(UserError, match="not found"):
        read_metadata(missing)
    assert not (tmp_path / "q.onnx").exists()


# ---------------------------------------------------------------- quantization
def test_calibration_reader_yields_equal_batches():
    reader = BatchCalibrationReader(_inputs(70), "input", 32)
    batches = list(iter(reader.get_next, None))
    assert len(reader) == 2 and [b["input"].shape[0] for b in batches] == [32, 32]
    np.testing.assert_array_equal(batches[1]["input"], _inputs(70)[32:64])
    assert reader.get_next() is None
    reader.rewind()
    assert reader.get_next()["input"].shape == (32, 3, SIZE, SIZE)


def _initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def test_quantize_qdq_per_channel_uint8(exported, quantized):
    path, result = quantized
    assert result["path"] == str(path) and result["bytes"] == path.stat().st_size
    assert result["calib_samples"] == 64  # 70 samples, batch 32: the remainder is dropped
    settings = result["settings"]
    assert settings["activation_type"] == "uint8" and settings["weight_type"] == "int8"
    assert settings["per_channel"] is True and settings["format"] == "QDQ"
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "Conv" in ops
    inits = _initializers(proto)
    # Activations: QuantizeLinear zero points are uint8.
    q_zps = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert q_zps and all(z.dtype == np.uint8 for z in q_zps)
    # Weights: every Conv weight is int8 with one scale per output channel.
    producers = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    for conv in convs:
        dq = producers[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        w, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert w.dtype == np.int8 and scale.shape == (w.shape[0],) and w.shape[0] > 1
    # Metadata kept, quantization settings added.
    meta = read_metadata(path)
    fp32_meta = read_metadata(exported[0])
    assert {k: meta[k] for k in fp32_meta} == fp32_meta
    assert meta["quantization"]["per_channel"] is True and meta["quantization"]["calib_samples"] == 64
    # Dynamic batch preserved, outputs close to fp32.
    for batch in (1, 5):
        x = _inputs(batch, seed=10 + batch)
        q, f = predict_onnx(path, x), predict_onnx(exported[0], x)
        assert q.shape == (batch, CLASSES)
        assert np.abs(q - f).max() < 0.1 * np.abs(f).max() + 0.05


def test_quantize_variants(exported, tmp_path):
    pt = quantize_int8(exported[0], tmp_path / "pt.onnx", _inputs(32), per_channel=False,
                       activation_type="int8", preprocess=False)
    proto = onnx.load(str(tmp_path / "pt.onnx"))
    inits = _initializers(proto)
    weight_scales = [inits[n.input[1]] for n in proto.graph.node
                     if n.op_type == "DequantizeLinear" and inits.get(n.input[0], np.zeros(0)).dtype == np.int8]
    assert len(weight_scales) == 3 and all(s.size == 1 for s in weight_scales)  # per-tensor
    q_zps = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert all(z.dtype == np.int8 for z in q_zps)
    assert pt["settings"]["preprocess"] is False and pt["calib_samples"] == 32
    # Entropy calibration needs equal batches; 70 samples at batch 32 must work.
    ent = quantize_int8(exported[0], tmp_path / "ent.onnx", _inputs(70), calibrate_method="entropy")
    assert ent["calib_samples"] == 64 and predict_onnx(tmp_path / "ent.onnx", _inputs(3)).shape == (3, CLASSES)


def test_quantize_rejects_bad_input(exported, tmp_path):
    with pytest.raises(UserError, match="fewer than one batch"):
        quantize_int8(exported[0], tmp_path / "q.onnx", _inputs(10), calib_batch_size=32)
    with pytest.raises(UserError, match="did you mean 'uint8'"):
        quantize_int8(exported[0], tmp_path / "q.onnx", _inputs(40), activation_type="unit8")
    with pytest.raises(UserError, match="calibrate_method"):
        quantize_int8(exported[0], tmp_path / "q.onnx", _inputs(40), calibrate_method="kl")
    with pytest.raises(UserError, match="calibration inputs"):
        quantize_int8(exported[0], tmp_path / "q.onnx", np.zeros((40, 3, 8, 8), np.float32))
    assert not (tmp_path / "q.onnx").exists()


# ---------------------------------------------------------------- accuracy / latency / validation
def test_accuracy_and_agreement_math():
    logits = np.array([
        [9, 8, 7, 6, 5, 4, 0],   # label 0: top-1
        [9, 8, 7, 6, 5, 4, 0],   # label 4: top-5 only
        [9, 8, 7, 6, 5, 4, 0],   # label 6: neither
        [0, 1, 2, 3, 4, 5, 6],   # label 6: top-1
    ], dtype=np.float32)
    acc = accuracy(logits, np.array([0, 4, 6, 6]))
    assert acc == {"top1": 0.5, "top5": 0.75, "n": 4}
    assert accuracy(logits[:, :3], np.array([0, 1, 2, 2]))["top5"] == 1.0  # k capped at #classes
    other = logits.copy()
    other[0] = other[0][::-1]
    assert agreement(logits, other) == 0.75 and agreement(logits, logits) == 1.0
    with pytest.raises(UserError):
        accuracy(logits, np.array([0, 1]))
    with pytest.raises(UserError):
        accuracy(logits, np.array([0, 1, 2, 7]))
    with pytest.raises(UserError):
        agreement(logits, logits[:2])


def test_predict_onnx_checks_shape(exported):
    with pytest.raises(UserError, match="expects 16"):
        predict_onnx(exported[0], np.zeros((2, 3, 8, 8), np.float32))
    batched = predict_onnx(exported[0], _inputs(9), batch_size=4)
    np.testing.assert_allclose(batched, predict_onnx(exported[0], _inputs(9)), atol=1e-5)


def test_latency_structure(exported):
    lat = measure_latency(exported[0], input_size=SIZE, batch_sizes=(1, 4), warmup=2, runs=7,
                          threads=1, progress=False)
    assert set(lat["latency_ms"]) == set(lat["throughput_ips"]) == {"1", "4"}
    for bs, stats in lat["latency_ms"].items():
        assert set(stats) == {"p50", "p90", "p99", "mean", "round_p50", "round_spread"}
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
        assert len(stats["round_p50"]) == 7 and stats["round_spread"] >= 0  # 7 runs in (at most) 10 rounds
        # throughput from the median run, not from a mean a few preempted runs dominate
        assert lat["throughput_ips"][bs] == pytest.approx(int(bs) * 1e3 / stats["p50"], rel=1e-6)
    assert lat["settings"]["runs"] == 7 and lat["settings"]["threads"] == 1
    with pytest.raises(UserError, match="input_size"):
        measure_latency(exported[0], input_size=32, runs=1, warmup=0, progress=False)


@pytest.mark.slow
def test_validate_models_report(exported, quantized, tmp_path):
    fp32, int8 = exported[0], quantized[0]
    x, labels = _inputs(30, seed=5), np.arange(30) % CLASSES
    report = validate_models([fp32, int8], x, labels, batch_sizes=(1, 2), warmup=1, runs=3, threads=1,
                             progress=False)
    json.dumps(report)  # must be JSON-serialisable as is
    assert set(report["models"]) == {"student", "student.int8"} and model_key(int8) == "student.int8"
    for key, path in (("student", fp32), ("student.int8", int8)):
        m = report["models"][key]
        assert m["path"] == str(path) and m["bytes"] == path.stat().st_size
        assert set(m["accuracy"]) == {"top1", "top5", "n"} and m["accuracy"]["n"] == 30
        assert set(m["latency_ms"]) == set(m["throughput_ips"]) == {"1", "2"}
        assert {"p50", "p90", "p99"} <= set(m["latency_ms"]["1"])
    want = agreement(predict_onnx(int8, x), predict_onnx(fp32, x))
    assert report["agreement"] == {"student.int8 vs student": want}
    assert set(report["latency_ratio"]["student.int8 vs student"]) == {"1", "2"}
    assert set(report["latency_ratio_spread"]["student.int8 vs student"]) == {"1", "2"}
    change = report["top1_change"]["student.int8 vs student"]
    top1 = {k: report["models"][k]["accuracy"]["top1"] for k in ("student", "student.int8")}
    assert change["change_pts"] == pytest.approx(100 * (top1["student.int8"] - top1["student"]))
    assert change["ci95_pts"][0] <= change["change_pts"] <= change["ci95_pts"][1] and change["n"] == 30
    # Per-model preprocessing from metadata: a callable gets each model's parsed metadata.
    seen = []

    def images(meta):
        seen.append(meta["input_size"])
        return x

    report2 = validate_models([fp32], images, labels, batch_sizes=(1,), warmup=0, runs=2, progress=False)
    assert seen == [SIZE] and report2["agreement"] == {}
    assert report2["models"]["student"]["accuracy"] == report["models"]["student"]["accuracy"]
    png = plot_accuracy_latency(report, tmp_path / "plots" / "acc_lat.png")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="share the name"):
        validate_models([fp32, tmp_path / "student.onnx"], x, labels, progress=False)
    with pytest.raises(UserError, match="not exported by distill2deploy"):
        validate_models([_foreign_model(tmp_path / "f.onnx")], images, labels, progress=False)


def test_training_curves_keep_fractions_and_counts_off_the_loss_axis(tmp_path):
    import matplotlib

    from distill2deploy.report import loss_keys, plot_training_curves

    rows = [{"epoch": e, "lr": 0.1, "train_top1": 0.1 * e, "train_ce": 3.0 / e, "train_kd": 1.0, "train_ec": 0.2,
             "train_images": 50000, "train_trsr": 0.5, "train_trsw": 0.2, "train_twsr": 0.1, "train_twsw": 0.2,
             "train_l2_trsw": 0.3, "test_top1": 0.2, "test_teacher_top1": None if e == 1 else 0.6}
            for e in (1, 2)]
    assert loss_keys(rows[0]) == ["train_ce", "train_ec", "train_kd"]
    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # a caller's non-Agg backend: a library call must not switch it
    try:
        plot_training_curves(rows, tmp_path / "curves.png", "run")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(backend)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- real weights
@pytest.mark.slow
@pytest.mark.skipif(not (WEIGHTS / "cifar100_resnet56.pth").exists(),
                    reason=f"real weights not found under {SHARED}")
def test_resnet56_cifar100_export_and_int8(tmp_path):
    import timm

    import distill2deploy  # noqa: F401  (registers resnet56_cifar)
    from distill2deploy.data import preprocess

    data = np.load(SAMPLE_NPZ)
    model = timm.create_model("resnet56_cifar", num_classes=100)
    model.load_state_dict(torch.load(WEIGHTS / "cifar100_resnet56.pth", weights_only=True),
                          strict=True)
    model.eval()
    x_test = preprocess(data["x_test"], mean=MEAN, std=STD, input_size=32)
    x_calib = preprocess(data["x_train"], mean=MEAN, std=STD, input_size=32)
    with torch.inference_mode():
        torch_acc = accuracy(model(torch.from_numpy(x_test)).numpy(), data["y_test"])
    meta = build_metadata(model_name="resnet56_cifar", class_names=data["fine_label_names"].tolist(),
                          mean=MEAN, std=STD, input_size=32, config_hash="test")
    fp32 = tmp_path / "resnet56.onnx"
    exp = export_onnx(model, fp32, input_size=32, metadata=meta, parity_inputs=x_test)
    assert exp["parity"]["top1_agreement"] == 1.0 and exp["parity"]["max_abs_diff"] < 1e-3
    fp32_acc = accuracy(predict_onnx(fp32, x_test), data["y_test"])
    assert torch_acc["top1"] == fp32_acc["top1"] == pytest.approx(0.7225)
    q = quantize_int8(fp32, tmp_path / "resnet56.int8.onnx", x_calib, calib_batch_size=32)
    assert q["calib_samples"] == 480
    int8_acc = accuracy(predict_onnx(tmp_path / "resnet56.int8.onnx", x_test), data["y_test"])
    assert abs(int8_acc["top1"] - fp32_acc["top1"]) <= 0.01
