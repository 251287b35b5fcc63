"""The baseline methods users compare ECKD with: DKD, DML, FitNet, ReviewKD, multi-teacher KD.

Unit tests run each method on small CIFAR models and random 32x32 batches the way the trainer
does; the teacher's outputs are computed *with* autograd here, so "the teacher gets no gradient"
checks that the method itself detaches the teacher side. The end-to-end tests then run each
method through the real CLI on a tiny subset of the shared CIFAR-100 sample.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import distill2deploy  # noqa: F401  (registers the *_cifar models)
from distill2deploy import losses
from distill2deploy.cli import main
from distill2deploy.config import load_config
from distill2deploy.errors import UserError
from distill2deploy.methods import TeacherOutput, get_method
from distill2deploy.models.features import extract

from .conftest import SAMPLE_NPZ, SHARED, WEIGHTS


NUM_CLASSES = 10
MASK_KEYS = {"trsr", "trsw", "twsr", "twsw"}


def make(name: str, options: dict | None = None, *, teacher: str = "resnet20_cifar",
         student: str = "mobilenetv2_x0_5_cifar", num_classes: int = NUM_CLASSES):
    torch.manual_seed(0)
    cls = get_method(name)
    opts = cls.parse_options(options or {})
    t = timm.create_model(teacher, num_classes=num_classes)
    s = timm.create_model(student, num_classes=num_classes)
    method = cls(s, [t] if cls.needs_teacher(opts) else [], opts, num_classes=num_classes, input_size=32)
    return method, t, s


def batch(n: int = 8, num_classes: int = NUM_CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def teacher_outputs(method, images: torch.Tensor) -> list[TeacherOutput]:
    """What the trainer hands in, but computed WITH autograd so that leaks would show up as gradients."""
    outs = []
    for t in method.frozen_teachers():
        t.eval()
        logits, feats = method.run_teacher(t, images)
        outs.append(TeacherOutput(logits=logits, features=feats))
    return outs


def step(method, progress: float = 30.0, n: int = 8):
    images, labels = batch(n)
    method.train()
    out = method(images, labels, teacher_outputs(method, images), progress)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    return out


def assert_trained(module: nn.Module, what: str) -> None:
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert params, what
    missing = [n for n, p in params if p.grad is None]
    assert not missing, f"{what}: no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for _, p in params), what
    assert any(p.grad.abs().sum() > 0 for _, p in params), what


def assert_no_grad(module: nn.Module, what: str) -> None:
    assert all(p.grad is None for p in module.parameters()), f"{what} received a gradient"


def assert_logs(out, keys: set[str]) -> None:
    assert set(out.logs) == keys
    for k, v in out.logs.items():
        assert v.dim() == 0 and not v.requires_grad and torch.isfinite(v), k
    if MASK_KEYS <= keys:
        assert math.isclose(sum(float(out.logs[k]) for k in MASK_KEYS), 1.0, abs_tol=1e-6)


def is_submodule(method: nn.Module, net: nn.Module) -> bool:
    return any(m is net for m in method.modules())


# ---------------------------------------------------------------------------------------------- KD
def test_kd_logs_the_final_level_fractions_and_checks_numbers():
    method, teacher, student = make("kd")
    out = step(method)
    assert_logs(out, {"ce", "kd"} | MASK_KEYS)  # like every method with a teacher
    assert_trained(student, "student")
    assert_no_grad(teacher, "frozen teacher")
    for bad in ({"kd_weight": -1.0}, {"temperature": 0.0}, {"ce_weight": float("nan")}):
        with pytest.raises(UserError) as e:
            get_method("kd").parse_options(bad)
        assert e.value.where == f"distill.options.{next(iter(bad))}"


# --------------------------------------------------------------------------------------------- DKD
def test_dkd_loss_grads_and_logs():
    method, teacher, student = make("dkd")
    assert method.options.beta == 8.0 and method.options.warmup_epochs == 20.0
    out = step(method)
    assert_logs(out, {"ce", "tckd", "nckd", "dkd"} | MASK_KEYS)
    assert_trained(student, "student")
    assert_no_grad(teacher, "frozen teacher")
    assert not is_submodule(method, teacher)


def test_dkd_warmup_scales_the_dkd_term():
    method, _, _ = make("dkd", {"warmup_epochs": 20})
    images, labels = batch()
    method.eval()  # identical logits in every call
    t_out = teacher_outputs(method, images)
    with torch.no_grad():
        runs = {p: method(images, labels, t_out, p) for p in (0.0, 5.0, 20.0, 37.5)}
    full = 1.0 * runs[20.0].logs["tckd"] + 8.0 * runs[20.0].logs["nckd"]
    assert full > 0
    assert float(runs[0.0].logs["dkd"]) == 0.0
    assert torch.allclose(runs[0.0].loss, runs[0.0].logs["ce"])
    assert torch.allclose(runs[5.0].logs["dkd"], 0.25 * full, rtol=1e-5)
    assert torch.allclose(runs[20.0].logs["dkd"], full, rtol=1e-5)
    assert torch.allclose(runs[37.5].logs["dkd"], full, rtol=1e-5)
    assert torch.allclose(runs[37.5].loss, runs[37.5].logs["ce"] + full, rtol=1e-5)


def test_dkd_rejects_bad_numbers():
    cls = get_method("dkd")
    with pytest.raises(UserError) as e:
        cls.parse_options({"temperature": 0})
    assert e.value.where == "distill.options.temperature"
    with pytest.raises(UserError) as e:
        cls.parse_options({"warmup_epochs": -1})
    assert e.value.where == "distill.options.warmup_epochs"


# --------------------------------------------------------------------------------------------- DML
def test_dml_classic_trains_student_and_a_fresh_copy():
    method, _, student = make("dml")
    assert not get_method("dml").needs_teacher(method.options) and not method.uses_teacher
    assert method.frozen_teachers() == []
    peer = method.extra_eval_models()["peer0"]
    assert set(method.extra_eval_models()) == {"peer0"}
    assert type(peer) is type(student) and is_submodule(method, peer)
    assert not torch.equal(next(peer.parameters()), next(student.parameters()))  # its own initialisation
    specs = method.optimizers(0.01)
    assert set(specs) == {"student", "peer0"}
    assert {id(p) for p in specs["student"].params} == {id(p) for p in student.parameters()}
    assert {id(p) for p in specs["peer0"].params} == {id(p) for p in peer.parameters()}
    out = step(method)
    assert_logs(out, {"ce", "dml", "peer0_ce", "peer0_dml"} | MASK_KEYS)
    assert_trained(student, "student")
    assert_trained(peer, "peer")


def test_dml_cross_terms_are_detached():
    """One backward of the summed loss gives the student exactly the gradient of its own loss."""
    method, _, student = make("dml")
    images, labels = batch()
    method.train()
    method(images, labels, [], 0.0).loss.backward()
    combined = [p.grad.clone() for p in student.parameters()]
    method.zero_grad(set_to_none=True)
    peer_logits = method.peers["peer0"](images).detach()
    logits = student(images)
    own = F.cross_entropy(logits, labels) + losses.dml_loss(logits, [peer_logits])
    own.backward()
    for g, p in zip(combined, student.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6, rtol=1e-4)


def test_dml_with_the_teacher_as_a_trainable_peer():
    method, teacher, student = make("dml", {"peers": ["resnet20_cifar", "teacher"]})
    assert get_method("dml").needs_teacher(method.options) and method.uses_teacher
    assert method.frozen_teachers() == []  # trained here, not frozen by the trainer
    assert method.extra_eval_models()["teacher"] is teacher and is_submodule(method, teacher)
    assert set(method.extra_eval_models()) == {"peer0", "teacher"}
    assert set(method.optimizers(0.01)) == {"student", "peer0", "teacher"}
    out = step(method)
    assert_logs(out, {"ce", "dml", "peer0_ce", "peer0_dml", "teacher_ce", "teacher_dml"} | MASK_KEYS)
    for name, net in [("student", student), *method.extra_eval_models().items()]:
        assert_trained(net, name)


def test_dml_options_are_checked():
    cls = get_method("dml")
    with pytest.raises(UserError) as e:
        cls.parse_options({"peers": ["teacher", "teacher"]})
    assert e.value.where == "distill.options.peers"
    with pytest.raises(UserError) as e:
        make("dml", {"peers": ["resnet20_cifr"]})
    assert "resnet20_cifar" in str(e.value)


# ------------------------------------------------------------------------------------------ FitNet
def test_fitnet_loss_grads_and_logs():
    method, teacher, student = make("fitnet", {"kd_weight": 0.5})
    assert method.hint == (2, 5)  # middle of [(1, 3), (2, 5), (3, 7)]
    assert method.options.feature_weight == 100.0
    assert not any(n.startswith("student.") and "regressor" in n for n, _ in method.named_parameters())
    out = step(method)
    assert_logs(out, {"ce", "fitnet", "kd"} | MASK_KEYS)
    assert torch.allclose(out.loss, out.logs["ce"] + 100 * out.logs["fitnet"] + 0.5 * out.logs["kd"], rtol=1e-5)
    assert_trained(student, "student")
    assert_trained(method.regressor, "regressor")
    assert_no_grad(teacher, "frozen teacher")


@pytest.mark.parametrize("student, hint, s_channels", [
    ("mobilenetv2_x0_5_cifar", (2, 5), 48), ("shufflenetv2_cifar", (2, 2), 232)])
def test_fitnet_shapes_on_two_pairs(student, hint, s_channels):
    method, teacher, s = make("fitnet", teacher="resnet56_cifar", student=student)
    assert method.hint == hint and method.teacher_feature_indices() == [hint[0]]
    images, _ = batch(2)
    with torch.no_grad():
        (f_t,) = extract(teacher.eval(), images, [hint[0]])[1]
        (f_s,) = extract(s.eval(), images, [hint[1]])[1]
        method.eval()
        regressed = method.regress(f_s)
    assert f_s.shape[1] == s_channels
    assert regressed.shape == f_t.shape == (2, 32, 16, 16)


def test_fitnet_custom_and_bad_hint():
    method, _, _ = make("fitnet", {"hint": [3, 7]}, teacher="resnet56_cifar")
    assert method.hint == (3, 7) and method.regressor[0].in_channels == 160 and method.regressor[0].out_channels == 64
    with pytest.raises(UserError) as e:
        make("fitnet", {"hint": [4, 2]})
    assert e.value.where == "distill.options.hint"
    with pytest.raises(UserError) as e:
        get_method("fitnet").parse_options({"hint": [1, 2, 3]})
    assert e.value.where == "distill.options.hint"


# ---------------------------------------------------------------------------------------- ReviewKD
@pytest.mark.parametrize("pooled", [True, False])
def test_reviewkd_loss_grads_and_logs(pooled):
    method, teacher, student = make("reviewkd", {"pooled": pooled})
    out = step(method)
    assert_logs(out, {"ce", "hcl"} | MASK_KEYS)
    assert_trained(student, "student")
    assert len(method.abfs) == 3 + pooled
    for i, abf in enumerate(method.abfs):
        assert_trained(abf, f"ABF {i}")
    assert method.abfs[-1].attention is None and all(a.attention is not None for a in method.abfs[:-1])
    assert_no_grad(teacher, "frozen teacher")


def test_reviewkd_warmup():
    method, _, _ = make("reviewkd", {"warmup_epochs": 20, "feature_weight": 2.0})
    images, labels = batch()
    method.eval()
    t_out = teacher_outputs(method, images)
    with torch.no_grad():
        start, half = method(images, labels, t_out, 0.0), method(images, labels, t_out, 10.0)
    assert torch.allclose(start.loss, start.logs["ce"])
    assert torch.allclose(half.loss, half.logs["ce"] + 2.0 * 0.5 * half.logs["hcl"], rtol=1e-5)


@pytest.mark.parametrize("student, s_channels", [
    ("mobilenetv2_x0_5_cifar", [16, 48, 160, 1280]), ("shufflenetv2_cifar", [116, 232, 464, 1024])])
def test_reviewkd_shapes_on_two_pairs(student, s_channels):
    method, teacher, s = make("reviewkd", teacher="resnet56_cifar", student=student)
    assert method.teacher_feature_indices() == [1, 2, 3, 3]
    assert [a.reduce[0].in_channels for a in method.abfs] == s_channels
    assert {a.reduce[0].out_channels for a in method.abfs} == {min(512, s_channels[-1])}
    images, _ = batch(2)
    method.eval()
    with torch.no_grad():
        t_logits, t_feats = extract(teacher.eval(), images, method.teacher_feature_indices())
        targets = method.teacher_targets(TeacherOutput(t_logits, t_feats))
        _, feats = extract(s, images, method.student_indices)
        from distill2deploy.methods.reviewkd import student_features
        _, with_pooled = student_features(s, images, method.student_indices, pooled=True)
        reviewed = method.review(with_pooled)
    assert [f.shape[1] for f in feats] == s_channels[:3]
    assert [tuple(t.shape) for t in targets] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8), (2, 64, 1, 1)]
    assert [r.shape for r in reviewed] == [t.shape for t in targets]


def test_reviewkd_defaults_follow_the_authors_code_pre_activation_and_nearest():
    """Teacher stage features before the last ReLU (the code's preact=True: negatives kept, ReLU of them
    is timm's stage output); the pooled target stays post-ReLU; ABF resizes by nearest neighbour."""
    images, _ = batch(2)
    method, teacher, _ = make("reviewkd", teacher="resnet56_cifar")
    teacher.eval()
    with torch.no_grad():
        _, post = extract(teacher, images, method.teacher_feature_indices())
        _, pre = method.run_teacher(teacher, images)
    for a, b in zip(pre[:3], post[:3]):
        assert a.min() < 0 <= b.min() and torch.equal(torch.relu(a), b)
    assert torch.equal(pre[3], post[3])  # the pooled (pre-logit) target: post-ReLU, as the code's
    up = torch.arange(4.0).view(1, 1, 2, 2)
    assert torch.equal(method.abfs[0]._resize(up, (4, 4)), up.repeat_interleave(2, 2).repeat_interleave(2, 3))

    old, teacher, _ = make("reviewkd", {"teacher_features": "output", "resize": "pool_bilinear"},
                           teacher="resnet56_cifar")
    with torch.no_grad():
        _, feats = old.run_teacher(teacher.eval(), images)
    assert all(torch.equal(a, b) for a, b in zip(feats, post))
    assert torch.allclose(old.abfs[0]._resize(up, (4, 4)), F.interpolate(up, size=(4, 4), mode="bilinear"))


def test_reviewkd_rejects_a_zero_fusion_width():
    with pytest.raises(UserError) as e:
        get_method("reviewkd").parse_options({"max_mid_channels": 0})
    assert e.value.where == "distill.options.max_mid_channels"


def test_default_levels_use_every_stage_of_timm_models():
    """The thesis's MobileNetV2 stages (2, 3, 5, 7) belong to the CIFAR MobileNetV2s only: timm's
    ImageNet mobilenetv2_100 has 4 stages, and its deepest must be paired too."""
    from distill2deploy.methods._levels import default_levels

    teacher = timm.create_model("resnet56_cifar", num_classes=NUM_CLASSES)
    assert default_levels(teacher, timm.create_model("mobilenetv2_x0_5_cifar", num_classes=NUM_CLASSES)) == [
        (1, 3), (2, 5), (3, 7)]
    assert default_levels(teacher, timm.create_model("mobilenetv2_100", num_classes=NUM_CLASSES)) == [
        (1, 2), (2, 3), (3, 4)]


def test_reviewkd_levels_must_go_deeper():
    with pytest.raises(UserError) as e:
        make("reviewkd", {"levels": [[2, 5], [1, 3]]})
    assert e.value.where == "distill.options.levels"


# ----------------------------------------------------------------------------------- multi-teacher
@pytest.fixture
def extra_ckpt(tmp_path) -> Path:
    """Trained-looking weights for an extra resnet20 teacher (10 classes), saved like a user's checkpoint."""
    torch.manual_seed(5)
    path = tmp_path / "extra_resnet20.pth"
    torch.save(timm.create_model("resnet20_cifar", num_classes=NUM_CLASSES).state_dict(), path)
    return path


@pytest.mark.parametrize("weighting", ["mean", "confidence", "entropy"])
def test_multi_teacher_loss_and_frozen_teachers(extra_ckpt, weighting):
    method, teacher, student = make("multi_teacher", {
        "extra_teachers": [{"model": "resnet20_cifar", "checkpoint": str(extra_ckpt)}],
        "weighting": weighting, "weights": [3, 1]})
    assert get_method("multi_teacher").needs_teacher(method.options)
    teachers = method.frozen_teachers()
    assert len(teachers) == 2 and teachers[0] is teacher
    extra = teachers[1]
    assert not is_submodule(method, extra) and not any(p.requires_grad for p in extra.parameters())
    assert torch.equal(extra.state_dict()["fc.weight"], torch.load(extra_ckpt)["fc.weight"])
    out = step(method)
    assert_logs(out, {"ce", "kd"} | MASK_KEYS)
    assert_trained(student, "student")
    for t in teachers:
        assert_no_grad(t, "frozen teacher")
    with pytest.raises(ValueError):
        method(*batch(), teacher_outputs(method, batch()[0])[:1], 0.0)


def test_multi_teacher_targets_follow_the_weights(extra_ckpt):
    method, _, _ = make("multi_teacher", {"extra_teachers": [{"model": "resnet20_cifar",
                                                              "checkpoint": str(extra_ckpt)}],
                                          "weights": [1, 0]})
    images, labels = batch()
    method.eval()
    t_out = teacher_outputs(method, images)
    with torch.no_grad():
        out = method(images, labels, t_out, 0.0)
        only_first = losses.kd_loss(method.student(images), t_out[0].logits, 4.0)
    assert torch.allclose(out.logs["kd"], only_first, rtol=1e-4)


def test_multi_teacher_validation(extra_ckpt, tmp_path):
    cls = get_method("multi_teacher")
    good = {"model": "resnet20_cifar", "checkpoint": str(extra_ckpt)}
    with pytest.raises(UserError) as e:
        cls.parse_options({"extra_teachers": [good], "weights": [1, 1, 1]})
    assert e.value.where == "distill.options.weights" and "2 teachers" in e.value.what
    with pytest.raises(UserError) as e:
        cls.parse_options({"weights": [0.0]})
    assert e.value.where == "distill.options.weights"
    with pytest.raises(UserError) as e:
        cls.parse_options({"extra_teachers": [good, {"model": "resnet20_cifar",
                                                     "checkpoint": str(tmp_path / "nope.pth")}]})
    assert e.value.where == "distill.options.extra_teachers[1].checkpoint"
    with pytest.raises(UserError) as e:
        cls.parse_options({"extra_teachers": [{"model": "resnet20_cifar", "pretrained": False}]})
    assert e.value.where == "distill.options.extra_teachers[0].pretrained"
    with pytest.raises(UserError) as e:
        cls.parse_options({"extra_teachers": [{"model": "resnet20_cifr", "checkpoint": str(extra_ckpt)}]})
    assert e.value.where == "distill.options.extra_teachers[0].model" and "resnet20_cifar" in e.value.what
    with pytest.raises(UserError) as e:
        cls.parse_options({"extra_teachers": [{"checkpoint": str(extra_ckpt)}]})
    assert e.value.where == "distill.options.extra_teachers[0].model"
    with pytest.raises(UserError) as e:  # weights of another architecture: the factory's error, named here
        make("multi_teacher", {"extra_teachers": [{"model": "wrn_16_2_cifar", "checkpoint": str(extra_ckpt)}]})
    assert e.value.where.startswith("distill.options.extra_teachers[0]")


# ---------------------------------------------------------------------------------------- AT, FSP
def test_at_loss_grads_logs_and_no_extra_modules():
    method, teacher, student = make("at", {"kd_weight": 0.5})
    assert method.pairs == [(1, 3), (2, 5), (3, 7)] and method.teacher_feature_indices() == [1, 2, 3]
    assert method.options.feature_weight == 1000.0 and method.options.p == 2.0
    # attention maps need no adapter: the method trains the student's parameters and nothing else
    assert {id(p) for p in method.parameters()} == {id(p) for p in student.parameters()}
    out = step(method)
    assert_logs(out, {"ce", "at", "kd"} | MASK_KEYS)
    assert torch.allclose(out.loss, out.logs["ce"] + 1000 * out.logs["at"] + 0.5 * out.logs["kd"], rtol=1e-5)
    assert_trained(student, "student")
    assert_no_grad(teacher, "frozen teacher")


def test_at_matches_the_loss_on_the_paired_stages():
    method, teacher, student = make("at", {"levels": [[3, 7]]}, teacher="resnet56_cifar")
    images, labels = batch(4)
    method.eval()
    with torch.no_grad():
        out = method(images, labels, teacher_outputs(method, images), 1.0)
        f_s = extract(student, images, [7])[1]
        f_t = extract(teacher.eval(), images, [3])[1]
    assert (f_s[0].shape[-2:], f_t[0].shape[-2:]) == ((2, 2), (8, 8))  # the teacher map is pooled to 2x2
    assert torch.allclose(out.logs["at"], losses.at_loss(f_s, f_t), rtol=1e-6)
    for bad, key in (({"levels": []}, "levels"), ({"p": 0.0}, "p"), ({"feature_weight": -1.0}, "feature_weight")):
        with pytest.raises(UserError) as e:
            make("at", bad)
        assert e.value.where == f"distill.options.{key}"


@pytest.mark.parametrize("teacher, student, adapted", [
    ("resnet56_cifar", "resnet20_cifar", [False] * 4),              # the CRD code's case: equal widths
    ("resnet56_cifar", "mobilenetv2_x0_5_cifar", [False, False, True, True]),  # stem and stage 3: 16 wide
    ("resnet56_cifar", "shufflenetv2_cifar", [True, True, True, True])])
def test_fsp_points_and_adapters(teacher, student, adapted):
    method, t, s = make("fsp", teacher=teacher, student=student)
    assert method.points[0] == (0, 0) and len(method.points) == 4   # stem + the three deepest pairs
    assert [not isinstance(a, nn.Identity) for a in method.adapters] == adapted
    out = step(method, progress=0.5)  # inside the 30 initialisation epochs
    assert_logs(out, {"ce", "fsp"} | MASK_KEYS)
    assert torch.allclose(out.loss, out.logs["fsp"], rtol=1e-6)  # FSP alone
    assert_trained(s, "student")  # the classifier has a (zero) gradient too: DDP needs no unused-parameter search
    assert_no_grad(t, "frozen teacher")


def test_fsp_schedule_two_stage_then_joint():
    method, teacher, student = make("fsp", {"init_epochs": 2, "feature_weight": 3.0, "kd_weight": 0.5})
    images, labels = batch(4)
    method.eval()
    with torch.no_grad():
        before = method(images, labels, teacher_outputs(method, images), 1.99)
        after = method(images, labels, teacher_outputs(method, images), 2.0)
    assert set(before.logs) == set(after.logs)  # same keys in both phases (epoch averages stay exact)
    assert torch.allclose(before.loss, before.logs["fsp"], rtol=1e-6)
    expected = after.logs["ce"] + 3.0 * after.logs["fsp"] + 0.5 * after.logs["kd"]
    assert torch.allclose(after.loss, expected, rtol=1e-6)
    # the FSP term itself: matrices of the adapted student against the teacher's, stem -> ... -> stage 3
    t_feats = extract(teacher.eval(), images, [0, 1, 2, 3])[1]
    with torch.no_grad():
        s_feats = [a(f) for a, f in zip(method.adapters, extract(student, images, [0, 3, 5, 7])[1])]
        ref = losses.fsp_loss(list(zip(s_feats, s_feats[1:])), list(zip(t_feats, t_feats[1:])))
    assert torch.allclose(after.logs["fsp"], ref, rtol=1e-5)


def test_fsp_options_are_checked():
    for bad, key in (({"levels": [[0, 0]]}, "levels"), ({"init_epochs": 0, "feature_weight": 0}, "feature_weight"),
                     ({"init_weight": 0}, "init_weight"), ({"levels": [[0, 0], [0, 3]]}, "levels"),
                     ({"levels": [[0, 0], [9, 3]]}, "levels[1]")):
        with pytest.raises(UserError) as e:
            make("fsp", bad)
        assert e.value.where == f"distill.options.{key}", (bad, e.value.where)


# ------------------------------------------------------------------------------------------ configs
METHODS = ["ce", "kd", "dkd", "dml", "fitnet", "at", "fsp", "reviewkd", "multi_teacher"]


@pytest.mark.parametrize("student", ["mobilenet", "shufflenet"])
def test_bundled_method_configs(student):
    for method in METHODS:
        cfg, path = load_config(f"methods/{student}_{method}.yaml")
        assert cfg.name == path.stem == f"{student}_{method}"
        assert cfg.distill.method == method
        # FSP's 30 initialisation epochs come before the standard 240 (as in the CRD benchmark code)
        init = 30 if method == "fsp" else 0
        assert (cfg.distill.epochs, cfg.distill.lr, cfg.distill.batch_size) == (240 + init, 0.01, 64)
        assert cfg.distill.milestones == [150 + init, 180 + init, 210 + init]
        assert init == cfg.distill.options.get("init_epochs", 0)
        assert cfg.teacher.model == "resnet56_cifar" and cfg.teacher.pretrained
        assert cfg.student.model == {"mobilenet": "mobilenetv2_x0_5_cifar", "shufflenet": "shufflenetv2_cifar"}[student]


# ------------------------------------------------------------------------------ through the real CLI
PIPELINE_CASES = {
    "dkd": ({}, {"ce", "tckd", "nckd", "dkd"} | MASK_KEYS, []),
    "dml": ({"peers": ["teacher"]}, {"ce", "dml", "teacher_ce", "teacher_dml"} | MASK_KEYS, ["teacher"]),
    "fitnet": ({}, {"ce", "fitnet"} | MASK_KEYS, []),
    "at": ({}, {"ce", "at"} | MASK_KEYS, []),
    "fsp": ({"init_epochs": 0.5}, {"ce", "fsp"} | MASK_KEYS, []),  # both phases within the one epoch
    "reviewkd": ({"max_mid_channels": 64}, {"ce", "hcl"} | MASK_KEYS, []),  # narrower ABFs: CPU time
    "multi_teacher": ({"extra_teachers": [{"model": "resnet32_cifar",
                                           "checkpoint": str(WEIGHTS / "cifar100_resnet32.pth")}],
                       "weighting": "entropy"}, {"ce", "kd"} | MASK_KEYS, []),
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One run directory for all methods: the teacher stage runs once and is cached after that.

    The teacher is the real CIFAR-100 ResNet-20 (same stage shapes as ResNet-56, a third of the
    compute): these runs check the plumbing, not accuracy."""
    return tmp_path_factory.mktemp("baselines") / "run"


@pytest.mark.slow
@pytest.mark.parametrize("method", list(PIPELINE_CASES))
def test_method_runs_through_the_cli(run_dir, method):
    if not (SAMPLE_NPZ.is_file() and (WEIGHTS / "cifar100_resnet20.pth").is_file()):
        pytest.skip(f"the shared CIFAR-100 sample and weights are not under {SHARED}")
    options, log_keys, extra_models = PIPELINE_CASES[method]
    args = ["distill", "quickstart", "--out", str(run_dir),
            "-o", f"data.source=npz:{SAMPLE_NPZ}", "-o", "teacher.model=resnet20_cifar",
            "-o", f"teacher.checkpoint={WEIGHTS / 'cifar100_resnet20.pth'}",
            "-o", "data.subset.train=64", "-o", "data.subset.test=32", "-o", "distill.epochs=1",
            "-o", "distill.batch_size=32", "-o", "distill.milestones=[1]", "-o", f"distill.method={method}",
            "-o", f"distill.options={json.dumps(options)}"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    row = rows[0]
    assert {f"train_{k}" for k in log_keys} <= set(row), sorted(row)
    assert all(math.isfinite(row[f"train_{k}"]) for k in log_keys)
    assert math.isclose(sum(row[f"train_{k}"] for k in MASK_KEYS), 1.0, abs_tol=1e-6)
    for name in extra_models:
        assert 0.0 <= row[f"test_{name}_top1"] <= 1.0
        assert (run_dir / "distill" / f"{name}_trained.pt").is_file()
    stage = json.loads((run_dir / "distill" / "stage.json").read_text())
    assert stage["summary"]["method"] == method
    saved = torch.load(run_dir / "distill" / "student.pt", weights_only=True)
    plain = timm.create_model("mobilenetv2_x0_5_cifar", num_classes=100).state_dict()
    assert list(saved) == list(plain)
    assert all(saved[k].shape == plain[k].shape for k in plain)
