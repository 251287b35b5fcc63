"""Bad input through the real CLI: a short message, exit code 2, no traceback, nothing damaged."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill2deploy.cli import main
from distill2deploy.errors import UserError

from .conftest import SAMPLE_NPZ, WEIGHTS, need_shared


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"


def test_config_typo_suggests(tmp_path, capsys):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("distill:\n  epochz: 3\n")
    code, err = run_cli(capsys, "pipeline", str(cfg))
    assert_user_error(code, err, "distill.epochz", "did you mean 'epochs'")


def test_override_typo_suggests(capsys):
    code, err = run_cli(capsys, "pipeline", "quickstart", "-o", "distill.lr_milestones=[1]")
    assert_user_error(code, err, "unknown key 'distill.lr_milestones'")


def test_wrong_type(tmp_path, capsys):
    code, err = run_cli(capsys, "pipeline", "quickstart", "-o", "distill.epochs=many")
    assert_user_error(code, err, "distill.epochs", "expected int")


def test_missing_checkpoint_file(tmp_path, capsys):
    code, err = run_cli(capsys, "pipeline", "quickstart", "--out", str(tmp_path / "r"),
                        "-o", "teacher.checkpoint=/nonexistent/teacher.pth")
    assert_user_error(code, err, "teacher.checkpoint", "/nonexistent/teacher.pth")


def test_unknown_model_suggests_timm_names(tmp_path, capsys):
    code, err = run_cli(capsys, "export", "--model", "resnet56_cifr", "--out", str(tmp_path / "m.onnx"))
    assert_user_error(code, err, "resnet56_cifar")
    assert not (tmp_path / "m.onnx").exists()


def test_checkpoint_that_does_not_fit(tmp_path, capsys, resnet56_weights):
    code, err = run_cli(capsys, "export", "--model", "resnet20_cifar", "--checkpoint", str(resnet56_weights),
                        "--out", str(tmp_path / "m.onnx"))
    assert_user_error(code, err, "resnet20_cifar")
    code, err = run_cli(capsys, "export", "--model", "resnet56_cifar", "--checkpoint", str(resnet56_weights),
                        "--num-classes", "10", "--out", str(tmp_path / "m.onnx"))
    assert_user_error(code, err, "fc")
    assert not (tmp_path / "m.onnx").exists()


def test_offline_hub_pull_names_checkpoint_key(tmp_path, capsys, monkeypatch):
    import urllib.error

    def offline(*a, **k):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    need_shared()
    code, err = run_cli(capsys, "pipeline", "quickstart", "--out", str(tmp_path / "r"),
                        "-o", f"data.source=npz:{SAMPLE_NPZ}")
    assert_user_error(code, err, "teacher.checkpoint")


def test_corrupt_npz(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file")
    code, err = run_cli(capsys, "validate", str(tmp_path / "x.onnx"), "--data", f"npz:{bad}")
    assert code == 2 and "Traceback" not in err


def test_mislabelled_npz(tmp_path, capsys, resnet56_weights):
    x = np.zeros((4, 32, 32, 3), np.uint8)
    bad = tmp_path / "mislabelled.npz"
    np.savez(bad, x_train=x, y_train=np.array([0, 1, 2, 7]), x_test=x, y_test=np.array([0, 1, 2, 3]),
             fine_label_names=np.array(["a", "b", "c", "d"]))
    code, err = run_cli(capsys, "pipeline", "quickstart", "--out", str(tmp_path / "r"),
                        "-o", f"data.source=npz:{bad}", "-o", f"teacher.checkpoint={resnet56_weights}")
    assert_user_error(code, err, "label")


def test_unknown_data_scheme(capsys, tmp_path):
    code, err = run_cli(capsys, "pipeline", "quickstart", "--out", str(tmp_path / "r"), "-o", "data.source=npy:x")
    assert_user_error(code, err, "npz")


def test_validate_needs_our_metadata(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["input"], ["logits"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), path)
    need_shared()
    code, err = run_cli(capsys, "validate", str(path), "--data", f"npz:{SAMPLE_NPZ}")
    assert_user_error(code, err, "not exported by distill2deploy")


@pytest.mark.slow
def test_debug_shows_traceback(tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("distill:\n  epochz: 3\n")
    out = subprocess.run([sys.executable, "-m", "distill2deploy", "pipeline", str(cfg), "--debug"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" in out.stderr
    out = subprocess.run([sys.executable, "-m", "distill2deploy", "pipeline", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "did you mean 'epochs'" in out.stderr


def test_debug_lets_the_error_through(tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("distill:\n  epochz: 3\n")
    with pytest.raises(UserError, match="did you mean 'epochs'"):
        main(["pipeline", str(cfg), "--debug"])


def test_every_help_has_an_example(capsys):
    for cmd in ([], ["pipeline"], ["teacher"], ["distill"], ["export"], ["quantize"], ["validate"], ["report"]):
        with pytest.raises(SystemExit) as exit_:
            main([*cmd, "--help"])
        assert exit_.value.code == 0 and "example" in capsys.readouterr().out, cmd


def test_failed_rerun_does_not_damage_finished_run(tmp_path, capsys, resnet56_weights):
    """A bad override on an existing run directory must leave its artifacts as they were."""
    need_shared()
    run = tmp_path / "run"
    args = ["teacher", "quickstart", "--out", str(run), "-o", f"data.source=npz:{SAMPLE_NPZ}",
            "-o", f"teacher.checkpoint={resnet56_weights}", "-o", "data.subset.test=32", "-o", "data.subset.train=32"]
    assert main(args) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, err = run_cli(capsys, *args, "-o", "teacher.model=resnet56_cifr")
    assert_user_error(code, err, "resnet56_cifar")
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert before == after
