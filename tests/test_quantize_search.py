"""Quantization search, calibration methods and quantization-aware distillation (issue 11)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from distill2deploy.deploy import quantize_int8
from distill2deploy.deploy.int8_report import search_markdown
from distill2deploy.deploy.quantize_search import candidate_grid, held_out_split, pick, search_int8

from .test_deploy import _inputs, exported  # noqa: F401  (the tiny exported model fixture)


def _activation_scales(path) -> dict[str, float]:
    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in proto.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def test_entropy_calibration_is_not_minmax(exported, tmp_path):  # noqa: F811
    """onnxruntime's quantize_static ran entropy with as many histogram bins as quantized bins, i.e.
    minmax; calibrated here, entropy clips the long tails of heavy-tailed activations."""
    x = _inputs(64, seed=3) * np.random.default_rng(4).standard_t(2, size=(64, 1, 1, 1)).astype(np.float32)
    scales = {}
    for method in ("minmax", "entropy"):
        quantize_int8(exported[0], tmp_path / f"{method}.onnx", x, calibrate_method=method, preprocess=False)
        scales[method] = _activation_scales(tmp_path / f"{method}.onnx")
    assert scales["minmax"].keys() == scales["entropy"].keys() and scales["minmax"]
    differ = [k for k in scales["minmax"] if not np.isclose(scales["minmax"][k], scales["entropy"][k])]
    assert len(differ) >= len(scales["minmax"]) // 2
    # the KL threshold lies inside the observed range: never a wider scale than minmax
    assert all(scales["entropy"][k] <= scales["minmax"][k] * (1 + 1e-6) for k in scales["minmax"])


# ---------------------------------------------------------------- candidate selection and data split
def test_pick_takes_the_fastest_within_budget():
    rows = [{"drop_pt": 0.0, "latency_ratio": 0.80},   # accurate, slowest
            {"drop_pt": 0.9, "latency_ratio": 0.60},   # within 1.0: the fastest that fits
            {"drop_pt": 3.0, "latency_ratio": 0.40},   # fastest, over budget
            {"drop_pt": 0.5, "latency_ratio": 0.60}]   # as fast as #1 with a smaller drop: wins the tie
    assert pick(rows, 1.0) == 3
    assert pick(rows, 0.6) == 3
    assert pick(rows, 0.4) == 0
    assert pick(rows, 5.0) == 2
    assert pick([{"drop_pt": 2.0, "latency_ratio": 0.5}], 1.0) is None


def test_pick_treats_latency_within_round_noise_as_a_tie():
    """Candidates whose per-round latency ratios overlap the fastest one's are not measurably slower:
    the lowest bound among them is kept, not whichever the load happened to favour."""
    rows = [{"drop_ucb_pt": 0.9, "latency_ratio": 0.50, "latency_ratio_range": [0.45, 0.60]},  # fastest
            {"drop_ucb_pt": 0.2, "latency_ratio": 0.55, "latency_ratio_range": [0.52, 0.70]},  # tied, safer
            {"drop_ucb_pt": 0.0, "latency_ratio": 0.80, "latency_ratio_range": [0.75, 0.85]},  # measurably slower
            {"drop_ucb_pt": 1.5, "latency_ratio": 0.30, "latency_ratio_range": [0.25, 0.35]}]  # over budget
    assert pick(rows, 1.0, score="drop_ucb_pt") == 1
    rows[1]["latency_ratio_range"] = [0.62, 0.70]  # no overlap: the faster one stands
    assert pick(rows, 1.0, score="drop_ucb_pt") == 0
    assert pick(rows, 0.1, score="drop_ucb_pt") == 2


def test_paired_drop_bound_grows_with_disagreement():
    """Two candidates with no net drop: the one that flips more predictions gets the higher bound; the
    standard error is over images, not over views of the same image."""
    from distill2deploy.deploy.quantize_score import paired_drop

    labels = np.arange(100) % 10
    onehot = np.eye(10, dtype=np.float32)
    fp32 = onehot[labels]
    few, many = labels.copy(), labels.copy()
    few[:2] = (few[:2] + 1) % 10          # 2 right -> wrong
    many[:10] = (many[:10] + 1) % 10      # 10 right -> wrong ...
    fp32_wrong = fp32.copy()
    fp32_wrong[10:18] = onehot[(labels[10:18] + 1) % 10]  # ... and 8 wrong in fp32 that INT8 gets right
    a, b = paired_drop(fp32, onehot[few], labels), paired_drop(fp32_wrong, onehot[many], labels)
    assert a["drop_pt"] == pytest.approx(2.0) and b["drop_pt"] == pytest.approx(2.0)
    assert a["disagreement"] == pytest.approx(0.02) and b["disagreement"] == pytest.approx(0.18)
    assert a["drop_pt"] < a["drop_ucb_pt"] < b["drop_ucb_pt"]
    # flips in rows 0 and 50: two images, or one image seen twice (2 views of 50): a wider bound
    twice = labels.copy()
    twice[[0, 50]] = (twice[[0, 50]] + 1) % 10
    assert paired_drop(fp32, onehot[twice], labels[:50])["drop_ucb_pt"] > 1.2 * paired_drop(
        fp32, onehot[twice], labels)["drop_ucb_pt"]
    with pytest.raises(ValueError, match="whole views"):
        paired_drop(fp32, onehot[few], labels[:30])


def test_unseen_views_are_seeded_and_leave_the_random_state_alone():
    import torch

    from distill2deploy.deploy.quantize_score import unseen_views

    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    state = torch.random.get_rng_state()
    v = unseen_views(images, 3, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    assert v.shape == (18, 32, 32, 3) and v.dtype == np.uint8
    assert np.array_equal(v, unseen_views(images, 3, seed=1)) and not np.array_equal(v, unseen_views(images, 3, seed=2))
    assert not np.array_equal(v[:6], v[6:12])  # each view draws its own parameters
    assert len(unseen_views(images, 0, seed=1)) == 0
    from torchvision.transforms import v2  # another kind of view, for the benchmark comparing them

    assert np.array_equal(unseen_views(images, 1, seed=0, transform=v2.RandomHorizontalFlip(p=1.0)), images[:, :, ::-1])


def test_held_out_slice_is_training_data_disjoint_from_calibration():
    labels = np.repeat(np.arange(10), 30)  # 300 training images, balanced
    calib, held = held_out_split(labels, 128, 100, seed=0)
    assert len(held) == 100 and len(calib) == 128 and not set(calib) & set(held)
    assert np.bincount(labels[held]).tolist() == [10] * 10  # stratified
    calib, held = held_out_split(labels, 512, 1000, seed=0)  # too few images: half held out, rest calibrates
    assert len(held) == 150 and len(calib) == 150 and not set(calib) & set(held)
    assert np.array_equal(held_out_split(labels, 128, 100, seed=0)[1], held_out_split(labels, 128, 100, seed=0)[1])


def test_candidate_grid_covers_granularity_method_size():
    grid = candidate_grid(["minmax", "entropy"], [128, 512, 128])
    assert len(grid) == 8 and len({c.name for c in grid}) == 8
    assert {c.per_channel for c in grid} == {True, False} and {c.calib_samples for c in grid} == {128, 512}


def test_search_keeps_a_candidate_and_reports_every_one(exported, tmp_path):  # noqa: F811
    rng = np.random.default_rng(0)
    x, y = _inputs(96, seed=5), rng.integers(0, 10, 96)
    out = tmp_path / "best.onnx"
    info = search_int8(exported[0], out, calib_pool=x[:64], eval_inputs=x[64:], eval_labels=y[64:],
                       view_inputs=_inputs(64, seed=9),  # 2 "views" of each of the 32 held-out images
                       # 40 fits to the same whole batch of 32: built, scored and timed once
                       candidates=candidate_grid(["minmax"], [32, 40]), float_activations=[1], max_drop=100.0,
                       threads=1, batch_sizes=[1], runs=4, rounds=2, input_size=x.shape[-1], progress=False)
    names = [r["name"] for r in info["rows"]]
    assert names == ["pc-minmax-32-u8", "pt-minmax-32-u8", "pc-minmax-32-u8-float1"]
    assert info["rows"][2]["nodes_to_exclude"] and len(info["worst_sqnr"]) == 1
    assert info["within_budget"] and info["views"] == 2 and info["score"] == "drop_ucb_pt"
    assert all(r["drop_ucb_pt"] >= r["est_drop_pt"] and r["latency_ratio_range"][0] <= r["latency_ratio_range"][1]
               for r in info["rows"])
    assert info["chosen"] == info["rows"][pick(info["rows"], 100.0, score="drop_ucb_pt")]["name"]
    md = "\n".join(search_markdown(info))  # the report shows the score the search decided on
    assert "2 unseen views" in md and all(f"{r['drop_ucb_pt']:+.2f}" in md for r in info["rows"])
    assert out.is_file() and all(r["latency_ratio"] > 0 for r in info["rows"])
    assert not list(tmp_path.glob(".*"))  # scratch files removed
    assert info["warning"] is None  # random labels: fp32 is far from memorising them


# ---------------------------------------------------------------- quantization-aware distillation
@pytest.mark.slow
def test_qat_exports_qdq_that_onnxruntime_runs_as_int8(tmp_path):
    """Fake-quant training (PT2E) then the dynamo export: QuantizeLinear/DequantizeLinear around float
    Conv/Gemm with int8 weights, which onnxruntime runs; its logits match the converted PyTorch graph."""
    pytest.importorskip("torchao")
    import torch

    from distill2deploy.deploy import build_metadata, export_onnx, predict_onnx
    from distill2deploy.qat import convert_qat, prepare_qat

    from .test_deploy import CLASSES, SIZE, _tiny_model

    torch.manual_seed(0)
    prepared = prepare_qat(_tiny_model(), SIZE)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(prepared(torch.randn(8, 3, SIZE, SIZE)), torch.randint(0, CLASSES, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    converted = convert_qat(prepared)
    meta = build_metadata(model_name="tinynet", class_names=[f"c{i}" for i in range(CLASSES)],
                          mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=SIZE, config_hash="qat")
    x = _inputs(16, seed=7)
    info = export_onnx(converted, tmp_path / "qat.onnx", input_size=SIZE, metadata=meta, parity_inputs=x)
    proto = onnx.load(str(tmp_path / "qat.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("Conv") == 2 and "Gemm" in ops
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    for conv in (n for n in proto.graph.node if n.op_type == "Conv"):
        dq = producers[conv.input[1]]
        assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].dtype == np.int8
    q_zps = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[2] in inits]
    assert q_zps and all(z.dtype == np.uint8 for z in q_zps)  # U8S8, what x86 onnxruntime runs fast
    assert info["parity"]["top1_agreement"] >= 0.9 and predict_onnx(tmp_path / "qat.onnx", x).shape == (16, CLASSES)


@pytest.mark.slow
def test_pipeline_search_and_qat_end_to_end(tmp_path):
    """The quantize stage searches, adds a quantization-aware distilled student (qat.always), keeps one,
    and the report shows every candidate's held-out accuracy and latency."""
    pytest.importorskip("torchao")
    import json

    from distill2deploy.cli import main

    from .test_pipeline import quick_args

    run = tmp_path / "run"
    assert main(quick_args(run, "-o", "quantize.search=true", "-o", "quantize.search_methods=[minmax]",
                           "-o", "quantize.search_calib_samples=[32]", "-o", "quantize.search_float_activations=[1]",
                           "-o", "quantize.search_samples=64", "-o", "quantize.search_runs=2",
                           "-o", "quantize.qat.epochs=1", "-o", "quantize.qat.always=true",
                           "-o", "quantize.qat.batch_size=32")) == 0
    search = json.loads((run / "report.json").read_text())["quantize"]["search"]
    names = [r["name"] for r in search["rows"]]
    assert names[:3] == ["pc-minmax-32-u8", "pt-minmax-32-u8", "pc-minmax-32-u8-float1"]
    assert names[3].startswith("qat-kd-1ep") and search["chosen"] in names and search["eval_samples"] == 64
    assert all(r["latency_ratio"] > 0 and 0 <= r["top1"] <= 1 for r in search["rows"])
    # the QAT file is scored and kept by the search's own rule: bound over images + views, latency ranges
    assert all({"drop_ucb_pt", "est_drop_pt", "latency_ratio_range"} <= set(r) for r in search["rows"])
    kept = next(r for r in search["rows"] if r["name"] == search["chosen"])
    if search["within_budget"]:
        assert kept["drop_ucb_pt"] <= search["max_drop_pt"]
    ops = {n.op_type for n in onnx.load(str(run / "quantize" / "qat" / "student.qat.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    md = (run / "report.md").read_text()
    assert "## INT8 search" in md and all(f"`{n}`" in md for n in names)
    assert (run / "quantize_search.png").stat().st_size > 0


def test_search_warns_when_the_model_has_memorised_the_held_out_images(exported, tmp_path):  # noqa: F811
    from distill2deploy.deploy import predict_onnx

    x = _inputs(96, seed=6)
    y = predict_onnx(exported[0], x[64:]).argmax(1)  # fp32 is 100% right on these "training" labels
    info = search_int8(exported[0], tmp_path / "best.onnx", calib_pool=x[:64], eval_inputs=x[64:], eval_labels=y,
                       candidates=candidate_grid(["minmax"], [32])[:1], threads=1, batch_sizes=[1], runs=2,
                       rounds=1, input_size=x.shape[-1], progress=False)
    assert info["fp32_top1"] == 1.0 and "memorised" in info["warning"] and "search_views" in info["warning"]
    assert "memorised" in "\n".join(search_markdown(info))
    views = np.concatenate([x[64:] - 3, x[64:] * 5])  # 2 "views" it gets wrong: the drops there are informative
    info = search_int8(exported[0], tmp_path / "best.onnx", calib_pool=x[:64], eval_inputs=x[64:], eval_labels=y,
                       view_inputs=views, candidates=candidate_grid(["minmax"], [32])[:1], threads=1,
                       batch_sizes=[1], runs=2, rounds=1, input_size=x.shape[-1], progress=False)
    assert info["fp32_top1"] == 1.0 and info["fp32_view_top1"] < 0.995 and info["warning"] is None


def test_search_refuses_flags_it_would_ignore(tmp_path) -> None:
    from distill2deploy.cli import main

    rc = main(["quantize", str(tmp_path / "m.onnx"), "--data", "npz:x.npz", "--out", str(tmp_path / "q.onnx"),
               "--search", "--per-tensor"])
    assert rc == 2


def test_qat_refused_at_load_in_a_multi_process_launch(monkeypatch) -> None:
    from distill2deploy.config import PipelineConfig, QuantizeConfig, QATConfig
    from distill2deploy.config_checks import check_config
    from distill2deploy.errors import UserError

    cfg = PipelineConfig(quantize=QuantizeConfig(search=True, qat=QATConfig(epochs=1)))
    check_config(cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="one process") as e:
        check_config(cfg)
    assert e.value.where == "quantize.qat.epochs"
