"""`distill2deploy check`: every exit code, on tiny ONNX models built here (no training, no ../shared).

The models are a conv stack whose depth sets the compute, with distill2deploy metadata, and a test
set labelled by the reference model's own predictions (so it is right on all of them and a model
with shuffled classifier weights is not).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from distill2deploy.cli import main
from distill2deploy.deploy import regression as rg
from distill2deploy.deploy.baseline import load_baseline, pack_bits, unpack_bits
from distill2deploy.deploy.evaluate import predict_onnx
from distill2deploy.deploy.metadata import build_metadata, set_props
from distill2deploy.data import preprocess

CLASSES, SIZE, N = 4, 16, 64
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
FAST = ["--rounds", "6", "--batch-sizes", "4", "--max-slowdown", "0.5"]  # tiny models: a generous budget


def tiny_model(path: Path, *, depth: int = 2, size: int = SIZE, shuffle_fc: bool = False) -> Path:
    """Conv(3->16) then ``depth`` 16->16 convs, pooling, a linear layer; fixed seed weights."""
    rng = np.random.default_rng(0)
    inits, nodes, prev, cin = [], [], "input", 3
    for i in range(depth + 1):
        w = (rng.standard_normal((16, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev, cin = f"r{i}", 16
    fc = rng.standard_normal((CLASSES, 16)).astype(np.float32)
    if shuffle_fc:
        fc = fc[::-1].copy()
    inits.append(numpy_helper.from_array(fc, "fc"))
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
              helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            ["N", 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    set_props(model, build_metadata(model_name="tiny", class_names=[f"c{i}" for i in range(CLASSES)], mean=MEAN,
                                    std=STD, input_size=size, config_hash="0" * 64))
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("check")
    good = tiny_model(d / "model.onnx")
    images = np.random.default_rng(1).integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)
    labels = predict_onnx(good, preprocess(images, mean=MEAN, std=STD, input_size=SIZE)).argmax(1)
    names = np.array([f"c{i}" for i in range(CLASSES)])  # the model's classes (its predictions may skip some)
    np.savez(d / "test.npz", x_test=images, y_test=labels, fine_label_names=names)
    np.savez(d / "other.npz", x_test=images[::-1].copy(), y_test=labels[::-1].copy(), fine_label_names=names)
    for name, kw in {"slow": {"depth": 10}, "wrong": {"shuffle_fc": True}, "small": {"size": 8}}.items():
        (d / name).mkdir()
        tiny_model(d / name / "model.onnx", **kw)
    baseline = d / "baseline.json"
    assert main(["check", str(good), "--baseline", str(baseline), "--update-baseline", "--data",
                 f"npz:{d / 'test.npz'}", *FAST]) == 0
    return {"dir": d, "good": good, "baseline": baseline, "data": f"npz:{d / 'test.npz'}"}


def check(s: dict[str, Path], model: Path, *extra: str) -> int:
    return main(["check", str(model), "--baseline", str(s["baseline"]), *FAST, *extra])


@pytest.mark.slow
def test_update_writes_a_role_entry(setup):
    base = load_baseline(setup["baseline"])
    entry = base["roles"]["model"]
    assert entry["input_shape"] == [3, SIZE, SIZE] and entry["machine"]["threads"] == 1
    assert len(entry["latency"]["4"]["relative"]) == 6 and entry["latency"]["4"]["clock"] == "thread_cpu"
    assert entry["accuracy"]["top1"] == 1.0 and entry["accuracy"]["n"] == N
    assert not list(setup["dir"].glob(".baseline.json.*"))  # atomic write left no temp file


@pytest.mark.slow
def test_unchanged_model_passes_and_writes_json(setup, tmp_path, capsys):
    out = tmp_path / "check.json"
    assert check(setup, setup["good"], "--data", setup["data"], "--json", str(out)) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and "latency @bs4" in text and "top-1 (64 images)" in text
    result = json.loads(out.read_text())
    assert result["passed"] and result["figures"]["top1"]["change_pts"] == 0.0
    assert result["machine_differences"] == []


@pytest.mark.slow
def test_more_compute_under_the_same_name_fails(setup, capsys):
    assert check(setup, setup["dir"] / "slow" / "model.onnx") == 1
    out = capsys.readouterr().out
    assert "FAIL: latency_bs4 regressed" in out and "REGRESSION" in out


@pytest.mark.slow
def test_accuracy_drop_fails(setup, capsys):
    assert check(setup, setup["dir"] / "wrong" / "model.onnx", "--data", setup["data"], "--max-slowdown", "5") == 1
    assert "top1 regressed" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "corrupt", "foreign", "shape", "unreadable", "other_data",
                                  "threads", "role", "batch"])
def test_bad_input_exits_2(setup, tmp_path, capsys, case):
    model, baseline, extra = setup["good"], setup["baseline"], []
    if case == "missing":
        baseline = tmp_path / "nope.json"
    elif case == "corrupt":
        baseline = tmp_path / "corrupt.json"
        baseline.write_text('{"format": "distill2deploy.baseline/1", "roles": {')
    elif case == "foreign":
        baseline = tmp_path / "validate.json"
        baseline.write_text(json.dumps({"models": {}}))
    elif case == "shape":
        model = setup["dir"] / "small" / "model.onnx"
    elif case == "unreadable":
        model = tmp_path / "model.onnx"
        model.write_bytes(b"not a protobuf at all")
    elif case == "other_data":
        extra = ["--data", f"npz:{setup['dir'] / 'other.npz'}"]
    elif case == "threads":
        extra = ["--threads", "2"]
    elif case == "role":
        extra = ["--role", "student.int8"]
    elif case == "batch":
        extra = ["--batch-sizes", "64"]
    argv = ["check", str(model), "--baseline", str(baseline), "--rounds", "6", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "fix:" in err, err
    assert "Traceback" not in err


def test_roles_are_picked_by_name_or_content(setup, tmp_path):
    from distill2deploy.deploy.baseline import select_role

    base = {"roles": {"student": {"model_sha256": "x"}, "student.int8": {"model_sha256": "y"}}}
    assert select_role(base, tmp_path / "student.int8.onnx", None, "b") == "student.int8"
    copy = tmp_path / "renamed.onnx"
    copy.write_bytes(b"abc")
    import hashlib

    base["roles"]["teacher"] = {"model_sha256": hashlib.sha256(b"abc").hexdigest()}
    assert select_role(base, copy, None, "b") == "teacher"


def test_statistics():
    rng = np.random.default_rng(0)
    base = 2.0 * (1 + 0.05 * rng.standard_normal(20))
    same = 2.0 * (1 + 0.05 * rng.standard_normal(20))
    assert rg.compare_latency(base, same, max_slowdown=0.1, alpha=0.05)["verdict"] == rg.OK
    slow = rg.compare_latency(base, 1.3 * same, max_slowdown=0.1, alpha=0.05)
    assert slow["verdict"] == rg.REGRESSION and slow["ci95"][0] > 0.1
    assert rg.compare_latency(base, 1.05 * same, max_slowdown=0.1, alpha=0.05)["verdict"] == rg.OK
    noisy = 2.0 * (1 + 0.3 * rng.standard_normal((2, 8)))  # 1.15x, but 30% noise and 8 rounds: not confident
    assert rg.compare_latency(noisy[0], 1.15 * noisy[1], max_slowdown=0.1, alpha=0.05)["verdict"] == rg.OK
    assert rg.compare_latency(base, 0.5 * same, max_slowdown=0.1, alpha=0.05)["verdict"] == rg.IMPROVED

    correct = rng.random(1000) < 0.7
    worse = correct.copy()
    worse[np.flatnonzero(correct)[:60]] = False  # -6 points
    r = rg.compare_accuracy(correct, worse, max_drop=0.5, alpha=0.05)
    assert r["verdict"] == rg.REGRESSION and r["lost"] == 60 and r["gained"] == 0
    assert r["ci95_pts"][1] < -0.5
    tiny = correct.copy()
    tiny[np.flatnonzero(correct)[:3]] = False  # -0.3 points: within budget
    assert rg.compare_accuracy(correct, tiny, max_drop=0.5, alpha=0.05)["verdict"] == rg.OK
    assert np.array_equal(unpack_bits(pack_bits(correct), len(correct)), correct)


def test_workflow_runs_real_flags():
    """The ready-to-copy workflow must keep working as the CLI changes: every flag it passes exists."""
    import re

    import yaml

    from distill2deploy.cli import build_parser

    wf = yaml.safe_load((Path(__file__).resolve().parents[1] / ".github/workflows/model-check.yml").read_text())
    runs = " ".join(step.get("run", "") for step in wf["jobs"]["check"]["steps"])
    check = build_parser()._subparsers._group_actions[0].choices["check"]
    known = {o for a in check._actions for o in a.option_strings}
    used = set(re.findall(r"(?<=\s)--[a-z][a-z-]+", " check ".join(re.findall(r"distill2deploy check([^\n]*(?:\\\n[^\n]*)*)", runs))))
    assert used and used <= known, used - known


def test_machine_fingerprint_and_reference_are_stable():
    from distill2deploy.deploy.benchmark import reference_model
    from distill2deploy.deploy.machine import differences, fingerprint

    here = fingerprint(1)
    assert here["threads"] == 1 and here["cores"] >= 1 and here["onnxruntime"]
    other = {**here, "cpu": "Other CPU", "isa": [*here["isa"], "amx_int8"], "threads": 2}
    moved = differences(here, other)
    assert any(m.startswith("cpu:") for m in moved) and any("+amx_int8" in m for m in moved)
    assert any(m.startswith("threads:") for m in moved) and differences(here, dict(here)) == []
    # the yardstick must be the same network in every process and on every machine
    assert reference_model().SerializeToString() == reference_model().SerializeToString()
