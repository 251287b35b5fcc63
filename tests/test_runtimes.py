"""Runtimes: one session interface over onnxruntime and OpenVINO, chosen by name in every command."""
from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest

from distill2deploy.cli import main
from distill2deploy.data import preprocess
from distill2deploy.deploy.evaluate import make_session, run_batched
from distill2deploy.deploy.quantize import quantize_int8
from distill2deploy.deploy.runtime_report import runtime_lines, runtime_markdown, runtime_summary
from distill2deploy.deploy.runtimes import OPENVINO_INSTALL, OnnxRuntimeSession, runtime_version
from distill2deploy.errors import UserError

from .test_check import CLASSES, MEAN, SIZE, STD, tiny_model

try:
    import openvino  # noqa: F401

    HAVE_OPENVINO = True
except ImportError:
    HAVE_OPENVINO = False
needs_openvino = pytest.mark.skipif(not HAVE_OPENVINO, reason='OpenVINO is not installed: '
                                    'pip install "distill2deploy[openvino]" (the dev extra installs it)')


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("runtimes")
    fp32 = tiny_model(d / "tiny.onnx", depth=3)
    x = np.random.default_rng(0).standard_normal((64, 3, SIZE, SIZE), dtype=np.float32)
    quantize_int8(fp32, d / "tiny.int8.onnx", x, calib_batch_size=32, threads=1)
    images = np.random.default_rng(1).integers(0, 256, (96, SIZE, SIZE, 3), dtype=np.uint8)
    labels = run_batched(make_session(fp32, threads=1), preprocess(images, mean=MEAN, std=STD, input_size=SIZE),
                         32).argmax(1)
    np.savez(d / "test.npz", x_test=images, y_test=labels,
             fine_label_names=np.array([f"c{i}" for i in range(CLASSES)]))
    return {"fp32": fp32, "int8": d / "tiny.int8.onnx", "data": d / "test.npz"}


@pytest.fixture
def no_openvino(monkeypatch):
    """Make ``import openvino`` fail as it does where the extra is not installed."""
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", fake)


def test_runtime_is_chosen_by_name(models):
    s = make_session(models["fp32"], threads=1)
    assert isinstance(s, OnnxRuntimeSession) and s.runtime == "onnxruntime"
    assert s.inputs[0].name == "input" and s.outputs[0].name == "logits" and s.inputs[0].type == "tensor(float)"
    with pytest.raises(UserError, match="unknown runtime 'tensorrt'"):
        make_session(models["fp32"], runtime="tensorrt")


def test_missing_openvino_is_an_install_message(models, no_openvino, tmp_path, capsys):
    with pytest.raises(UserError) as e:
        make_session(models["fp32"], runtime="openvino")
    assert OPENVINO_INSTALL in e.value.format()
    with pytest.raises(UserError, match="validate.runtimes"):
        runtime_version("openvino", where="validate.runtimes")
    assert main(["validate", str(models["fp32"]), "--data", f"npz:{models['data']}", "--runtime", "openvino"]) == 2
    assert OPENVINO_INSTALL in capsys.readouterr().err
    # the server refuses to start (before binding) with the same message and exit code 2
    assert main(["serve", str(models["fp32"]), "--runtime", "openvino", "--port", "0"]) == 2
    assert OPENVINO_INSTALL in capsys.readouterr().err
    # a pipeline config asking for it fails when loaded, not after training
    from distill2deploy.config import load_config

    with pytest.raises(UserError, match="not installed"):
        load_config("quickstart.yaml", ["validate.runtimes=[onnxruntime, openvino]"])


@needs_openvino
def test_openvino_runs_fp32_as_fp32_with_the_threads_asked(models):
    s = make_session(models["fp32"], threads=1, runtime="openvino")
    # OpenVINO's own default is bf16 on CPUs with bf16 units; the compiled model must report f32
    assert s.property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    assert s.property("INFERENCE_NUM_THREADS") == 1
    assert make_session(models["fp32"], threads=2, runtime="openvino").property("INFERENCE_NUM_THREADS") == 2
    assert s.inputs[0].name == "input" and s.inputs[0].shape[1:] == [3, SIZE, SIZE] and s.inputs[0].shape[0] is None
    assert s.outputs[0].name == "logits" and s.outputs[0].type == "tensor(float)"


@needs_openvino
@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_openvino_agrees_with_onnxruntime(models, which):
    x = np.random.default_rng(2).standard_normal((37, 3, SIZE, SIZE), dtype=np.float32)
    want = run_batched(make_session(models[which], threads=1), x, 16, output_name="logits")
    got = run_batched(make_session(models[which], threads=1, runtime="openvino"), x, 16, output_name="logits")
    assert got.shape == want.shape == (37, CLASSES)
    if which == "fp32":  # fp32 as fp32: the same numbers up to summation order (bf16 would be ~1e-2 off)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    else:  # the same QDQ graph run by other INT8 kernels: the same predictions
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9


@needs_openvino
def test_validate_compares_runtimes_side_by_side(models, tmp_path, capsys):
    out = tmp_path / "v.json"
    assert main(["validate", str(models["fp32"]), str(models["int8"]), "--data", f"npz:{models['data']}",
                 "--runtime", "onnxruntime", "openvino", "--runs", "4", "--warmup", "1", "--batch-sizes", "1", "4",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tiny.int8 [openvino]" in text and "deploy tiny.int8 on" in text
    result = json.loads(out.read_text())
    assert set(result["runtimes"]) == {"openvino"} and result["settings"]["runtime"] == "onnxruntime"
    ov = result["runtimes"]["openvino"]["tiny"]
    assert ov["agreement"] == 1.0 and ov["accuracy"] == result["models"]["tiny"]["accuracy"]
    assert ov["machine"]["runtime"] == "openvino" and ov["machine"]["openvino"]
    s = runtime_summary(result)
    assert s["runtimes"] == ["onnxruntime", "openvino"] and not s["disagreements"]
    assert s["recommendation"]["model"] == "tiny.int8" and s["recommendation"]["runtime"] in s["runtimes"]
    assert set(s["models"]["tiny.int8"]["openvino"]["ratio_to_fp32"]) == {"1", "4"}
    assert "## Which runtime?" in "\n".join(runtime_markdown(s))


def _result(ov_top1_lost: int, ov_faster: bool) -> dict:
    """A two-model, two-runtime validate result built by hand: 200 images, OpenVINO loses some."""
    n = 200

    def block(p50: float, correct: int) -> dict:
        lat = {bs: {"p50": p50 * f, "round_p50": [p50 * f] * 5} for bs, f in (("1", 1), ("64", 40))}
        return {"accuracy": {"top1": correct / n, "n": n}, "latency_ms": lat, "bytes": 1}

    models = {"m": block(2.0, 150), "m.int8": block(1.5, 150)}
    from distill2deploy.deploy.regression import paired_accuracy

    base = np.arange(n) < 150
    now = base.copy()
    now[:ov_top1_lost] = False
    ov = {k: {**block(v["latency_ms"]["1"]["p50"] * (0.5 if ov_faster else 2.0), int(now.sum())),
              "agreement": float((now == base).mean()), "top1_change": paired_accuracy(base, now),
              "machine": {"openvino": "9.9"}} for k, v in models.items()}
    return {"models": models, "runtimes": {"openvino": ov},
            "settings": {"runtime": "onnxruntime", "machine": {"onnxruntime": "1.0"}}}


def test_summary_picks_the_fastest_runtime_that_agrees():
    s = runtime_summary(_result(0, ov_faster=True))
    assert s["recommendation"]["runtime"] == "openvino" and not s["disagreements"]
    assert s["models"]["m.int8"]["openvino"]["ratio"] == {"1": 0.5, "64": 0.5}
    assert s["models"]["m.int8"]["openvino"]["ratio_to_fp32"]["1"] == pytest.approx(0.375)
    assert runtime_summary(_result(0, ov_faster=False))["recommendation"]["runtime"] == "onnxruntime"


def test_summary_flags_a_runtime_that_computes_something_else():
    s = runtime_summary(_result(20, ov_faster=True))  # 10 points lost on 200 images: significant
    assert any("m.int8 on openvino: top-1 -10.00 pts" in d for d in s["disagreements"])
    assert s["recommendation"]["runtime"] == "onnxruntime"  # faster, but not the same model any more
    assert "not considered because their accuracy differs: openvino" in s["recommendation"]["why"]
    assert any(line.startswith("warning: runtimes disagree") for line in runtime_lines(s))
    assert runtime_summary({"models": {}, "settings": {}}) == {}


def test_export_random_init_needs_the_flag(tmp_path, capsys):
    out = tmp_path / "sv2.onnx"
    assert main(["export", "--model", "shufflenetv2_cifar", "--num-classes", "10", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no pretrained weights" in err and "--random-init" in err and not out.exists()
    assert main(["export", "--model", "resnet20_cifar", "--random-init", "--checkpoint", "x.pth",
                 "--out", str(out)]) == 2


@pytest.mark.slow
def test_export_random_init_writes_the_same_graph_twice(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for out in (a, b):
        assert main(["export", "--model", "resnet8x4_cifar", "--num-classes", "10", "--random-init",
                     "--out", str(out)]) == 0
    assert a.read_bytes() == b.read_bytes()
    from distill2deploy.deploy.metadata import read_metadata

    assert read_metadata(a)["num_classes"] == 10


def test_check_compares_only_within_one_runtime(models, tmp_path, capsys):
    from .test_check import FAST

    baseline = tmp_path / "baseline.json"
    assert main(["check", str(models["fp32"]), "--baseline", str(baseline), "--update-baseline", *FAST]) == 0
    assert json.loads(baseline.read_text())["roles"]["tiny"]["machine"]["runtime"] == "onnxruntime"
    capsys.readouterr()
    assert main(["check", str(models["fp32"]), "--baseline", str(baseline), "--runtime", "openvino", *FAST]) == 2
    err = capsys.readouterr().err
    assert "timed on onnxruntime, not openvino" in err and "--update-baseline --role tiny.openvino" in err
    if HAVE_OPENVINO:  # a baseline of its own: recorded and checked on OpenVINO
        assert main(["check", str(models["fp32"]), "--baseline", str(baseline), "--update-baseline", "--role",
                     "tiny.openvino", "--runtime", "openvino", *FAST]) == 0
        entry = json.loads(baseline.read_text())["roles"]["tiny.openvino"]
        assert entry["machine"]["runtime"] == "openvino" and entry["machine"]["openvino"]
        assert main(["check", str(models["fp32"]), "--baseline", str(baseline), "--role", "tiny.openvino",
                     *FAST]) in (0, 1)  # the runtime comes from the baseline; the verdict is the load's business
        assert "on openvino" in capsys.readouterr().err


@needs_openvino
def test_serve_on_openvino_through_the_micro_batcher(models):
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from distill2deploy.serving import create_app

    x = np.random.default_rng(3).standard_normal((12, 3, SIZE, SIZE), dtype=np.float32)
    want = run_batched(make_session(models["fp32"], threads=1), x, 16)
    app = create_app([models["fp32"]], threads=1, max_batch=8, max_delay_ms=20, runtime="openvino")
    with TestClient(app) as client:
        assert client.get("/v2/models/tiny").json()["platform"] == "openvino"

        def infer(i: int) -> np.ndarray:
            body = {"inputs": [{"name": "input", "shape": [1, 3, SIZE, SIZE], "datatype": "FP32",
                                "data": x[i].ravel().tolist()}]}
            r = client.post("/v2/models/tiny/infer", json=body)
            assert r.status_code == 200, r.text
            return np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(1, CLASSES)

        with ThreadPoolExecutor(6) as pool:  # concurrent requests share micro-batches
            got = np.concatenate(list(pool.map(infer, range(len(x)))))
        metrics = client.get("/metrics").text
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert 'model="tiny"' in metrics


def _depthwise_model(path: Path) -> Path:
    """Conv(3->8) + Relu, a depthwise 3x3 conv, a 1x1 identity conv, pooled. The depthwise weights
    of channel c scale like 10^(-3 + 3c/7) and its input like the inverse, so every activation is
    about the same size (per-tensor activation scales lose nothing) but the weights span 1000x."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    scale = np.logspace(-3, 0, 8)[:, None, None, None]
    w1 = (rng.standard_normal((8, 3, 1, 1)) / scale).astype(np.float32)
    dw = (rng.standard_normal((8, 1, 3, 3)) * scale).astype(np.float32)
    eye = np.eye(8, dtype=np.float32)[:, :, None, None]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="pointwise"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "dw"], ["c2"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c2", "eye"], ["c3"], name="identity"),
             helper.make_node("GlobalAveragePool", ["c3"], ["g"], name="pool"),
             helper.make_node("Flatten", ["g"], ["logits"], name="flatten")]
    graph = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 8])],
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (dw, "dw"), (eye, "eye"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_conv_kept_in_float_stays_float_in_onnxruntime(tmp_path):
    """onnxruntime's WeightBiasQuantization would quantize the excluded depthwise conv (between a
    DequantizeLinear and a QuantizeLinear) per tensor, rounding its small channels' weights to zero;
    sessions here turn it off, so they compute what the file says."""
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((64, 3, 8, 8), dtype=np.float32)
    fp32 = _depthwise_model(tmp_path / "dw.onnx")
    q = tmp_path / "dw.int8.onnx"
    quantize_int8(fp32, q, x, calib_batch_size=32, threads=1, nodes_to_exclude=["depthwise"])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the file's ops, literally
    literal = ort.InferenceSession(str(q), opts, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = make_session(q, threads=1).run(x)
    np.testing.assert_allclose(got, literal, rtol=0.05, atol=0.05 * np.abs(literal).max())


@needs_openvino
def test_openvino_compiles_each_batch_size_once_up_to_a_bound(models):
    from distill2deploy.deploy.runtimes import OpenVinoSession

    x = np.random.default_rng(4).standard_normal((5, 3, SIZE, SIZE), dtype=np.float32)
    want = make_session(models["fp32"], threads=1).run(x)
    s = OpenVinoSession(models["fp32"], threads=1, static_batches=2)
    assert s.compiled_batches() == [1] and s.inputs[0].shape[0] is None  # batch 1 at load; the port stays dynamic
    for n in (1, 3, 5, 4, 3):  # 3 gets the second static slot; 5 and 4 share the dynamic compilation
        np.testing.assert_allclose(s.run(x[:n]), want[:n], rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert s.compiled_batches() == [1, 3, None]
    out = s.run(x[:1])
    s.run(x[1:2])
    np.testing.assert_allclose(out, want[:1], rtol=1e-4, atol=1e-4 * np.abs(want).max())  # a copy, not the buffer
