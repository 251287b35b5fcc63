"""Distillation losses against hand-computed values (numpy / closed forms, never the code under test)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distill2deploy import losses as L

# ---------------------------------------------------------------------------- numpy references


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise KL(p || q) with the convention 0 * log(0 / anything) = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / q), 0.0)
    return terms.sum(axis=-1)


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


LOGITS_A = [[2.0, 0.5, -1.0, 0.0], [0.3, 0.1, 1.7, -0.4], [-1.2, 2.2, 0.0, 0.9]]
LOGITS_B = [[0.5, 1.0, 0.0, -0.5], [1.1, -0.3, 0.4, 0.2], [0.0, 0.7, -0.8, 1.5]]
LABELS = [0, 2, 3]


# ---------------------------------------------------------------------------- KD


def test_kl_closed_form_and_tau_squared_scaling():
    # p = [1/2, 1/2], q = [1/4, 3/4]: KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    src, tgt = t([[0.0, 0.0]]), t([[0.0, math.log(3.0)]])
    assert L.kl_div_tempered(src, tgt, 1.0).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    # the same probabilities at tau = 2 (logits doubled): the loss is 2^2 times the plain KL
    assert L.kl_div_tempered(src, 2 * tgt, 2.0).item() == pytest.approx(4 * 0.5 * math.log(4 / 3), rel=1e-12)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_loss_matches_numpy_and_only_student_gets_gradient(tau):
    teacher = t(LOGITS_A).requires_grad_()
    student = t(LOGITS_B).requires_grad_()
    loss = L.kd_loss(student, teacher, tau)
    expected = tau**2 * np_kl(np_softmax(np.array(LOGITS_A) / tau), np_softmax(np.array(LOGITS_B) / tau)).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    per_sample = L.kl_div_tempered(teacher, student, tau, reduction="none")
    assert per_sample.shape == (3,)
    assert L.kl_div_tempered(teacher, student, tau, reduction="sum").item() == pytest.approx(3 * expected, rel=1e-10)


def test_bad_temperature_is_a_value_error_naming_no_config_key():
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="kl_div_tempered: temperature"):
            L.kd_loss(t(LOGITS_B), t(LOGITS_A), bad)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="same shape"):
        L.kd_loss(t(LOGITS_B), t(LOGITS_A)[:, :3])


# ---------------------------------------------------------------------------- ECKD masks


def constructed_batch():
    # labels:               0        1        2        0        1
    # teacher argmax:       0 (R)    1 (R)    0 (W)    2 (W)    1 (R)
    # student argmax:       0 (R)    2 (W)    2 (R)    1 (W)    0 (W)
    labels = torch.tensor([0, 1, 2, 0, 1])
    teacher = t([[3, 0, 0], [0, 3, 0], [3, 0, 0], [0, 0, 3], [0, 3, 1]])
    student = t([[2, 1, 0], [0, 1, 2], [0, 0, 1], [0, 1, 0], [2, 1, 0]])
    return teacher, student, labels


def test_correctness_and_error_masks_on_constructed_batch():
    teacher, student, labels = constructed_batch()
    assert L.correctness(teacher, labels).tolist() == [True, True, False, False, True]
    assert L.correctness(student, labels).tolist() == [True, False, True, False, False]
    m = L.error_masks(teacher, student, labels)
    assert m.trsr.tolist() == [True, False, False, False, False]
    assert m.trsw.tolist() == [False, True, False, False, True]
    assert m.twsr.tolist() == [False, False, True, False, False]
    assert m.twsw.tolist() == [False, False, False, True, False]
    assert m.student_correction is m.trsw and m.teacher_correction is m.twsr
    # the four masks partition the batch
    assert (m.trsr.int() + m.trsw.int() + m.twsr.int() + m.twsw.int()).tolist() == [1] * 5
    fr = L.mask_fractions(m)
    assert set(fr) == {"trsr", "trsw", "twsr", "twsw"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in fr.values())
    assert {k: round(v.item(), 6) for k, v in fr.items()} == {"trsr": 0.2, "trsw": 0.4, "twsr": 0.2, "twsw": 0.2}


def test_error_masks_reject_bad_labels():
    teacher, student, labels = constructed_batch()
    with pytest.raises(ValueError, match="labels"):
        L.error_masks(teacher, student, labels[:3])
    with pytest.raises(ValueError, match="labels"):
        L.correctness(teacher, labels.float())


# ---------------------------------------------------------------------------- EC loss


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_ec_loss_equals_masking_both_sides_probabilities(tau):
    src_np, tgt_np = np.array(LOGITS_A), np.array(LOGITS_B)
    mask_np = np.array([1.0, 0.0, 1.0])
    # the spec's form: the mask row multiplies both softened distributions, 0 log 0/0 = 0
    p = mask_np[:, None] * np_softmax(src_np / tau)
    q = mask_np[:, None] * np_softmax(tgt_np / tau)
    spec_form = tau**2 * np_kl(p, q).sum() / 3
    # the masked per-sample KL form
    per_sample_form = tau**2 * (mask_np * np_kl(np_softmax(src_np / tau), np_softmax(tgt_np / tau))).sum() / 3
    assert spec_form == pytest.approx(per_sample_form, rel=1e-12)

    source = t(LOGITS_A).requires_grad_()
    target = t(LOGITS_B).requires_grad_()
    loss = L.ec_loss(source, target, torch.tensor([True, False, True]), tau)
    assert loss.item() == pytest.approx(spec_form, rel=1e-10)
    loss.backward()
    assert source.grad is None
    # only the masked rows of the learning side receive gradient
    row_grad = target.grad.abs().sum(dim=1)
    assert row_grad[0] > 0 and row_grad[2] > 0 and row_grad[1] == 0


def test_ec_loss_tau_squared_scaling():
    mask = torch.tensor([True, True, False])
    tau = 4.0
    loss = L.ec_loss(t(LOGITS_A), t(LOGITS_B), mask, tau).item()
    unscaled = np_kl(np_softmax(np.array(LOGITS_A) / tau), np_softmax(np.array(LOGITS_B) / tau))[:2].sum() / 3
    assert loss == pytest.approx(tau**2 * unscaled, rel=1e-10)


def test_ec_loss_empty_mask_is_exactly_zero_with_zero_gradient():
    teacher, student, labels = constructed_batch()
    teacher, student = teacher[[0, 2, 3]], student[[0, 2, 3]]
    labels = labels[[0, 2, 3]]
    masks = L.error_masks(teacher, student, labels)
    assert not masks.trsw.any()  # no sample where the teacher could correct the student
    # an unselected row whose KL is infinite must not poison the gradient (0 * inf = NaN)
    student = student.clone()
    student[2, 0] = -math.inf
    student.requires_grad_()
    loss = L.ec_loss(teacher, student, masks.student_correction, 4.0)
    assert loss.item() == 0.0
    loss.backward()
    assert student.grad is not None
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_ec_loss_requires_a_bool_mask():
    with pytest.raises(TypeError, match="bool mask"):
        L.ec_loss(t(LOGITS_A), t(LOGITS_B), torch.tensor([1.0, 0.3, 0.0]), 4.0)
    with pytest.raises(TypeError, match="bool mask"):
        L.ec_loss(t(LOGITS_A), t(LOGITS_B), torch.tensor([True, False]), 4.0)


# ---------------------------------------------------------------------------- DKD


def np_dkd(student: np.ndarray, teacher: np.ndarray, labels: list[int], tau: float):
    """TCKD and NCKD per sample straight from the definitions (times tau^2)."""
    tckd, nckd, pt_teacher = [], [], []
    for zs, zt, y in zip(student, teacher, labels):
        ps, pt = np_softmax(zs / tau), np_softmax(zt / tau)
        bs, bt = np.array([ps[y], 1 - ps[y]]), np.array([pt[y], 1 - pt[y]])
        keep = [c for c in range(len(zs)) if c != y]
        hat_s, hat_t = ps[keep] / ps[keep].sum(), pt[keep] / pt[keep].sum()
        tckd.append(tau**2 * np_kl(bt, bs))
        nckd.append(tau**2 * np_kl(hat_t, hat_s))
        pt_teacher.append(pt[y])
    return np.array(tckd), np.array(nckd), np.array(pt_teacher)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dkd_terms_match_definitions(tau):
    tckd_np, nckd_np, _ = np_dkd(np.array(LOGITS_B), np.array(LOGITS_A), LABELS, tau)
    labels = torch.tensor(LABELS)
    tckd, nckd = L.dkd_terms(t(LOGITS_B), t(LOGITS_A), labels, tau, reduction="none")
    np.testing.assert_allclose(tckd.numpy(), tckd_np, rtol=1e-10)
    np.testing.assert_allclose(nckd.numpy(), nckd_np, rtol=1e-10)
    tckd_m, nckd_m = L.dkd_terms(t(LOGITS_B), t(LOGITS_A), labels, tau)
    assert tckd_m.item() == pytest.approx(tckd_np.mean(), rel=1e-10)
    assert nckd_m.item() == pytest.approx(nckd_np.mean(), rel=1e-10)
    total = L.dkd_loss(t(LOGITS_B), t(LOGITS_A), labels, alpha=1.0, beta=8.0, temperature=tau)
    assert total.item() == pytest.approx(tckd_np.mean() + 8 * nckd_np.mean(), rel=1e-10)


def test_dkd_decomposition_reproduces_kd():
    """KD = TCKD + (1 - p_t^T) * NCKD per sample: alpha = 1, beta = 1 - p_t^T gives KD back."""
    tau = 4.0
    labels = torch.tensor(LABELS)
    student, teacher = t(LOGITS_B), t(LOGITS_A)
    tckd, nckd = L.dkd_terms(student, teacher, labels, tau, reduction="none")
    p_t = torch.softmax(teacher / tau, dim=1).gather(1, labels[:, None]).squeeze(1)
    recomposed = tckd + (1 - p_t) * nckd
    kd = L.kl_div_tempered(teacher, student, tau, reduction="none")
    torch.testing.assert_close(recomposed, kd, rtol=1e-12, atol=1e-12)
    assert recomposed.mean().item() == pytest.approx(L.kd_loss(student, teacher, tau).item(), rel=1e-12)
    # and against numpy, to be sure both sides are not wrong in the same way
    _, _, pt_np = np_dkd(np.array(LOGITS_B), np.array(LOGITS_A), LABELS, tau)
    kd_np = tau**2 * np_kl(np_softmax(np.array(LOGITS_A) / tau), np_softmax(np.array(LOGITS_B) / tau))
    np.testing.assert_allclose(p_t.numpy(), pt_np, rtol=1e-12)
    np.testing.assert_allclose(recomposed.numpy(), kd_np, rtol=1e-10)


def test_dkd_gradient_only_into_student_and_stable_for_large_logits():
    teacher = t([[200.0, -100.0, 0.0], [0.0, 0.0, 500.0]]).requires_grad_()
    student = t([[-300.0, 100.0, 0.0], [1.0, 2.0, 3.0]]).requires_grad_()
    loss = L.dkd_loss(student, teacher, torch.tensor([0, 2]), temperature=1.0)
    assert torch.isfinite(loss)
    loss.backward()
    assert teacher.grad is None and torch.isfinite(student.grad).all()


def test_dkd_warmup():
    assert L.dkd_warmup(0, 20) == 0.0
    assert L.dkd_warmup(5, 20) == 0.25
    assert L.dkd_warmup(20, 20) == 1.0
    assert L.dkd_warmup(37.5, 20) == 1.0
    assert L.dkd_warmup(3, 0) == 1.0
    with pytest.raises(ValueError, match="warm-up"):
        L.dkd_warmup(3, -1)


# ---------------------------------------------------------------------------- DML


def test_dml_mean_over_peers_peers_detached():
    self_logits = t(LOGITS_B).requires_grad_()
    peer1 = t(LOGITS_A).requires_grad_()
    peer2 = t([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]]).requires_grad_()
    loss = L.dml_loss(self_logits, [peer1, peer2])
    q = np_softmax(np.array(LOGITS_B))
    expected = 0.5 * (np_kl(np_softmax(peer1.detach().numpy()), q).mean()
                      + np_kl(np_softmax(peer2.detach().numpy()), q).mean())
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert peer1.grad is None and peer2.grad is None and self_logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="peer"):
        L.dml_loss(self_logits, [])


# ---------------------------------------------------------------------------- multi-teacher


TEACHERS = [[[4.0, 0.0, 0.0], [0.0, 0.5, 0.0]],      # teacher 1: sure on sample 0, unsure on 1
            [[1.0, 0.0, 0.5], [0.0, 0.0, 3.0]]]      # teacher 2: unsure on sample 0, sure on 1


def test_multi_teacher_weights_hand_computed():
    teachers = [t(x) for x in TEACHERS]
    probs = np.stack([np_softmax(np.array(x)) for x in TEACHERS], axis=1)          # [B, K, C]

    mean = L.multi_teacher_weights(teachers, "mean")
    np.testing.assert_allclose(mean.numpy(), [[0.5, 0.5], [0.5, 0.5]])
    fixed = L.multi_teacher_weights(teachers, "mean", [1.0, 3.0])
    np.testing.assert_allclose(fixed.numpy(), [[0.25, 0.75], [0.25, 0.75]])

    conf = probs.max(axis=2)
    conf_w = conf / conf.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(L.multi_teacher_weights(teachers, "confidence").numpy(), conf_w, rtol=1e-6)
    assert conf_w[0, 0] > 0.5 and conf_w[1, 1] > 0.5  # the sure teacher dominates each sample

    neg_h = (probs * np.log(probs)).sum(axis=2)
    ent_w = np.exp(neg_h) / np.exp(neg_h).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(L.multi_teacher_weights(teachers, "entropy").numpy(), ent_w, rtol=1e-6)

    # a fixed prior multiplies the per-sample weights before renormalising
    prior = np.array([1.0, 3.0])
    conf_prior = conf * prior / (conf * prior).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(L.multi_teacher_weights(teachers, "confidence", [1, 3]).numpy(), conf_prior,
                               rtol=1e-6)
    ent_prior = np.exp(neg_h) * prior / (np.exp(neg_h) * prior).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(L.multi_teacher_weights(teachers, "entropy", [1, 3]).numpy(), ent_prior,
                               rtol=1e-6)

    for weighting in L.MULTI_TEACHER_WEIGHTINGS:
        for w in (None, [2.0, 0.5]):
            s = L.multi_teacher_weights(teachers, weighting, w).sum(dim=1)
            torch.testing.assert_close(s, torch.ones(2, dtype=s.dtype))


@pytest.mark.parametrize("weighting", ["mean", "confidence", "entropy"])
def test_multi_teacher_targets_are_weighted_soft_targets(weighting):
    tau = 2.0
    teachers = [t(x).requires_grad_() for x in TEACHERS]
    target = L.multi_teacher_targets(teachers, tau, weighting)
    w = L.multi_teacher_weights(teachers, weighting).numpy()
    soft = np.stack([np_softmax(np.array(x) / tau) for x in TEACHERS], axis=1)
    np.testing.assert_allclose(target.numpy(), (w[:, :, None] * soft).sum(axis=1), rtol=1e-6)
    torch.testing.assert_close(target.sum(dim=1), torch.ones(2, dtype=target.dtype))
    assert not target.requires_grad


def test_multi_teacher_bad_arguments_are_value_errors():
    """The config's weighting and weights are checked when it loads (test_baselines); here a caller bug."""
    teachers = [t(x) for x in TEACHERS]
    with pytest.raises(ValueError, match="unknown weighting 'entropi'"):
        L.multi_teacher_targets(teachers, 4.0, "entropi")
    with pytest.raises(ValueError, match="not 2 non-negative"):
        L.multi_teacher_targets(teachers, 4.0, "mean", [1.0])
    with pytest.raises(ValueError, match="not 2 non-negative"):
        L.multi_teacher_targets(teachers, 4.0, "mean", [1.0, -1.0])


def test_soft_target_kd_with_zero_target_entries():
    tau = 2.0
    target = t([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]).requires_grad_()
    student = t([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]).requires_grad_()
    loss = L.soft_target_kd(student, target, tau)
    expected = tau**2 * np_kl(target.detach().numpy(), np_softmax(student.detach().numpy() / tau)).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert target.grad is None and torch.isfinite(student.grad).all()


# ---------------------------------------------------------------------------- feature losses


def test_fitnet_loss_and_per_sample_feature_loss():
    s = t([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]]).requires_grad_()   # [2, 2, 2]
    f = t([[[1.0, 0.0], [3.0, 0.0]], [[1.0, 1.0], [1.0, 3.0]]]).requires_grad_()
    # sample 0: (0 + 4 + 0 + 16) / 4 = 5;  sample 1: (1 + 1 + 1 + 9) / 4 = 3
    assert L.feature_loss_per_sample(s, f).tolist() == [5.0, 3.0]
    loss = L.fitnet_loss(s, f)
    assert loss.item() == 4.0
    loss.backward()
    assert f.grad is None and s.grad is not None
    with pytest.raises(ValueError, match="adapt"):
        L.fitnet_loss(s, f[:, :1])


def test_masked_feature_loss():
    source = t([[[1.0, 0.0], [3.0, 0.0]], [[1.0, 1.0], [1.0, 3.0]], [[0.0] * 2] * 2]).requires_grad_()
    target = t([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]], [[5.0] * 2] * 2]).requires_grad_()
    loss = L.masked_feature_loss(source, target, torch.tensor([True, True, False]))
    assert loss.item() == pytest.approx((5.0 + 3.0) / 3)  # divided by the full batch
    loss.backward()
    assert source.grad is None
    assert target.grad[2].abs().sum() == 0 and target.grad[:2].abs().sum() > 0
    empty = L.masked_feature_loss(source, target.detach().requires_grad_(), torch.zeros(3, dtype=torch.bool))
    assert empty.item() == 0.0


# ---------------------------------------------------------------------------- AT and FSP


def test_attention_map_hand_computed():
    # one sample, 2 channels, 1x2 positions: channel means of f^2 are [(1+9)/2, (4+16)/2] = [5, 10],
    # normalised by sqrt(125)
    f = t([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    expected = np.array([5.0, 10.0]) / math.sqrt(125.0)
    assert L.attention_map(f).numpy()[0] == pytest.approx(expected, rel=1e-12)
    # p = 1 uses the signed channel mean: [(1+3)/2, (2+4)/2] = [2, 3] / sqrt(13)
    assert L.attention_map(f, p=1).numpy()[0] == pytest.approx(np.array([2.0, 3.0]) / math.sqrt(13.0), rel=1e-12)


def test_at_loss_hand_computed_pools_and_sums_pairs():
    s = t([[[[1.0, 2.0]], [[3.0, 4.0]]]]).requires_grad_()       # map [5, 10] / sqrt(125)
    te = t([[[[1.0, 0.0]]]]).requires_grad_()                      # map [1, 0]
    a = np.array([5.0, 10.0]) / math.sqrt(125.0)
    one = ((a - np.array([1.0, 0.0])) ** 2).mean()
    loss = L.at_loss([s, s], [te, te])
    assert loss.item() == pytest.approx(2 * one, rel=1e-12)       # summed over pairs, mean over positions
    loss.backward()
    assert te.grad is None and s.grad is not None
    # a 2x2 student map against a 1x1 teacher map: both maps are one position, normalised to 1 -> 0
    big = torch.randn(2, 3, 2, 2, dtype=torch.float64).abs()
    assert L.at_loss([big], [torch.randn(2, 5, 1, 1, dtype=torch.float64)]).item() == pytest.approx(0.0, abs=1e-12)
    # pooling goes to the smaller map: student 4x4 -> 2x2 block means, compared with the teacher's 2x2
    rng = np.random.default_rng(0)
    fs, ft = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 6, 2, 2))
    pooled = np_pool(fs, 2)
    ms = (pooled ** 2).mean(1).reshape(2, -1)
    mt = (ft ** 2).mean(1).reshape(2, -1)
    ms, mt = ms / np.linalg.norm(ms, axis=1, keepdims=True), mt / np.linalg.norm(mt, axis=1, keepdims=True)
    assert L.at_loss([t(fs)], [t(ft)]).item() == pytest.approx(((ms - mt) ** 2).mean(), rel=1e-10)
    with pytest.raises(ValueError, match="equally many"):
        L.at_loss([s], [])


def test_fsp_matrix_and_loss_hand_computed():
    bottom = t([[[[1.0, 2.0]]]])                                    # [1, 1, 1, 2]
    top = t([[[[3.0, 4.0]], [[5.0, 6.0]]]])                         # [1, 2, 1, 2]
    # G[0, j] = mean over the two positions of bottom * top_j: (3 + 8) / 2, (5 + 12) / 2
    assert L.fsp_matrix(bottom, top).tolist() == [[[5.5, 8.5]]]
    sb, st = bottom.clone().requires_grad_(), top.clone().requires_grad_()
    tb, tt = torch.zeros_like(bottom).requires_grad_(), top.clone().requires_grad_()
    loss = L.fsp_loss([(sb, st)], [(tb, tt)])
    assert loss.item() == pytest.approx((5.5 ** 2 + 8.5 ** 2) / 2)  # teacher matrix is zero
    loss.backward()
    assert tb.grad is None and tt.grad is None and sb.grad is not None and st.grad is not None
    # the larger map is pooled to the smaller one: 2x2 bottom -> its mean (2.5) against a 1x1 top (2)
    b2, t1 = t([[[[1.0, 2.0], [3.0, 4.0]]]]), t([[[[2.0]]]])
    assert L.fsp_matrix(b2, t1).item() == pytest.approx(5.0)
    assert L.fsp_loss([(b2, t1), (b2, t1)], [(t1, t1), (t1, t1)]).item() == pytest.approx(2 * (5.0 - 4.0) ** 2)
    with pytest.raises(ValueError, match="adapt"):
        L.fsp_loss([(bottom, top)], [(bottom, bottom)])


# ---------------------------------------------------------------------------- ReviewKD HCL


def np_pool(x: np.ndarray, level: int) -> np.ndarray:
    """Adaptive average pooling for H, W divisible by level: block means."""
    b, c, h, w = x.shape
    return x.reshape(b, c, level, h // level, level, w // level).mean(axis=(3, 5))


def np_hcl_pair(fs: np.ndarray, ft: np.ndarray, levels=(4, 2, 1)) -> float:
    loss, weight, weight_sum = ((fs - ft) ** 2).mean(), 1.0, 1.0
    for level in levels:
        if level >= fs.shape[2]:
            continue
        weight /= 2
        loss += weight * ((np_pool(fs, level) - np_pool(ft, level)) ** 2).mean()
        weight_sum += weight
    return loss / weight_sum


def test_hcl_hand_computed_2x2():
    # full MSE = (1 + 0 + 0 + 1) / 4 = 0.5; levels 4 and 2 are skipped (>= H = 2); the 1x1 level:
    # pooled teacher = 0.5, pooled student = 0 -> 0.25 with weight 1/2; total (0.5 + 0.125) / 1.5
    fs = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    ft = t([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert L.hcl_loss([fs], [ft]).item() == pytest.approx(0.625 / 1.5, rel=1e-12)


def test_hcl_pyramid_matches_numpy_and_sums_over_pairs():
    rng = np.random.default_rng(0)
    pairs = [(rng.normal(size=(2, 3, 8, 8)), rng.normal(size=(2, 3, 8, 8))),   # levels 4, 2, 1 used
             (rng.normal(size=(2, 5, 4, 4)), rng.normal(size=(2, 5, 4, 4)))]   # level 4 skipped
    expected = sum(np_hcl_pair(a, b) for a, b in pairs)
    # the 8x8 pair's weights: 1 + 1/2 + 1/4 + 1/8
    fs = [t(a).requires_grad_() for a, _ in pairs]
    ft = [t(b).requires_grad_() for _, b in pairs]
    loss = L.hcl_loss(fs, ft)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert all(f.grad is None for f in ft) and all(f.grad is not None for f in fs)
    # custom levels
    assert L.hcl_loss(fs[:1], ft[:1], levels=(2,)).item() == pytest.approx(
        np_hcl_pair(*pairs[0], levels=(2,)), rel=1e-10)


def test_hcl_equal_features_is_zero_and_bad_input_rejected():
    f, g = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
    assert L.hcl_loss([f, g], [f.clone(), g.clone()]).item() == 0.0
    with pytest.raises(ValueError, match="equally many"):
        L.hcl_loss([f, f], [f])
    with pytest.raises(ValueError, match="same shape"):
        L.hcl_loss([f], [f[:, :2]])


# ---------------------------------------------------------------------------- no host syncs

# aten ops that make the host wait for the device (on a GPU) to learn a value or a size.
_SYNC_OPS = {"aten::nonzero", "aten::_local_scalar_dense", "aten::masked_select", "aten::is_nonzero"}


class _SyncSpy(TorchDispatchMode):
    """Records every op (forward and backward) that would sync, including boolean-mask indexing."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        bool_index = name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if name in _SYNC_OPS or bool_index:
            self.hits.append(name)
        return func(*args, **(kwargs or {}))


def test_per_step_losses_need_no_host_sync():
    """The masked losses and DKD run every step (ECKD: per level and direction), so none of them may
    make the host wait for the GPU; the spy sees the same aten ops on CPU."""
    teacher, student = t(LOGITS_A), t(LOGITS_B).requires_grad_()
    labels, mask = torch.tensor(LABELS), torch.tensor([True, False, True])
    feats = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    with _SyncSpy() as spy:
        loss = (L.ec_loss(teacher, student, mask, 4.0) + L.dkd_loss(student, teacher, labels)
                + L.masked_feature_loss(feats.detach() + 1, feats, mask)
                + sum(L.mask_fractions(L.error_masks(teacher, student, labels)).values()))
        loss.backward()
    assert spy.hits == []
