"""The pipeline's config schema: one YAML file, validated, with documented defaults.

Every key a user may write is a field below; :func:`load_config` rejects anything else with a
suggestion, applies ``-o key.path=value`` overrides typed by this schema, and returns the
resolved config whose hash keys the run's caches.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from . import _schema
from ._io import obj_sha256
from ._schema import doc
from .errors import UserError
from .models._cifar_common import CIFAR100_MEAN, CIFAR100_STD



@dataclass
class SubsetConfig:
    train: int | None = doc(None, "keep this many training images (stratified by class); null keeps all")
    test: int | None = doc(None, "keep this many test images (stratified by class); null keeps all")


@dataclass
class AugmentConfig:
    crop_padding: int = doc(4, "random crop to input_size after zero-padding this many pixels (0 disables)")
    hflip: bool = doc(True, "random horizontal flip")
    on_device: bool = doc(False, "crop, flip and normalise whole batches on the training device (the loader only "
                          "gathers uint8 images, no per-sample Python): use it on GPUs, where per-sample CPU "
                          "transforms can leave the GPU waiting")


@dataclass
class DataConfig:
    source: str = doc("cifar100", "'cifar100', 'npz:PATH' or 'folder:PATH' (ImageFolder with train/ and test/ or val/)")
    root: str | None = doc(None, "where 'cifar100' is stored/downloaded and decoded 'folder:' sources are cached; default $D2D_DATA or ~/.cache/distill2deploy/data")
    download: bool = doc(True, "allow downloading 'cifar100' when it is not under root")
    subset: SubsetConfig = doc(SubsetConfig(), "stratified subsets for quick runs")
    input_size: int = doc(32, "side of the square input the student sees (images are resized if they differ)")
    mean: list[float] = doc(list(CIFAR100_MEAN), "per-channel mean after scaling to [0, 1]; recorded in the ONNX metadata")
    std: list[float] = doc(list(CIFAR100_STD), "per-channel std after scaling to [0, 1]; recorded in the ONNX metadata")
    augment: AugmentConfig = doc(AugmentConfig(), "training augmentation (standard CIFAR protocol)")
    num_workers: int = doc(2, "DataLoader worker processes")


@dataclass
class ScheduleConfig:
    """SGD with step decay: the standard CIFAR-100 protocol of the CRD/DKD papers."""

    epochs: int = doc(240, "training epochs")
    batch_size: int = doc(64, "global batch size (split across processes)")
    lr: float = doc(0.05, "initial SGD learning rate")
    momentum: float = doc(0.9, "SGD momentum")
    weight_decay: float = doc(5e-4, "SGD weight decay")
    nesterov: bool = doc(False, "Nesterov momentum")
    milestones: list[int] = doc([150, 180, 210], "epochs at which the lr is multiplied by gamma")
    gamma: float = doc(0.1, "lr decay factor at each milestone")


@dataclass
class TeacherTrainConfig(ScheduleConfig):
    epochs: int = doc(0, "fine-tune (or train from scratch) the teacher for this many epochs; 0 skips")


@dataclass
class TeacherConfig:
    model: str = doc("resnet56_cifar", "any timm model name (the *_cifar models are registered by distill2deploy)")
    pretrained: bool = doc(True, "load timm's pretrained weights for this model (ignored when checkpoint is set)")
    checkpoint: str | None = doc(None, "local weights (.pth/.pt/.safetensors state_dict) loaded with strict checking")
    input_size: int | None = doc(None, "teacher input side; inputs are resized inside its forward when it differs from data.input_size")
    model_kwargs: dict[str, Any] = doc({}, "extra keyword arguments for timm.create_model")
    train: TeacherTrainConfig = doc(TeacherTrainConfig(), "teacher training schedule (standard protocol; epochs 0 skips)")


@dataclass
class StudentConfig:
    model: str = doc("mobilenetv2_x0_5_cifar", "any timm model name")
    checkpoint: str | None = doc(None, "optional initial weights (strict)")
    model_kwargs: dict[str, Any] = doc({}, "extra keyword arguments for timm.create_model")


@dataclass
class DistillConfig(ScheduleConfig):
    method: str = doc("kd", "distillation method from the method registry (see README)")
    options: dict[str, Any] = doc({}, "the method's own options, validated by the method (see README)")
    mixed_precision: Literal["no", "fp16", "bf16"] = doc("no", "Accelerate mixed precision")
    gradient_accumulation_steps: int = doc(1, "Accelerate gradient accumulation")
    checkpoint_every_steps: int = doc(0, "also checkpoint every N optimizer steps inside an epoch (0: end of epoch only)")
    channels_last: bool = doc(False, "train (and run the frozen teachers) in channels_last memory format: faster "
                              "convolutions on GPUs with tensor cores")
    compile: bool = doc(False, "torch.compile the networks of the training step (the first steps are slow while "
                        "compiling; needs a C++ compiler on CPU)")
    deterministic: bool = doc(False, "torch.use_deterministic_algorithms (warn-only where an op has no deterministic "
                              "kernel); on CPU a resumed run already ends with bitwise the weights of an "
                              "uninterrupted one, this extends it to GPUs as far as the kernels allow")
    lr: float = doc(0.01, "initial SGD learning rate (0.01 for MobileNetV2/ShuffleNet students in the standard protocol)")


@dataclass
class ExportConfig:
    opset: int = doc(18, "ONNX opset (17 or newer)")
    parity_samples: int = doc(256, "test images used to record PyTorch-vs-onnxruntime parity")


@dataclass
class QuantizeConfig:
    enabled: bool = doc(True, "produce the INT8 student")
    calib_samples: int = doc(512, "training images used for calibration (rounded down to whole batches)")
    calib_batch_size: int = doc(32, "calibration batch size (every batch has this size)")
    activation_type: Literal["uint8", "int8"] = doc("uint8", "activation type; uint8 (U8S8) is fastest on x86 VNNI")
    weight_type: Literal["int8", "uint8"] = doc("int8", "weight type")
    per_channel: bool = doc(True, "per-channel weight scales")
    calibrate_method: Literal["minmax", "entropy", "percentile"] = doc("minmax", "onnxruntime calibration method")


@dataclass
class ValidateConfig:
    batch_sizes: list[int] = doc([1, 64], "batch sizes at which latency is measured")
    warmup: int = doc(20, "untimed runs before timing")
    runs: int = doc(200, "timed runs per batch size (at least 200 for the report's percentiles)")
    threads: int | None = doc(None, "onnxruntime intra-op threads (null: onnxruntime's default)")
    baseline_rounds: int = doc(15, "timing rounds per model and batch size of <run>/baseline.json, the baseline "
                               "`distill2deploy check` compares with (1 thread; 0: write none)")


@dataclass
class PipelineConfig:
    name: str | None = doc(None, "run name (default: the config file's stem); the run lands in exports/<name>/")
    seed: int = doc(0, "seed for data order, augmentation and initialisation")
    data: DataConfig = doc(DataConfig(), "")
    teacher: TeacherConfig = doc(TeacherConfig(), "")
    student: StudentConfig = doc(StudentConfig(), "")
    distill: DistillConfig = doc(DistillConfig(), "")
    export: ExportConfig = doc(ExportConfig(), "")
    quantize: QuantizeConfig = doc(QuantizeConfig(), "")
    validate: ValidateConfig = doc(ValidateConfig(), "")


def bundled_pipelines() -> Path:
    """The directory of the configs that ship with the package.

    Installed, they are the ``distill2deploy.pipelines`` package; run from a source checkout
    (where ``distill2deploy/`` shadows the installed package) they are the repo's ``pipelines/``.
    """
    try:
        return Path(str(resources.files("distill2deploy.pipelines")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "pipelines"


def resolve_config_path(name: str) -> Path:
    """``./NAME`` if it exists, else the bundled ``pipelines/NAME`` (``.yaml`` may be omitted); a run
    directory stands for the ``config.yaml`` the pipeline saved in it."""
    if Path(name).is_dir():
        saved = Path(name) / "config.yaml"
        if not saved.is_file():
            raise UserError("a directory without config.yaml is not a run directory", where=name,
                            fix="pass the YAML config, or a directory a pipeline run wrote (exports/<name>/)")
        return saved
    candidates = [Path(name)]
    if not name.endswith((".yaml", ".yml")):
        candidates.append(Path(name + ".yaml"))
    for c in list(candidates):
        candidates.append(bundled_pipelines() / c)
    for c in candidates:
        if c.is_file():
            return c
    bundled = sorted(str(p.relative_to(bundled_pipelines())) for p in bundled_pipelines().rglob("*.yaml"))
    raise UserError(f"config '{name}' not found (looked in the current directory and the bundled pipelines/)",
                    fix=f"give a path to a YAML file, or one of the bundled configs: {', '.join(bundled)}")


def _set_path(d: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        sub = d.get(key)
        if not isinstance(sub, dict):
            sub = d[key] = {}
        d = sub
    d[path[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` strings; the value is typed by the schema at that path."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' has no '='", where="-o",
                            fix="write overrides as -o key.path=value, e.g. -o distill.epochs=5")
        key, text = item.split("=", 1)
        path = key.strip().split(".")
        tp = _schema.field_type(PipelineConfig, path, where=f"-o {key}")
        _set_path(raw, path, _schema.parse_scalar(text, tp))
    return raw


def load_config(name: str, overrides: list[str] | None = None) -> tuple[PipelineConfig, Path]:
    """Read, override and validate a pipeline config; returns it and the file it came from."""
    path = resolve_config_path(name)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"not valid YAML: {e}", where=str(path), fix="fix the YAML syntax at the line shown") from None
    if not isinstance(raw, dict):
        raise UserError("the top level must be a mapping of keys", where=str(path))
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = _schema.parse(PipelineConfig, raw)
    except UserError as e:
        e.where = f"{path}: {e.where}" if e.where else str(path)
        raise UserError(e.what, where=e.where, fix=e.fix) from None
    if cfg.name is None:
        cfg.name = path.stem
    check_config(cfg)
    return cfg, path


def check_config(cfg: PipelineConfig) -> None:
    """Cross-field checks the types alone cannot express."""
    from .methods import get_method  # the method validates its own options
    from .models.factory import check_model_name

    check_model_name(cfg.teacher.model, "teacher.model")
    check_model_name(cfg.student.model, "student.model")

    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3 or any(s <= 0 for s in cfg.data.std):
        raise UserError("mean and std need 3 values each (std > 0)", where="data.mean/data.std")
    if cfg.export.opset < 17:
        raise UserError(f"opset {cfg.export.opset} is too old", where="export.opset", fix="use 17 or newer")
    if cfg.validate.runs < 1 or not cfg.validate.batch_sizes or any(b < 1 for b in cfg.validate.batch_sizes):
        raise UserError("runs and batch sizes must be positive", where="validate")
    if cfg.validate.baseline_rounds != 0 and cfg.validate.baseline_rounds < 5:
        raise UserError(f"baseline_rounds is {cfg.validate.baseline_rounds}: a significance test needs 5 or more",
                        where="validate.baseline_rounds", fix="use 15 (the default), or 0 to write no baseline")
    if cfg.quantize.calib_batch_size < 1 or cfg.quantize.calib_samples < cfg.quantize.calib_batch_size:
        raise UserError(f"calib_samples ({cfg.quantize.calib_samples}) must be at least one batch "
                        f"({cfg.quantize.calib_batch_size})", where="quantize.calib_samples")
    for section in (cfg.distill, cfg.teacher.train):
        if section.batch_size < 1 or section.epochs < 0:
            raise UserError("batch_size must be >= 1 and epochs >= 0", where="distill/teacher.train")
    get_method(cfg.distill.method).parse_options(cfg.distill.options)


def config_dict(cfg: PipelineConfig) -> dict[str, Any]:
    return _schema.to_dict(cfg)


def config_hash(cfg: PipelineConfig) -> str:
    """The run's one hash: of everything that determines the models (not the run name, worker counts or
    validation settings). The ONNX metadata, ``config.sha256`` and the report all carry it."""
    d = config_dict(cfg)
    for k in ("name", "validate"):
        d.pop(k, None)
    d["data"].pop("num_workers", None)
    return obj_sha256(d)


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)
