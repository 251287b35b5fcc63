"""Cache keys are derived from what each stage reads: changing a config key reruns exactly the stages that
read it and their dependants (computed over the stage graph, without training anything)."""
from __future__ import annotations

from pathlib import Path

import pytest

from distill2deploy.config import PipelineConfig, load_config
from distill2deploy.config_keys import config_hash
from distill2deploy.stages import STAGES, RunContext

ALL = {"teacher", "distill", "export", "quantize", "validate", "report"}
AFTER_DISTILL = {"distill", "export", "quantize", "validate", "report"}

# override -> the stages whose key must change (the rest must stay cached)
TABLE = {
    "seed=1": ALL,
    "data.subset.test=50": ALL,
    "data.mean=[0.5, 0.5, 0.5]": ALL,
    "data.num_workers=7": set(),  # worker processes change no result
    "teacher.train.epochs=3": ALL,
    "teacher.pretrained=false": ALL,
    "teacher.input_size=64": ALL,
    "distill.mixed_precision=bf16": ALL,  # the teacher trains and evaluates under it too
    "distill.lr=0.2": AFTER_DISTILL,
    "distill.method=dkd": AFTER_DISTILL,
    "distill.checkpoint_every_steps=5": AFTER_DISTILL,
    "student.model=shufflenetv2_cifar": AFTER_DISTILL,
    "export.opset=17": {"export", "quantize", "validate", "report"},
    "quantize.calib_samples=64": {"quantize", "validate", "report"},  # a calibration change re-exports nothing
    "quantize.calibrate_method=entropy": {"quantize", "validate", "report"},
    "validate.runs=300": {"validate", "report"},
    "validate.threads=3": {"validate", "report"},
    "threads=4": {"validate", "report"},
    "name=other": {"report"},
}


def _config(tmp_path: Path, *overrides: str) -> PipelineConfig:
    path = tmp_path / "run.yaml"
    path.write_text("seed: 0\n")
    return load_config(str(path), list(overrides))[0]


def _keys(cfg: PipelineConfig, tmp_path: Path) -> dict[str, str]:
    """Every stage's key, each upstream output standing in by its key (an output changes when its key does)."""
    ctx = RunContext(cfg, tmp_path)
    keys = {}
    for stage in STAGES:
        keys[stage.name] = stage.cache_key(ctx)
        ctx.manifests[stage.name] = {"key": keys[stage.name], "outputs_sha256": keys[stage.name]}
    return keys


@pytest.mark.parametrize("override", sorted(TABLE))
def test_a_change_reruns_the_stages_that_read_it_and_their_dependants(override: str, tmp_path: Path) -> None:
    base = _keys(_config(tmp_path), tmp_path)
    changed = _keys(_config(tmp_path, override), tmp_path)
    assert {name for name in base if base[name] != changed[name]} == TABLE[override]


def test_every_section_is_read_by_some_stage() -> None:
    read = {path.split(".")[0] for stage in STAGES for path in stage.reads}
    assert read == set(PipelineConfig.__dataclass_fields__)


def test_config_hash_changes_exactly_when_export_reruns(tmp_path: Path) -> None:
    # the ONNX metadata records config_hash(), so it may change only when the export stage reruns, and must
    for override, stages in TABLE.items():
        changed = config_hash(_config(tmp_path, override)) != config_hash(_config(tmp_path))
        assert changed == ("export" in stages), override


def test_a_configured_checkpoint_keys_by_content(tmp_path: Path) -> None:
    ckpt = tmp_path / "t.pth"
    ckpt.write_bytes(b"one")
    cfg = _config(tmp_path, f"teacher.checkpoint={ckpt}")
    first = _keys(cfg, tmp_path)
    ckpt.write_bytes(b"two")
    assert {n for n, k in _keys(cfg, tmp_path).items() if k != first[n]} == ALL


def test_method_options_key_by_their_effective_values(tmp_path: Path) -> None:
    # Spelling out a default changes nothing; the default itself is in the key, so a release that changes a
    # method's default (as ReviewKD's teacher_features did) reruns distill instead of reusing the old result.
    base = _keys(_config(tmp_path, "distill.method=reviewkd"), tmp_path)
    spelled = _keys(_config(tmp_path, "distill.method=reviewkd", "distill.options.teacher_features=preact"), tmp_path)
    assert spelled == base
    other = _keys(_config(tmp_path, "distill.method=reviewkd", "distill.options.teacher_features=output"), tmp_path)
    assert {n for n in base if base[n] != other[n]} == AFTER_DISTILL
