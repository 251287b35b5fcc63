"""The standalone export/quantize/validate commands run the stages' own functions, so they cannot diverge."""
from __future__ import annotations

import numpy as np
import pytest

from distill2deploy.commands import export, quantize, validate
from distill2deploy.config import ExportConfig, PipelineConfig, QuantizeConfig, ValidateConfig
from distill2deploy.data import Split
from distill2deploy.deploy.quantize import calibration_inputs
from distill2deploy.deploy.validate import per_model_inputs
from distill2deploy.errors import UserError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _split(n: int, classes: int = 4) -> Split:
    rng = np.random.default_rng(0)
    return Split(images=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), labels=np.arange(n) % classes)


def test_calibration_is_whole_batches_stratified_and_seeded() -> None:
    train = _split(100)
    args = dict(batch_size=16, mean=MEAN, std=STD, input_size=8, batch_key="quantize.calib_batch_size")
    a = calibration_inputs(train, samples=70, seed=0, **args)
    assert a.shape == (64, 3, 8, 8) and a.dtype == np.float32  # 70 rounded down to 4 batches of 16
    assert np.array_equal(a, calibration_inputs(train, samples=70, seed=0, **args))
    assert not np.array_equal(a, calibration_inputs(train, samples=70, seed=1, **args))
    assert calibration_inputs(train, samples=1000, seed=0, **args).shape[0] == 96  # all of a smaller split


def test_calibration_smaller_than_one_batch_names_the_setting() -> None:
    with pytest.raises(UserError, match="fewer than one batch of 32") as e:
        calibration_inputs(_split(20), samples=512, batch_size=32, seed=0, mean=MEAN, std=STD, input_size=8,
                           batch_key="--calib-batch-size")
    assert e.value.where == "--calib-batch-size"


def test_validate_preprocesses_each_model_as_its_metadata_says() -> None:
    images = per_model_inputs(_split(6).images)
    small = images({"mean": list(MEAN), "std": list(STD), "input_size": 8})
    assert small.shape == (6, 3, 8, 8)
    assert images({"mean": list(MEAN), "std": list(STD), "input_size": 8}) is small  # computed once
    assert images({"mean": list(MEAN), "std": list(STD), "input_size": 16}).shape == (6, 3, 16, 16)


def test_command_defaults_are_the_config_defaults() -> None:
    import argparse

    sub = argparse.ArgumentParser().add_subparsers(dest="command")
    for module in (export, quantize, validate):
        module.add_parser(sub, [])
    q = sub.choices["quantize"].parse_args(["m.onnx"])
    assert (q.calib_samples, q.calib_batch_size, q.seed, q.calibrate_method) == (
        QuantizeConfig().calib_samples, QuantizeConfig().calib_batch_size, PipelineConfig().seed,
        QuantizeConfig().calibrate_method)
    e = sub.choices["export"].parse_args([])
    assert (e.opset, e.parity_samples) == (ExportConfig().opset, ExportConfig().parity_samples)
    v = sub.choices["validate"].parse_args(["m.onnx"])
    assert (v.batch_sizes, v.runs, v.warmup) == (ValidateConfig().batch_sizes, ValidateConfig().runs,
                                                 ValidateConfig().warmup)
