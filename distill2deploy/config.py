"""The pipeline's config schema: one YAML file, validated, with documented defaults.

Every key a user may write is a field below; :func:`load_config` rejects anything else with a
suggestion, applies ``-o key.path=value`` overrides typed by this schema, and returns the
resolved config whose hash keys the run's caches.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from . import _schema
from ._schema import doc
from ._threads import DEFAULT_THREADS
from .errors import UserError
from .models._cifar_common import CIFAR100_MEAN, CIFAR100_STD

#: Input sides accepted from configs and ONNX metadata: beyond this a batch of images no longer fits in memory
#: (100000 px asked for 44 TiB).
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 8, 1024
MIN_OPSET = 17


def max_opset() -> int:
    """The newest ONNX opset the installed exporter writes (torch.onnx's own limit)."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
    except ImportError:  # pragma: no cover - private module moved: fall back to onnx's own newest
        import onnx

        return int(onnx.defs.onnx_opset_version())
    return int(ONNX_MAX_OPSET)


@dataclass
class SubsetConfig:
    train: int | None = doc(None, "keep this many training images (stratified by class); null keeps all (a "
                            "larger number than the data holds keeps all, with a warning)", ge=1)
    test: int | None = doc(None, "keep this many test images (stratified by class); null keeps all", ge=1)


@dataclass
class AugmentConfig:
    crop_padding: int = doc(4, "random crop to input_size after zero-padding this many pixels (0 disables)", ge=0)
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
    input_size: int = doc(32, "side of the square input the student sees (images are resized if they differ)",
                          ge=MIN_INPUT_SIZE, le=MAX_INPUT_SIZE)
    num_classes: int | None = doc(None, "number of classes, for an npz without fine_label_names (labels must "
                                  "lie in 0..num_classes-1); null: the names' count, or inferred from the labels "
                                  "(refused when some class index has no image)", ge=1)
    mean: list[float] = doc(list(CIFAR100_MEAN), "per-channel mean after scaling to [0, 1]; recorded in the ONNX metadata")
    std: list[float] = doc(list(CIFAR100_STD), "per-channel std after scaling to [0, 1]; recorded in the ONNX metadata")
    augment: AugmentConfig = doc(AugmentConfig(), "training augmentation (standard CIFAR protocol)")
    num_workers: int = doc(2, "DataLoader worker processes", ge=0)


@dataclass
class ScheduleConfig:
    """SGD with step decay: the standard CIFAR-100 protocol of the CRD/DKD papers."""

    epochs: int = doc(240, "training epochs", ge=1)
    batch_size: int = doc(64, "global batch size (split across processes)", ge=1)
    lr: float = doc(0.05, "initial SGD learning rate", gt=0)
    momentum: float = doc(0.9, "SGD momentum", ge=0)
    weight_decay: float = doc(5e-4, "SGD weight decay", ge=0)
    nesterov: bool = doc(False, "Nesterov momentum")
    milestones: list[int] = doc([150, 180, 210], "epochs at which the lr is multiplied by gamma", ge=1)
    gamma: float = doc(0.1, "lr decay factor at each milestone", gt=0)


@dataclass
class TeacherTrainConfig(ScheduleConfig):
    epochs: int = doc(0, "fine-tune (or train from scratch) the teacher for this many epochs; 0 skips", ge=0)


@dataclass
class TeacherConfig:
    model: str = doc("resnet56_cifar", "any timm model name (the *_cifar models are registered by distill2deploy)")
    pretrained: bool = doc(True, "load timm's pretrained weights for this model (ignored when checkpoint is set)")
    checkpoint: str | None = doc(None, "local weights (.pth/.pt/.safetensors state_dict) loaded with strict checking")
    input_size: int | None = doc(None, "teacher input side; inputs are resized inside its forward when it differs "
                                 "from data.input_size", ge=MIN_INPUT_SIZE, le=MAX_INPUT_SIZE)
    model_kwargs: dict[str, Any] = doc({}, "extra keyword arguments for timm.create_model")
    reset_head: bool = doc(False, "re-initialise the classifier of the pretrained weights (or checkpoint) for the "
                           "data's class count, keeping the rest; the teacher stage then fine-tunes it "
                           "(needs teacher.train.epochs >= 1)")
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
    gradient_accumulation_steps: int = doc(1, "Accelerate gradient accumulation", ge=1)
    checkpoint_every_steps: int = doc(0, "also checkpoint every N optimizer steps inside an epoch (0: end of epoch "
                                      "only)", ge=0)
    channels_last: bool = doc(False, "train (and run the frozen teachers) in channels_last memory format: faster "
                              "convolutions on GPUs with tensor cores")
    compile: bool = doc(False, "torch.compile the networks of the training step (the first steps are slow while "
                        "compiling; needs a C++ compiler on CPU)")
    deterministic: bool = doc(False, "torch.use_deterministic_algorithms (warn-only where an op has no deterministic "
                              "kernel); on CPU a resumed run already ends with bitwise the weights of an "
                              "uninterrupted one, this extends it to GPUs as far as the kernels allow")
    lr: float = doc(0.01, "initial SGD learning rate (0.01 for MobileNetV2/ShuffleNet students in the standard "
                    "protocol)", gt=0)


@dataclass
class ExportConfig:
    opset: int = doc(18, "ONNX opset (17 up to the newest the installed torch.onnx exporter writes)",
                     ge=MIN_OPSET, le=max_opset)
    parity_samples: int = doc(256, "test images used to record PyTorch-vs-onnxruntime parity", ge=1)


@dataclass
class QATConfig(ScheduleConfig):
    """Quantization-aware distillation: the fallback when no searched INT8 variant is accurate enough."""

    epochs: int = doc(0, "fine-tune the distilled student with fake quantization (torchao PT2E, the distill "
                      "method's loss on) for this many epochs when no searched candidate is within "
                      "quantize.max_drop; 0 never does (needs quantize.search and torchao)", ge=0)
    lr: float = doc(0.001, "initial SGD learning rate (a fine-tune: about a tenth of distill.lr)", gt=0)
    milestones: list[int] = doc([], "epochs at which the lr is multiplied by gamma", ge=1)
    always: bool = doc(False, "fine-tune even when a searched candidate fits, adding it to the search's table "
                       "(the fastest model within budget is still the one kept)")
    per_channel: bool = doc(True, "per-channel weight scales while fine-tuning and in the INT8 file; false: one scale "
                            "per weight tensor (faster kernels that post-training quantization may break)")


@dataclass
class QuantizeConfig:
    enabled: bool = doc(True, "produce the INT8 student")
    calib_samples: int = doc(512, "training images used for calibration (rounded down to whole batches)", ge=1)
    calib_batch_size: int = doc(32, "calibration batch size (every batch has this size)", ge=1)
    activation_type: Literal["uint8", "int8"] = doc("uint8", "activation type; uint8 (U8S8) is fastest on x86 VNNI")
    weight_type: Literal["int8", "uint8"] = doc("int8", "weight type")
    per_channel: bool = doc(True, "per-channel weight scales")
    calibrate_method: Literal["minmax", "entropy", "percentile"] = doc("minmax", "onnxruntime calibration method "
                                                                     "(entropy: KL threshold over 512 histogram bins)")
    search: bool = doc(False, "search the INT8 variants below on held-out training images and keep the fastest "
                       "within max_drop of fp32 (the settings above are then ignored; CLI: quantize --search)")
    max_drop: float = doc(1.0, "search budget: top-1 points the INT8 model may lose against fp32 on the held-out "
                          "training images and their views (95% upper bound; CLI: --max-drop)", ge=0)
    search_samples: int = doc(1000, "held-out training images (never the test split, never the calibration "
                              "images) that score the candidates; at most half the training images", ge=1)
    search_methods: list[Literal["minmax", "entropy", "percentile"]] = doc(
        ["minmax", "percentile", "entropy"], "calibration methods searched (each with per-channel and "
        "per-tensor weights)")
    search_calib_samples: list[int] = doc([128, 512], "calibration set sizes searched", ge=1)
    search_activation_types: list[Literal["uint8", "int8"]] = doc(
        ["uint8"], "activation types searched; int8 (S8S8) is left out by default: it ran 1.3-2.3x slower than "
        "fp32 on x86 (onnxruntime's fast int8 kernels are U8S8)")
    search_float_activations: list[int] = doc(
        [4], "for each k, a candidate keeping the k activations of the best-scoring per-channel candidate with "
        "the lowest SQNR (onnxruntime qdq_loss_debug) in float", ge=1)
    search_views: int = doc(4, "seeded TrivialAugmentWide views of each held-out image scored with it, so a "
                            "model that memorised its training images still shows what INT8 costs on new ones; "
                            "a candidate fits when the 95% upper bound of its drop is within max_drop (at most 32: the "
                            "views are held in memory, preprocessed)", ge=0, le=32)
    search_runs: int = doc(60, "timed runs per candidate and batch size (validate.batch_sizes, interleaved in 6 "
                           "rounds, threads: validate.threads or threads)", ge=1)
    qat: QATConfig = doc(QATConfig(), "quantization-aware distillation (fallback of the search)")


@dataclass
class ValidateConfig:
    batch_sizes: list[int] = doc([1, 64], "batch sizes at which latency is measured", ge=1)
    warmup: int = doc(20, "untimed runs before timing", ge=0)
    runs: int = doc(200, "timed runs per batch size (at least 200 for the report's percentiles)", ge=1)
    threads: int | None = doc(None, "inference threads for validation in every runtime (onnxruntime intra-op threads, OpenVINO "
                               "INFERENCE_NUM_THREADS; null: the top-level threads)", ge=1)
    runtimes: list[Literal["onnxruntime", "openvino"]] = doc(
        ["onnxruntime"], "runtimes that run the exported files; the first is the one the report's figures and "
        "baseline.json use, the others are compared with it side by side (accuracy must agree; latency ratios; "
        "which to deploy). openvino needs pip install \"distill2deploy[openvino]\"")
    baseline_rounds: int = doc(15, "timing rounds per model and batch size of <run>/baseline.json, the baseline "
                               "`distill2deploy check` compares with (1 thread; 0: write none)", ge=0)


@dataclass
class PipelineConfig:
    name: str | None = doc(None, "run name (default: the config file's stem); the run lands in exports/<name>/")
    seed: int = doc(0, "seed for data order, augmentation and initialisation", ge=0)
    threads: int = doc(DEFAULT_THREADS, "CPU threads per process for PyTorch (training, export) and onnxruntime (quantize "
                       "checks, validate unless validate.threads is set); 1 keeps shared cores from "
                       "collapsing, raise it on a CPU you own (CLI: --threads)", ge=1, le=1024)
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
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}): is it a binary file?",
                        where=str(path), fix="give a YAML config file saved as UTF-8 text") from None
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
    from .config_checks import check_config  # the cross-field checks import the model and method registries

    check_config(cfg)
    return cfg, path


def config_dict(cfg: PipelineConfig) -> dict[str, Any]:
    return _schema.to_dict(cfg)
