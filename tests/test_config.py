"""Config schema: defaults, typo suggestions, typed overrides, hashing, bundled configs."""
from __future__ import annotations

from pathlib import Path

import pytest

from distill2deploy.config import PipelineConfig, apply_overrides, load_config
from distill2deploy.config_keys import config_hash
from distill2deploy.errors import UserError


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_follow_standard_protocol(tmp_path):
    cfg, _ = load_config(write(tmp_path, "seed: 1\n"))
    assert cfg.name == "exp"
    assert cfg.distill.epochs == 240 and cfg.distill.batch_size == 64 and cfg.distill.milestones == [150, 180, 210]
    assert cfg.distill.weight_decay == pytest.approx(5e-4)
    assert cfg.validate.batch_sizes == [1, 64]


def test_typo_suggests_the_right_key(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, "distill:\n  epoch: 5\n"))
    msg = str(e.value)
    assert "distill.epoch" in msg and "did you mean 'epochs'" in msg


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(UserError, match=r"distill\.batch_size.*expected int"):
        load_config(write(tmp_path, "distill:\n  batch_size: big\n"))


def test_yaml_exponent_string_is_coerced_to_float(tmp_path):
    # PyYAML reads 5e-4 (no dot) as a string; the schema says float.
    cfg, _ = load_config(write(tmp_path, "distill:\n  weight_decay: 5e-4\n"))
    assert cfg.distill.weight_decay == pytest.approx(5e-4)


def test_overrides_are_typed_by_schema(tmp_path):
    cfg, _ = load_config(write(tmp_path, ""), ["distill.epochs=3", "data.source=npz:x.npz",
                                                "student.model=resnet20_cifar", "teacher.checkpoint=null", "seed=7",
                                                "validate.batch_sizes=[1, 8]", "distill.lr=1e-3"])
    assert cfg.distill.epochs == 3 and isinstance(cfg.distill.epochs, int)
    assert cfg.data.source == "npz:x.npz"
    assert cfg.student.model == "resnet20_cifar" and cfg.seed == 7
    assert cfg.teacher.checkpoint is None
    assert cfg.validate.batch_sizes == [1, 8]
    assert cfg.distill.lr == pytest.approx(1e-3)


@pytest.mark.parametrize("item,match", [
    ("distill.epoch=3", "did you mean 'distill.epochs'"),
    ("distil.epochs=3", "did you mean 'distill'"),
    ("distill.epochs", "has no '='"),
    ("seed.x=1", "has no key 'x'"),
])
def test_bad_overrides(item, match):
    with pytest.raises(UserError, match=match):
        apply_overrides({}, [item])


def test_unknown_method_suggests(tmp_path):
    with pytest.raises(UserError, match="did you mean 'kd'"):
        load_config(write(tmp_path, "distill:\n  method: kdd\n"))


def test_method_options_are_validated(tmp_path):
    with pytest.raises(UserError, match=r"distill\.options\.temprature.*did you mean 'temperature'"):
        load_config(write(tmp_path, "distill:\n  method: kd\n  options: {temprature: 2}\n"))


def test_hash_changes_with_content_only(tmp_path):
    a, _ = load_config(write(tmp_path, "seed: 1\n"))
    b, _ = load_config(write(tmp_path, "seed: 1\ndistill: {epochs: 240}\n"))
    c, _ = load_config(write(tmp_path, "seed: 2\n"))
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_bundled_configs_load_by_name():
    for name in ("quickstart", "mobilenet.yaml", "shufflenet.yaml"):
        cfg, path = load_config(name)
        assert isinstance(cfg, PipelineConfig) and path.is_file()
    assert load_config("shufflenet")[0].student.model == "shufflenetv2_cifar"


def test_missing_config_lists_bundled():
    with pytest.raises(UserError, match="quickstart.yaml"):
        load_config("nope.yaml")


def test_invalid_yaml(tmp_path):
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "distill: [\n"))


def test_partial_teacher_schedule_keeps_training_off(tmp_path):
    # Setting only the teacher's lr must not silently switch on a 240-epoch training run.
    cfg, _ = load_config(write(tmp_path, "teacher:\n  train: {lr: 0.1}\n"))
    assert cfg.teacher.train.epochs == 0 and cfg.teacher.train.lr == pytest.approx(0.1)


def test_unknown_model_is_caught_when_the_config_loads(tmp_path):
    with pytest.raises(UserError, match=r"(?s)student\.model.*mobilenetv2_x0_5_cifar"):
        load_config(write(tmp_path, "student:\n  model: mobilenetv2_x05_cifar\n"))


def test_readme_documents_every_key_and_method_option():
    from distill2deploy._schema import describe
    from distill2deploy.methods import get_method, list_methods

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [k for k, *_ in describe(PipelineConfig) if f"`{k}`" not in readme]
    for m in list_methods():
        section = readme.split(f"#### `{m}`", 1)
        assert len(section) == 2, f"README has no options section for method {m}"
        body = section[1].split("####", 1)[0]
        missing += [f"{m}.{k}" for k, *_ in describe(get_method(m).Options) if f"`{k}`" not in body]
    assert not missing, f"README's config reference lacks: {missing}"
