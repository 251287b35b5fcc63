"""``export-triton``: the generated config.pbtxt parsed with Triton's own protobuf schema and checked
field by field against the ONNX graph and its metadata."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from distill2deploy.cli import main
from distill2deploy.deploy.metadata import read_metadata

pytestmark = pytest.mark.slow

ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: mc.TYPE_FP32}


def _dims(vi: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]


def test_export_triton_repository_matches_the_onnx_graph(resnet56_onnx: Path, tmp_path: Path) -> None:
    repo = tmp_path / "model_repository"
    (repo / "other").mkdir(parents=True)  # models already in the repository stay
    args = ["export-triton", str(resnet56_onnx), "--repo", str(repo), "--name", "cifar_r56", "--max-batch", "48",
            "--max-delay-ms", "2.5", "--instances", "2", "--threads", "3"]
    assert main(args) == 0
    model_dir = repo / "cifar_r56"
    assert (repo / "other").is_dir()
    assert (model_dir / "1" / "model.onnx").read_bytes() == resnet56_onnx.read_bytes()
    cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    graph = onnx.load(str(resnet56_onnx), load_external_data=False).graph
    meta = read_metadata(resnet56_onnx)

    assert cfg.name == "cifar_r56" and cfg.backend == "onnxruntime"
    assert cfg.max_batch_size == 48
    (inp,), (out,) = cfg.input, cfg.output
    assert inp.name == graph.input[0].name == "input"
    assert inp.data_type == ONNX_TO_TRITON[graph.input[0].type.tensor_type.elem_type]
    assert list(inp.dims) == _dims(graph.input[0])[1:] == [3, 32, 32]  # without the batch axis
    assert _dims(graph.input[0])[0] == -1  # ... which is dynamic in the graph
    assert inp.format == mc.ModelInput.FORMAT_NCHW
    assert out.name == graph.output[0].name == "logits"
    assert out.data_type == ONNX_TO_TRITON[graph.output[0].type.tensor_type.elem_type]
    assert list(out.dims) == _dims(graph.output[0])[1:] == [len(meta["class_names"])]
    assert out.label_filename == "labels.txt"
    assert (model_dir / out.label_filename).read_text().splitlines() == meta["class_names"]
    assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds == 2500
    (group,) = cfg.instance_group
    assert group.count == 2 and group.kind == mc.ModelInstanceGroup.KIND_CPU
    assert cfg.parameters["intra_op_thread_count"].string_value == "3"
    assert cfg.parameters["inter_op_thread_count"].string_value == "1"

    # same input -> same bytes (the file is reviewable and diff-able)
    first = (model_dir / "config.pbtxt").read_bytes()
    assert main(args) == 0 and (model_dir / "config.pbtxt").read_bytes() == first


def test_export_triton_bad_input_is_a_user_error(resnet56_onnx: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def run(*args: str) -> tuple[int, str]:
        code = main(["export-triton", *args])
        return code, capsys.readouterr().err

    code, err = run(str(tmp_path / "nope.onnx"), "--repo", str(tmp_path / "r"))
    assert code == 2 and "ONNX file not found" in err
    code, err = run(str(resnet56_onnx), "--repo", str(tmp_path / "r"), "--max-batch", "0")
    assert code == 2 and "--max-batch must be >= 1" in err
    code, err = run(str(resnet56_onnx), str(resnet56_onnx), "--repo", str(tmp_path / "r"))
    assert code == 2 and "unique" in err
    assert not (tmp_path / "r" / "r56").exists()
