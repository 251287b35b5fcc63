"""Nothing lost, nothing silently wrong: atomic byte-stable artifacts, the run lock, range-checked
config, refused overwrites, class/metadata checks, OS errors as messages (fast cases; the runs that
train are in test_safety_runs.py)."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from distill2deploy import _io
from distill2deploy._lock import LOCK_NAME, RunLock
from distill2deploy.cli import main
from distill2deploy.data import load_source
from distill2deploy.deploy.metadata import build_metadata, set_props
from distill2deploy.errors import UserError
from distill2deploy.models.factory import create_model

from .conftest import SAMPLE_NPZ, WEIGHTS, need_shared


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ _io
def test_artifacts_get_the_umask_mode_and_no_temp_is_left(tmp_path):
    old = os.umask(0o022)
    try:
        _io.write_json(tmp_path / "a.json", {"x": 1})
        _io.save_torch({"w": torch.ones(2)}, tmp_path / "w.pt")
    finally:
        os.umask(old)
    for name in ("a.json", "w.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "w.pt"]


def test_same_weights_give_the_same_bytes_whatever_the_file_name(tmp_path):
    sd = torch.nn.Conv2d(3, 4, 3).state_dict()
    again = torch.nn.Conv2d(3, 4, 3)  # another module holding the same weights, as after a rerun
    again.load_state_dict(sd)
    _io.save_torch(sd, tmp_path / "a.pt")
    _io.save_torch(again.state_dict(), tmp_path / "sub" / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "sub" / "b.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a.pt")["weight"], sd["weight"])


def test_json_never_holds_nan(tmp_path):
    _io.write_json(tmp_path / "r.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": np.float64("-inf")})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": None}


def test_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), _io.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_output_over_input_is_refused(tmp_path):
    src = tmp_path / "x.onnx"
    src.write_bytes(b"model")
    (tmp_path / "link.onnx").symlink_to(src)
    os.link(src, tmp_path / "hard.onnx")
    for out in (src, tmp_path / "." / "x.onnx", tmp_path / "link.onnx", tmp_path / "hard.onnx"):
        with pytest.raises(UserError, match="--out"):
            _io.refuse_overwrite(out, [src], "--out")
    _io.refuse_overwrite(tmp_path / "y.onnx", [src], "--out")


# ------------------------------------------------------------------------------------------ lock
def test_lock_names_the_holder_and_is_removed_on_release(tmp_path):
    lock = RunLock.acquire(tmp_path)
    with pytest.raises(UserError) as e:
        RunLock.acquire(tmp_path)
    assert f"pid {os.getpid()}" in str(e.value) and str(tmp_path) in str(e.value)
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    RunLock.acquire(tmp_path).release()


@pytest.mark.slow
def test_a_second_process_is_refused_and_a_killed_holder_leaves_a_stale_lock(tmp_path, capsys):
    """Real processes: the holder runs in another interpreter, then dies by SIGKILL."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from distill2deploy._lock import RunLock; "
        f"RunLock.acquire(Path({str(run_dir)!r})); print('locked', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = run_cli(capsys, "pipeline", "quickstart", "--out", str(run_dir))
        assert_user_error(code, err, "another run is using this run directory", f"pid {holder.pid}", "-c")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock.acquire(run_dir)  # the kernel released the flock with the process
    assert lock.stale is not None and lock.stale["pid"] == holder.pid
    lock.release()


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("override,key,rule", [
    ("distill.lr=0", "distill.lr", "> 0"),
    ("teacher.train.lr=-0.1", "teacher.train.lr", "> 0"),
    ("distill.gamma=0", "distill.gamma", "> 0"),
    ("distill.momentum=-0.5", "distill.momentum", ">= 0"),
    ("distill.weight_decay=-1e-4", "distill.weight_decay", ">= 0"),
    ("data.num_workers=-1", "data.num_workers", ">= 0"),
    ("data.augment.crop_padding=-4", "data.augment.crop_padding", ">= 0"),
    ("distill.milestones=[0, 3]", "distill.milestones", ">= 1"),
    ("distill.epochs=0", "distill.epochs", ">= 1"),
    ("teacher.train.epochs=-1", "teacher.train.epochs", ">= 0"),
    ("data.input_size=100000", "data.input_size", "<= 1024"),
    ("teacher.input_size=0", "teacher.input_size", ">= 8"),
    ("export.opset=999", "export.opset", "<="),
    ("export.opset=16", "export.opset", ">= 17"),
    ("validate.threads=0", "validate.threads", ">= 1"),
    ("threads=0", "threads", ">= 1"),
    ("seed=-1", "seed", ">= 0"),
    ("data.subset.train=0", "data.subset.train", ">= 1"),
    ("distill.gradient_accumulation_steps=0", "distill.gradient_accumulation_steps", ">= 1"),
])
def test_out_of_range_values_are_refused_at_load(override, key, rule, tmp_path, capsys):
    code, err = run_cli(capsys, "pipeline", "quickstart", "--out", str(tmp_path / "r"), "-o", override)
    assert_user_error(code, err, key, rule, "fix:")
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_threads_flag_is_the_threads_key(tmp_path):
    from distill2deploy.config import load_config

    cfg, _ = load_config("quickstart", ["threads=3"])
    assert cfg.threads == 3
    assert main(["pipeline", "quickstart", "--threads", "0", "--out", str(tmp_path / "r")]) == 2


def test_binary_config_file(tmp_path, capsys):
    cfg = tmp_path / "weights.yaml"
    cfg.write_bytes(b"\x80\x04\x95PK\x03\x04 binary")
    code, err = run_cli(capsys, "pipeline", str(cfg))
    assert_user_error(code, err, str(cfg), "not UTF-8")


def test_num_classes_in_model_kwargs_points_to_reset_head(capsys, tmp_path):
    code, err = run_cli(capsys, "pipeline", "quickstart", "--out", str(tmp_path / "r"),
                        "-o", "teacher.model_kwargs={num_classes: 10}")
    assert_user_error(code, err, "teacher.model_kwargs", "teacher.reset_head: true")
    code, err = run_cli(capsys, "pipeline", "quickstart", "--out", str(tmp_path / "r"), "-o", "teacher.reset_head=true")
    assert_user_error(code, err, "teacher.reset_head", "teacher.train.epochs")


def test_reset_head_fits_a_checkpoint_to_another_class_count():
    need_shared()
    ckpt = WEIGHTS / "cifar100_resnet20.pth"
    with pytest.raises(UserError) as e:
        create_model("resnet20_cifar", num_classes=10, checkpoint=ckpt, role="teacher")
    assert "teacher.reset_head: true" in e.value.format() and "num_classes: 100" not in e.value.format()
    model = create_model("resnet20_cifar", num_classes=10, checkpoint=ckpt, role="teacher", reset_head=True)
    assert model.get_classifier().out_features == 10
    sd = torch.load(ckpt, weights_only=True)
    sd = sd.get("state_dict", sd)
    own = model.state_dict()
    body = [k for k in own if not k.startswith("fc.") and "num_batches" not in k]
    assert body and all(torch.equal(own[k], sd[k]) for k in body if k in sd)


# ------------------------------------------------------------------------------------------ data
def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


def _images(n: int, value: int = 0) -> np.ndarray:
    return np.full((n, 8, 8, 3), value, np.uint8)


def test_one_stray_label_does_not_make_new_classes(tmp_path):
    y = np.arange(20) % 10
    y[3] = 150  # one bad label in a 10-class file without names
    src = _npz(tmp_path / "d.npz", x_train=_images(20), y_train=y, x_test=_images(10), y_test=np.arange(10))
    with pytest.raises(UserError) as e:
        load_source(src)
    msg = e.value.format()
    assert "fine_label_names" in msg and "data.num_classes" in msg and "150" in msg
    with pytest.raises(UserError, match=r"labels go up to 150 but data.num_classes is 10"):
        load_source(src, num_classes=10)
    y[3] = 3
    ds = load_source(_npz(tmp_path / "ok.npz", x_train=_images(20), y_train=y, x_test=_images(10),
                          y_test=np.arange(10)), num_classes=12)
    assert ds.num_classes == 12 and not ds.named


def test_subset_clipping_and_foreign_stats_warn(tmp_path):
    from distill2deploy.config import load_config
    from distill2deploy.stages import RunContext

    rng = np.random.default_rng(0)
    x = rng.integers(200, 256, size=(30, 8, 8, 3), dtype=np.uint8)  # bright images: not CIFAR-100's stats
    src = _npz(tmp_path / "d.npz", x_train=x, y_train=np.arange(30) % 3, x_test=x[:9], y_test=np.arange(9) % 3,
               fine_label_names=np.array(["a", "b", "c"]))
    cfg, _ = load_config("quickstart", [f"data.source={src}", "data.subset.train=100"])
    with pytest.warns(UserWarning) as rec:
        RunContext(cfg, tmp_path / "run").data(need_train=True)
    text = " ".join(str(w.message) for w in rec)
    assert "data.subset.train=100" in text and "only 30" in text
    assert "data.mean/data.std are the CIFAR-100 defaults" in text


# ------------------------------------------------------------------------------------------ models
def _tiny_classifier(path: Path, class_names: list[str], *, first_output_is_logits: bool = True) -> Path:
    """An ONNX classifier with our metadata: logit k is the mean of channel k (no training needed).

    With ``first_output_is_logits=False`` the graph's first output is the negated logits and
    ``logits`` comes second: only a reader that follows the metadata's output_name scores it right.
    """
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    neg = helper.make_tensor_value_info("neg", TensorProto.FLOAT, ["batch", 3])
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["logits"]), helper.make_node("Neg", ["logits"], ["neg"])]
    outputs = [logits, neg] if first_output_is_logits else [neg, logits]
    model = helper.make_model(helper.make_graph(nodes, "tiny", [x], outputs), opset_imports=[helper.make_opsetid("", 18)])
    set_props(model, build_metadata(model_name="tiny", class_names=class_names, mean=[0, 0, 0], std=[1, 1, 1],
                                    input_size=8, config_hash="x"))
    onnx.save(model, str(path))
    return path


def _channel_data(path: Path, n: int = 12, names: list[str] | None = None) -> str:
    """Image i is bright in channel i % 3 only, labelled i % 3."""
    x = np.zeros((n, 8, 8, 3), np.uint8)
    y = np.arange(n) % 3
    x[np.arange(n), :, :, y] = 255
    extra = {"fine_label_names": np.array(names)} if names else {}
    return _npz(path, x_test=x, y_test=y, **extra)


def test_validate_follows_the_metadata_output_name(tmp_path, capsys):
    model = _tiny_classifier(tmp_path / "m.onnx", ["r", "g", "b"], first_output_is_logits=False)
    data = _channel_data(tmp_path / "d.npz", names=["r", "g", "b"])
    out = tmp_path / "res.json"
    assert main(["validate", str(model), "--data", data, "--runs", "2", "--warmup", "0", "--batch-sizes", "1",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["models"]["m"]["accuracy"]["top1"] == 1.0


@pytest.mark.parametrize("names,needle", [(["r", "g", "b", "k"], "trained on 3 classes but the data has 4"),
                                          (["r", "b", "g"], "class 1 is 'g' in the model but 'b' in the data")])
def test_validate_refuses_data_with_other_classes(names, needle, tmp_path, capsys):
    model = _tiny_classifier(tmp_path / "m.onnx", ["r", "g", "b"])
    data = _channel_data(tmp_path / "d.npz", names=names)
    code, err = run_cli(capsys, "validate", str(model), "--data", data, "--runs", "2", "--json", str(tmp_path / "r.json"))
    assert_user_error(code, err, needle, str(model), "--data")
    assert not (tmp_path / "r.json").exists()


def test_validate_output_problems_are_messages(tmp_path, capsys, monkeypatch):
    model = _tiny_classifier(tmp_path / "m.onnx", ["r", "g", "b"])
    data = _channel_data(tmp_path / "d.npz", names=["r", "g", "b"])
    code, err = run_cli(capsys, "validate", str(model), "--data", data, "--json", str(tmp_path / "no" / "r.json"))
    assert_user_error(code, err, "--json", str(tmp_path / "no"))
    code, err = run_cli(capsys, "validate", str(model), "--data", data, "--json", str(model))
    assert_user_error(code, err, "--json", "would destroy the input")

    def full_disk(path, obj):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(_io, "write_json", full_disk)
    code, err = run_cli(capsys, "validate", str(model), "--data", data, "--runs", "2", "--warmup", "0",
                        "--batch-sizes", "1", "--json", str(tmp_path / "r.json"))
    assert_user_error(code, err, "No space left on device", str(tmp_path / "r.json"))


def test_metadata_input_size_is_bounded(tmp_path, capsys):
    model = _tiny_classifier(tmp_path / "m.onnx", ["r", "g", "b"])
    proto = onnx.load(str(model))
    set_props(proto, {"input_size": "100000"})
    onnx.save(proto, str(model))
    code, err = run_cli(capsys, "validate", str(model), "--data", _channel_data(tmp_path / "d.npz"))
    assert_user_error(code, err, "input_size 100000", str(model))


def test_quantize_refuses_its_input_as_output_and_a_quantized_model(tmp_path, capsys):
    model = _tiny_classifier(tmp_path / "m.onnx", ["r", "g", "b"])
    before = model.read_bytes()
    data = _channel_data(tmp_path / "d.npz")
    train = tmp_path / "t.npz"
    np.savez(train, **dict(np.load(data[4:])), x_train=np.load(data[4:])["x_test"],
             y_train=np.load(data[4:])["y_test"])
    for out in (str(model), str(tmp_path / "." / "m.onnx")):
        code, err = run_cli(capsys, "quantize", str(model), "--data", f"npz:{train}", "--out", out)
        assert_user_error(code, err, "--out", "would destroy the input")
    assert model.read_bytes() == before
    proto = onnx.load(str(model))
    set_props(proto, {"quantization": json.dumps({"format": "QDQ"})})
    onnx.save(proto, str(tmp_path / "q.onnx"))
    code, err = run_cli(capsys, "quantize", str(tmp_path / "q.onnx"), "--data", f"npz:{train}",
                        "--out", str(tmp_path / "qq.onnx"), "--calib-batch-size", "4", "--calib-samples", "8")
    assert_user_error(code, err, "already quantized", str(tmp_path / "q.onnx"))


def test_failed_quantization_leaves_no_temp_folder(tmp_path, monkeypatch):
    from distill2deploy.deploy import quantize as q

    model = _tiny_classifier(tmp_path / "m.onnx", ["r", "g", "b"])
    seen = {}

    def boom(src, dst, *a, **kw):
        seen["tmp"] = tempfile.gettempdir()
        raise RuntimeError("killed mid-quantization")

    monkeypatch.setattr(q, "quantize_static", boom)
    out = tmp_path / "out" / "m.int8.onnx"
    with pytest.raises(RuntimeError):
        q.quantize_int8(model, out, np.zeros((8, 3, 8, 8), np.float32), calib_batch_size=4)
    assert Path(seen["tmp"]).parent == out.parent  # onnxruntime's temp files went beside the output
    assert list(out.parent.iterdir()) == [] and tempfile.gettempdir() != seen["tmp"]


def test_export_refuses_non_finite_weights(tmp_path):
    from distill2deploy.deploy.export import export_onnx

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN or infinite"):
        export_onnx(model, tmp_path / "m.onnx", input_size=8, metadata={}, exporter="torchscript")
    assert not any(tmp_path.iterdir())


def test_out_that_is_a_file_is_a_message(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("not a directory")
    code, err = run_cli(capsys, "pipeline", "quickstart", "--out", str(target))
    assert_user_error(code, err, str(target))
    assert target.read_text() == "not a directory"
    code, err = run_cli(capsys, "export", "--model", "resnet20_cifar", "--out", str(tmp_path))
    assert_user_error(code, err, "--out", "is a directory")
