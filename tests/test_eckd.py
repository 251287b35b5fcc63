"""ECKD-R, ECKD-F and KD+EC: masks steer gradients, frozen stays frozen, switches switch, students stay plain."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import timm
import torch

import distill2deploy  # noqa: F401  (registers the *_cifar models)
from distill2deploy.cli import main
from distill2deploy.deploy.export import export_onnx
from distill2deploy.deploy.metadata import build_metadata
from distill2deploy.errors import UserError
from distill2deploy.methods import TeacherOutput, get_method
from distill2deploy.methods.eckd import augmented_view
from distill2deploy.models.features import extract

from .conftest import SAMPLE_NPZ, WEIGHTS

TEACHER_WEIGHTS = WEIGHTS / "cifar100_resnet56.pth"
B, C = 8, 100
MASK_KEYS = ("trsr", "trsw", "twsr", "twsw")


def _nets(teacher: str = "resnet20_cifar", student: str = "mobilenetv2_x0_5_cifar", seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model(teacher, num_classes=C), timm.create_model(student, num_classes=C)


def _build(name: str, options: dict, teacher=None, student=None):
    if teacher is None:
        teacher, student = _nets()
    cls = get_method(name)
    return cls(student, [teacher], cls.parse_options(options), num_classes=C, input_size=32), teacher


def _frozen_outputs(method, x: torch.Tensor) -> list[TeacherOutput]:
    """What the trainer does before each step: frozen teachers in eval mode, without autograd."""
    outs = []
    for t in method.frozen_teachers():
        t.eval()
        with torch.no_grad():
            logits, feats = extract(t, x, method.teacher_feature_indices())
        outs.append(TeacherOutput(logits=logits, features=feats))
    return outs


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, C, (B,), generator=g)


# --- frozen teacher ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,options", [
    ("eckd_r", {"bidirectional": False, "augment": "rotate"}),
    ("eckd_f", {"bidirectional": False}),
    ("kd_ec", {}),
])
def test_frozen_teacher_gets_no_gradient(name, options):
    method, teacher = _build(name, options)
    assert method.frozen_teachers() == [teacher]
    assert method.extra_eval_models() == {}
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in method.parameters()}  # not a submodule: outside DDP/optimizers
    specs = method.optimizers(0.1)
    assert list(specs) == ["student"]
    assert not teacher_ids & {id(p) for p in specs["student"].params}
    method.train()
    x, y = method.views(*_batch())  # as the trainer does: eckd_r's frozen teacher sees the rotated view too
    assert x.shape[0] == (2 * B if name == "eckd_r" else B)
    out = method(x, y, _frozen_outputs(method, x), 0.0)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in method.student.parameters())
    if name != "kd_ec":  # the teacher's aux heads are probes: trained, on the detached features
        heads = list(method.teacher_heads.parameters())
        assert heads and all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)
        assert {id(p) for p in heads} <= {id(p) for p in specs["student"].params}
    assert set(MASK_KEYS) <= set(out.logs) and out.logits.shape == (B, C)


# --- bidirectional: each EC direction only moves the rows of its mask ----------------------------
def _two_mobilenets():
    """Two differently initialised MobileNetV2s: random ResNets predict one class for every input,
    which would leave no sample where exactly one side is right."""
    t = _nets("mobilenetv2_x0_5_cifar", "mobilenetv2_x0_5_cifar", seed=3)[0]
    s = _nets("mobilenetv2_x0_5_cifar", "mobilenetv2_x0_5_cifar", seed=4)[1]
    return t, s


def _rows(grad: torch.Tensor) -> torch.Tensor:
    return grad.abs().sum(dim=1) > 0


def test_bidirectional_ec_gradients_follow_the_masks():
    t, s = _two_mobilenets()
    method, teacher = _build("eckd_r", {"levels": [[5, 5], [7, 7]]}, t, s)
    assert method.frozen_teachers() == [] and method.extra_eval_models() == {"teacher": teacher}
    assert {id(p) for p in teacher.parameters()} <= {id(p) for p in method.parameters()}
    method.train()
    x, _ = _batch()
    with torch.no_grad():  # train-mode BN is deterministic for a fixed batch: same predictions below
        probe = method.step(x, torch.zeros(B, dtype=torch.long), [])
    tp, sp = probe.teacher_logits[-1].argmax(1), probe.student_logits[-1].argmax(1)
    # Hand-picked labels: alternately teacher-right/student-wrong and the reverse where they disagree.
    y = torch.where(torch.arange(B) % 2 == 0, tp, sp)
    y = torch.where(tp == sp, (tp + 1) % C, y)
    lv = method.step(x, y, [])
    final = lv.masks[-1]
    assert int(final.trsw.sum()) >= 2 and int(final.twsr.sum()) >= 2, "seeds no longer give both kinds of rows"
    terms = method.loss_terms(lv)

    g_s = torch.autograd.grad(terms["ec"], lv.student_logits, retain_graph=True)
    g_t_from_ec = torch.autograd.grad(terms["ec"], lv.teacher_logits, retain_graph=True, allow_unused=True)
    g_t = torch.autograd.grad(terms["ec_teacher"], lv.teacher_logits, retain_graph=True)
    g_s_from_ect = torch.autograd.grad(terms["ec_teacher"], lv.student_logits, retain_graph=True,
                                       allow_unused=True)
    for level, masks in enumerate(lv.masks):
        assert torch.equal(_rows(g_s[level]), masks.trsw), level   # student: exactly its TRSW rows
        assert torch.equal(_rows(g_t[level]), masks.twsr), level   # teacher: exactly its TWSR rows
        for g in (g_t_from_ec[level], g_s_from_ect[level]):      # sources are detached
            assert g is None or not g.any()

    # Optimizers: the teacher network at teacher_lr; the student side and the teacher's new heads at the base lr.
    method.options.teacher_lr = 0.002
    specs = method.optimizers(0.1)
    assert specs["teacher"].lr == 0.002 and specs["student"].lr == 0.1 and specs["teacher_heads"].lr == 0.1
    assert {id(p) for p in teacher.parameters()} == {id(p) for p in specs["teacher"].params}
    assert {id(p) for p in method.teacher_heads.parameters()} == {id(p) for p in specs["teacher_heads"].params}


def test_bidirectional_trains_a_teacher_handed_over_frozen():
    teacher, student = _nets()
    teacher.eval().requires_grad_(False)  # e.g. straight from an evaluation script
    method, _ = _build("eckd_r", {}, teacher, student)
    assert all(p.requires_grad for p in method.optimizers(0.1)["teacher"].params)
    method.train()
    x, y = _batch()
    method(x, y, [], 0.0).loss.backward()
    assert all(p.grad is not None for p in teacher.parameters())


def test_no_teacher_right_sample_means_zero_student_ec():
    t, s = _two_mobilenets()
    method, _ = _build("eckd_r", {"levels": [[5, 5], [7, 7]]}, t, s)
    method.train()
    x, _ = _batch()
    with torch.no_grad():
        probe = method.step(x, torch.zeros(B, dtype=torch.long), [])
    wrong = [torch.stack([z.argmax(1) for z in probe.teacher_logits], 1)[i].tolist() for i in range(B)]
    y = torch.tensor([next(c for c in range(C) if c not in row) for row in wrong])  # teacher wrong everywhere
    lv = method.step(x, y, [])
    assert not any(m.trsw.any() for m in lv.masks)
    terms = method.loss_terms(lv)
    assert terms["ec"].item() == 0.0
    grads = torch.autograd.grad(terms["ec"], list(method.student.parameters()), allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


# --- switches ---------------------------------------------------------------------------------
def test_switches_change_behaviour():
    x, y = _batch()
    plain, _ = _build("eckd_r", {"use_levels": False, "use_ec": False, "kd_weight": 0.0})
    assert len(plain.student_heads) == 0 and len(plain.teacher_heads) == 0
    out = plain(x, y, [], 0.0)
    assert set(out.logs) == {"ce", "teacher_ce", *MASK_KEYS}  # no aux, kd, ec or per-level keys

    one_way, _ = _build("eckd_r", {"use_levels": False, "bidirectional": False})
    assert one_way.teacher_feature_indices() is None
    out = one_way(x, y, _frozen_outputs(one_way, x), 0.0)
    assert {"ce", "kd", "ec"} <= set(out.logs) and "ec_teacher" not in out.logs and "l1_trsw" not in out.logs

    full, _ = _build("eckd_r", {"bidirectional": False, "augment": "rotate"})
    assert full.teacher_feature_indices() == [1, 2, 3]  # ResNet-20 stages paired with MobileNetV2 3, 5, 7
    xv, yv = full.views(x, y)
    lv = full.step(xv, yv, _frozen_outputs(full, xv))
    assert lv.batch == B and lv.student_logits[-1].shape[0] == 2 * B and torch.equal(lv.labels, y.repeat(2))
    assert len(lv.masks) == 4
    with pytest.raises(ValueError, match="views"):  # a frozen teacher that missed the view is a caller bug
        full.step(xv, yv, _frozen_outputs(full, x))
    out = full(xv, yv, _frozen_outputs(full, xv), 0.0)
    assert {"aux_ce", "teacher_aux_ce", "ec", "l1_trsw", "l3_twsr"} <= set(out.logs)

    f_all, _ = _build("eckd_f", {"use_ec": False})
    out = f_all(x, y, [], 0.0)
    assert out.logs["feat"] > 0 and out.logs["feat_teacher"] > 0  # every sample, not only masked ones


@pytest.mark.parametrize("name", ["eckd_r", "eckd_f"])
def test_teacher_probe_epochs_keep_aux_gradients_out_of_the_teacher_backbone(name):
    """While probing, the freshly initialised heads (and ECKD-F adapters) learn from the teacher's
    features, but none of their gradient reaches the pretrained backbone; afterwards it does."""
    x, y = _batch()
    for progress, reaches_backbone in ((0.5, False), (1.0, True)):
        method, teacher = _build(name, {"teacher_probe_epochs": 1.0, "kd_weight": 0.0})
        method.train()
        lv = method.step(x, y, [], progress)
        terms = method.loss_terms(lv)
        side = terms["teacher_aux_ce"] + (terms.get("feat_teacher", 0) if name == "eckd_f" else 0)
        side.backward()
        backbone = [p.grad for n, p in teacher.named_parameters() if not n.startswith(("fc.", "head"))]
        assert any(g is not None and g.any() for g in backbone) == reaches_backbone, progress
        assert all(p.grad is not None for p in method.teacher_heads.parameters())


def test_level_reduction_and_teacher_lr_scale():
    x, y = _batch()
    terms = {}
    for reduction in ("sum", "mean"):
        torch.manual_seed(0)
        method, _ = _build("eckd_r", {"level_reduction": reduction}, *_nets())
        method.eval()
        with torch.no_grad():
            terms[reduction] = method.loss_terms(method.step(x, y, []))
    levels = len(method.level_pairs)  # 3 auxiliary levels, plus the final logits for EC
    assert torch.allclose(terms["mean"]["aux_ce"], terms["sum"]["aux_ce"] / levels)
    assert torch.allclose(terms["mean"]["teacher_aux_ce"], terms["sum"]["teacher_aux_ce"] / levels)
    assert torch.allclose(terms["mean"]["ec"], terms["sum"]["ec"] / (levels + 1))
    assert torch.allclose(terms["mean"]["ce"], terms["sum"]["ce"])
    scaled, _ = _build("eckd_r", {})  # default: the trained teacher at a tenth of the lr, its heads at the lr
    assert scaled.optimizers(0.05)["teacher"].lr == pytest.approx(0.005)
    assert scaled.optimizers(0.05)["student"].lr == scaled.optimizers(0.05)["teacher_heads"].lr == 0.05
    thesis, _ = _build("eckd_r", {"teacher_lr_scale": 1.0})
    assert thesis.optimizers(0.05)["teacher"].lr == 0.05
    explicit, _ = _build("eckd_r", {"teacher_lr_scale": 0.1, "teacher_lr": 0.002})
    assert explicit.optimizers(0.05)["teacher"].lr == 0.002
    with pytest.raises(UserError, match="teacher_lr_scale"):
        get_method("eckd_r").parse_options({"teacher_lr_scale": 0})


def test_rotated_view_is_a_quarter_turn_of_each_image():
    x, _ = _batch()
    view = augmented_view(x, "rotate")
    for i in range(B):
        matches = [r for r in (1, 2, 3) if torch.equal(view[i], torch.rot90(x[i], r, dims=(1, 2)))]
        assert len(matches) == 1
    assert torch.equal(augmented_view(x, "flip"), x.flip(3)) and augmented_view(x, "none") is None


def test_bad_options_are_user_errors():
    cls = get_method("eckd_r")
    with pytest.raises(UserError, match="ec_weight"):
        cls.parse_options({"ec_weight": -1})
    with pytest.raises(UserError, match="did you mean"):
        cls.parse_options({"bidirectonal": False})
    with pytest.raises(UserError, match="rotate"):
        cls.parse_options({"augment": "rotation"})
    with pytest.raises(UserError, match="level"):
        _build("eckd_r", {"levels": [[9, 1]]})
    with pytest.raises(UserError, match="at least one"):
        _build("eckd_f", {"levels": []})


# --- only the plain student is deployed ---------------------------------------------------------
def _initializer_count(path: Path) -> int:
    return len(onnx.load(str(path)).graph.initializer)


@pytest.mark.slow
def test_student_stays_plain_and_exports_like_a_fresh_one(tmp_path):
    fresh_keys = set(_nets()[1].state_dict())
    built = [_build(n, o)[0] for n, o in (("eckd_r", {}), ("eckd_r", {"bidirectional": False}),
                                          ("eckd_f", {}), ("kd_ec", {}))]
    for method in built:
        assert set(method.student.state_dict()) == fresh_keys
    meta = build_metadata(model_name="mobilenetv2_x0_5_cifar", class_names=[f"c{i}" for i in range(C)],
                          mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=32, config_hash="test")
    # TorchScript exporter: 3x faster here than dynamo, and the property holds for either.
    export_onnx(built[2].student, tmp_path / "distilled.onnx", input_size=32, metadata=meta, exporter="torchscript")
    export_onnx(_nets()[1], tmp_path / "fresh.onnx", input_size=32, metadata=meta, exporter="torchscript")
    assert _initializer_count(tmp_path / "distilled.onnx") == _initializer_count(tmp_path / "fresh.onnx")


# --- through the real pipeline ------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    for f in (SAMPLE_NPZ, TEACHER_WEIGHTS):
        if not f.is_file():
            pytest.skip(f"the shared sample data/weights are not at {f}")
    return tmp_path_factory.mktemp("eckd") / "run"  # one run dir: the teacher stage is cached across methods


@pytest.mark.slow
@pytest.mark.parametrize("method,options,extra_keys", [
    ("eckd_r", "{bidirectional: true}", ("ec", "ec_teacher", "teacher_ce", "l1_trsw", "l3_twsr")),
    ("eckd_r", "{bidirectional: false, augment: flip}", ("ec", "aux_ce", "teacher_aux_ce", "l2_trsr")),
    ("eckd_f", "{}", ("feat", "feat_teacher", "l1_twsw")),
    ("kd_ec", "{}", ("kd", "ec")),
])
def test_runs_through_the_pipeline(run_dir, method, options, extra_keys):
    args = ["distill", "quickstart", "--out", str(run_dir), "-o", f"data.source=npz:{SAMPLE_NPZ}",
            "-o", f"teacher.checkpoint={TEACHER_WEIGHTS}", "-o", "data.subset.train=64",
            "-o", "data.subset.test=32", "-o", "distill.epochs=1", "-o", "distill.batch_size=32",
            "-o", f"distill.method={method}", "-o", f"distill.options={options}"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    keys = {f"train_{k}" for k in ("ce", *MASK_KEYS, *extra_keys)}
    assert keys <= set(rows[0]), keys - set(rows[0])
    assert abs(sum(rows[0][f"train_{k}"] for k in MASK_KEYS) - 1.0) < 1e-5  # the masks partition the batch
    assert ("test_teacher_top1" in rows[0]) == ("bidirectional: true" in options or method == "eckd_f")
    if "test_teacher_top1" in rows[0]:
        assert (run_dir / "distill" / "teacher_trained.pt").is_file()
