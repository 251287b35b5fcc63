"""Distillation losses as pure functions on tensors (no models inside).

Formulas follow ``docs/methods.md``; every function is unit-tested on hand-made inputs.

Conventions shared by all functions here:

* logits are ``[B, C]``, labels ``[B]`` (int64), masks ``[B]`` bool, features ``[B, ...]``;
* the side that *teaches* (teacher, peer, source) is detached inside the function, so callers can
  pass live tensors of a network that is trained by another term without leaking gradient;
* "batch mean" divides by the full batch size ``B`` even when a mask selects fewer samples, so a
  masked loss shrinks with the number of samples it corrects instead of being re-normalised.

Hyper-parameters that come from a user's config (temperature, weights, weighting names) raise
:class:`~distill2deploy.errors.UserError`; wrong shapes or dtypes are caller bugs and raise
``ValueError`` / ``TypeError``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .errors import UserError, suggest

__all__ = [
    "ErrorMasks", "MULTI_TEACHER_WEIGHTINGS", "at_loss", "attention_map", "correctness", "dkd_loss", "dkd_terms",
    "dkd_warmup", "dml_loss", "ec_loss", "error_masks", "feature_loss_per_sample", "fitnet_loss", "fsp_loss",
    "fsp_matrix", "hcl_loss",
    "kd_loss", "kl_div_tempered", "mask_fractions", "masked_feature_loss", "multi_teacher_targets",
    "multi_teacher_weights", "soft_target_kd",
]

MULTI_TEACHER_WEIGHTINGS = ("mean", "confidence", "entropy")


# --------------------------------------------------------------------------------------------
# input checks (cheap: shapes and Python numbers only, never a device sync)


def _check_temperature(temperature: float, where: str) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise UserError(f"temperature must be a positive number, got {temperature!r}", where=where,
                        fix="set the method's temperature to a value > 0 (4 is the usual CIFAR-100 choice)")


def _check_logits_pair(a: torch.Tensor, b: torch.Tensor, where: str) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{where}: expected two [B, C] logit tensors of the same shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


def _check_labels(logits: torch.Tensor, labels: torch.Tensor, where: str) -> None:
    if labels.shape != logits.shape[:1] or labels.dtype not in (torch.int64, torch.int32, torch.uint8,
                                                                  torch.int16, torch.int8):
        raise ValueError(f"{where}: expected integer labels of shape [{logits.shape[0]}], got "
                         f"{labels.dtype} {tuple(labels.shape)}")


def _check_mask(mask: torch.Tensor, batch: int, where: str) -> None:
    if mask.dtype != torch.bool or mask.shape != (batch,):
        # a float "mask" of 0.3 must not silently become True: masks are per-sample yes/no
        raise TypeError(f"{where}: expected a bool mask of shape [{batch}], got {mask.dtype} "
                        f"{tuple(mask.shape)}")


def _row_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q) from log-probabilities, shape ``[B]``."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1)


def _masked_batch_sum(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_i m_i * x_i without a host sync; unselected rows contribute exactly 0, gradient included."""
    return torch.where(mask, per_sample, 0.0).sum()


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_sample
    if reduction == "batchmean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    raise ValueError(f"unknown reduction {reduction!r} (expected 'batchmean', 'sum' or 'none')")


# --------------------------------------------------------------------------------------------
# 1. Hinton KD


def kl_div_tempered(source_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float,
                    reduction: str = "batchmean") -> torch.Tensor:
    """tau^2 * KL(p_source^tau || p_target^tau), gradient only into ``target_logits``' graph.

    ``source`` is the side that teaches (its probabilities are the reference), ``target`` is the
    side that learns. With ``reduction='none'`` the per-sample KL (shape ``[B]``) is returned.
    The tau^2 factor keeps the gradient magnitude independent of tau (Hinton et al., 2015).
    """
    _check_temperature(temperature, "kl_div_tempered")
    _check_logits_pair(source_logits, target_logits, "kl_div_tempered")
    log_p_src = F.log_softmax(source_logits.detach() / temperature, dim=1)
    log_p_tgt = F.log_softmax(target_logits / temperature, dim=1)
    return _reduce(_row_kl(log_p_src, log_p_tgt) * temperature**2, reduction)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton KD: tau^2 * KL(p_t^tau || p_s^tau), batch mean, teacher detached."""
    return kl_div_tempered(teacher_logits, student_logits, temperature)


# --------------------------------------------------------------------------------------------
# 6. ECKD masks and error-correction loss


def correctness(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Bool ``[B]``: whether each sample's arg-max prediction equals its label."""
    if logits.dim() != 2:
        raise ValueError(f"correctness: expected [B, C] logits, got {tuple(logits.shape)}")
    _check_labels(logits, labels, "correctness")
    return logits.detach().argmax(dim=1) == labels


class ErrorMasks(NamedTuple):
    """Per-sample agreement of teacher and student with the label (teacher/student right/wrong).

    The four masks partition the batch: every sample is in exactly one of them.
    """

    trsr: torch.Tensor
    trsw: torch.Tensor
    twsr: torch.Tensor
    twsw: torch.Tensor

    @property
    def student_correction(self) -> torch.Tensor:
        """Samples the teacher can correct in the student (teacher right, student wrong)."""
        return self.trsw

    @property
    def teacher_correction(self) -> torch.Tensor:
        """Samples the student can correct in the teacher (teacher wrong, student right)."""
        return self.twsr


def error_masks(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                labels: torch.Tensor) -> ErrorMasks:
    """The ECKD masks of one level: which side is right on which sample."""
    _check_logits_pair(teacher_logits, student_logits, "error_masks")
    c_t = correctness(teacher_logits, labels)
    c_s = correctness(student_logits, labels)
    return ErrorMasks(trsr=c_t & c_s, trsw=c_t & ~c_s, twsr=~c_t & c_s, twsw=~c_t & ~c_s)


def mask_fractions(masks: ErrorMasks) -> dict[str, torch.Tensor]:
    """Fraction of the batch in each mask, as 0-d tensors (no host sync, so it is cheap to log)."""
    return {name: m.float().mean() for name, m in masks._asdict().items()}


def ec_loss(source_logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """EC(a -> b; m) = tau^2 * sum_i m_i * KL(p_a^tau[i] || p_b^tau[i]) / B, source detached.

    The spec multiplies *both* sides' softened probabilities by the mask row. With the usual
    convention 0 * log(0 / 0) = 0 this is the same as masking the per-sample KL:

        KL(m_i p || m_i q) = sum_c m_i p_c log(m_i p_c / (m_i q_c))
                           = m_i * sum_c p_c log(p_c / q_c)      if m_i = 1   (m_i cancels in the log)
                           = 0 = m_i * KL(p || q)                if m_i = 0   (every term is 0 log 0/0)

    so sum_i KL(m_i p[i] || m_i q[i]) = sum_i m_i KL(p[i] || q[i]) (``tests/test_losses.py`` checks
    it). The masked rows are *chosen* with ``torch.where`` instead of multiplied by 0: with an empty
    mask the loss is exactly 0 and the gradient exactly 0, even if an unselected row had an
    infinite KL (0 * inf would be NaN). Boolean indexing would do the same but needs the number of
    selected rows on the host, a device sync per call (ECKD-R makes 2 calls per level per step).
    The divisor stays the full batch size B.
    """
    _check_temperature(temperature, "ec_loss")
    _check_logits_pair(source_logits, target_logits, "ec_loss")
    _check_mask(mask, source_logits.shape[0], "ec_loss")
    per_sample = kl_div_tempered(source_logits, target_logits, temperature, reduction="none")
    return _masked_batch_sum(per_sample, mask) / source_logits.shape[0]


# --------------------------------------------------------------------------------------------
# 2. DKD


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float = 4.0, reduction: str = "batchmean") -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) of decoupled KD, each already times tau^2; teacher detached.

    TCKD = KL(b_t || b_s) on the binary target/non-target split b = [p_t, 1 - p_t]; NCKD =
    KL(p̂_t || p̂_s) on the softmax over the C - 1 non-target classes. Both are computed in log
    space from the logits (log(1 - p_t) as a logsumexp over the non-target logits), and the
    non-target softmax drops the target column instead of the reference's ``- 1000 * gt_mask``
    trick, so there is no log(0) and no dependence on the logit scale.
    """
    _check_temperature(temperature, "dkd_terms")
    _check_logits_pair(student_logits, teacher_logits, "dkd_terms")
    _check_labels(student_logits, labels, "dkd_terms")
    batch, classes = student_logits.shape
    if classes < 2:
        raise ValueError(f"dkd_terms: DKD needs at least 2 classes, got {classes}")
    # Column indices by arithmetic, not a boolean mask: F.one_hot checks the label range and
    # boolean indexing counts the selected entries, and both wait for the device to do so.
    target_idx = labels.long().unsqueeze(1)                                       # [B, 1]
    others = torch.arange(classes - 1, device=labels.device).expand(batch, -1)    # [B, C-1]
    non_target_idx = others + (others >= target_idx).long()                      # skips the target column

    def split(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = logits / temperature
        non_target = z.gather(1, non_target_idx)
        log_all = torch.logsumexp(z, dim=1, keepdim=True)
        log_binary = torch.cat([z.gather(1, target_idx),
                                torch.logsumexp(non_target, dim=1, keepdim=True)], dim=1) - log_all
        return log_binary, F.log_softmax(non_target, dim=1)

    bin_t, hat_t = split(teacher_logits.detach())
    bin_s, hat_s = split(student_logits)
    scale = temperature**2
    return (_reduce(_row_kl(bin_t, bin_s) * scale, reduction),
            _reduce(_row_kl(hat_t, hat_s) * scale, reduction))


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD (batch mean); multiply by :func:`dkd_warmup` in the method."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, temperature)
    return alpha * tckd + beta * nckd


def dkd_warmup(progress_epochs: float, warmup_epochs: float) -> float:
    """Linear warm-up factor min(progress / warmup, 1); DKD's strong NCKD term destabilises the
    first epochs of a randomly initialised student otherwise. ``warmup_epochs = 0`` disables it."""
    if warmup_epochs < 0:
        raise UserError(f"warm-up length must be >= 0 epochs, got {warmup_epochs!r}", where="dkd",
                        fix="set warmup_epochs to 0 (off) or a positive number of epochs (20 in the paper)")
    if warmup_epochs == 0:
        return 1.0
    return float(min(max(progress_epochs / warmup_epochs, 0.0), 1.0))


# --------------------------------------------------------------------------------------------
# 3. DML


def dml_loss(self_logits: torch.Tensor, peer_logits_list: Sequence[torch.Tensor],
             temperature: float = 1.0) -> torch.Tensor:
    """Mean over peers of tau^2 * KL(p_peer^tau || p_self^tau), peers detached (tau = 1 in DML)."""
    if len(peer_logits_list) == 0:
        raise ValueError("dml_loss: needs at least one peer")
    terms = [kl_div_tempered(peer, self_logits, temperature) for peer in peer_logits_list]
    return torch.stack(terms).mean()


# --------------------------------------------------------------------------------------------
# 5. Multi-teacher KD


def multi_teacher_weights(teacher_logits_list: Sequence[torch.Tensor], weighting: str = "mean",
                          weights: Sequence[float] | None = None) -> torch.Tensor:
    """Per-sample teacher weights ``[B, K]`` that sum to 1 over the K teachers.

    * ``mean``: the fixed ``weights`` (uniform when None), normalised to sum 1;
    * ``confidence``: proportional to each teacher's max probability;
    * ``entropy``: softmax over teachers of the negative prediction entropy (sharper = heavier).

    Confidence and entropy are measured on the teachers' plain (tau = 1) probabilities: they describe
    how sure a teacher is, which the distillation temperature should not change. Fixed ``weights``
    given with a per-sample weighting act as a prior: they multiply the per-sample weights before
    the per-sample renormalisation.
    """
    k = len(teacher_logits_list)
    if k == 0:
        raise ValueError("multi_teacher_weights: needs at least one teacher")
    first = teacher_logits_list[0]
    for t in teacher_logits_list[1:]:
        _check_logits_pair(first, t, "multi_teacher_weights")
    if first.dim() != 2:
        raise ValueError(f"multi_teacher_weights: expected [B, C] logits, got {tuple(first.shape)}")
    if weighting not in MULTI_TEACHER_WEIGHTINGS:
        raise UserError(f"unknown multi-teacher weighting {weighting!r}", where="multi_teacher.weighting",
                        fix=suggest(weighting, MULTI_TEACHER_WEIGHTINGS)
                        or f"use one of {', '.join(MULTI_TEACHER_WEIGHTINGS)}")
    logits = torch.stack([t.detach() for t in teacher_logits_list], dim=1).float()  # [B, K, C]
    if weights is None:
        prior = torch.full((k,), 1.0 / k, device=logits.device)
    else:
        if len(weights) != k or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise UserError(f"teacher weights {list(weights)!r} do not fit {k} teachers",
                            where="multi_teacher.weights",
                            fix=f"give {k} non-negative numbers with a positive sum, or leave weights unset")
        prior = torch.tensor([float(w) for w in weights], device=logits.device)
        prior = prior / prior.sum()
    if weighting == "mean":
        return prior.expand(logits.shape[0], k).clone()
    log_p = F.log_softmax(logits, dim=2)
    if weighting == "confidence":
        score = log_p.exp().amax(dim=2)                         # [B, K], in (0, 1]
        w = score * prior
        return w / w.sum(dim=1, keepdim=True)
    neg_entropy = (log_p.exp() * log_p).sum(dim=2)               # -H, [B, K]
    # softmax(-H + log prior) == prior * softmax(-H) renormalised; zero prior -> -inf -> weight 0
    return F.softmax(neg_entropy + prior.log(), dim=1)


def multi_teacher_targets(teacher_logits_list: Sequence[torch.Tensor], temperature: float = 4.0,
                          weighting: str = "mean", weights: Sequence[float] | None = None) -> torch.Tensor:
    """Soft targets ``[B, C]``: the per-sample weighted average of the teachers' p^tau (detached)."""
    _check_temperature(temperature, "multi_teacher_targets")
    w = multi_teacher_weights(teacher_logits_list, weighting, weights)            # [B, K]
    probs = torch.stack([F.softmax(t.detach().float() / temperature, dim=1)
                         for t in teacher_logits_list], dim=1)                     # [B, K, C]
    return (w.unsqueeze(2) * probs).sum(dim=1)


def soft_target_kd(student_logits: torch.Tensor, target_probs: torch.Tensor,
                   temperature: float = 4.0) -> torch.Tensor:
    """tau^2 * KL(target || p_s^tau), batch mean, target detached; zero target entries are fine."""
    _check_temperature(temperature, "soft_target_kd")
    _check_logits_pair(student_logits, target_probs, "soft_target_kd")
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_p_s, target_probs.detach().to(log_p_s.dtype), reduction="batchmean") * temperature**2


# --------------------------------------------------------------------------------------------
# 4. Feature losses (FitNet, AT, FSP, ReviewKD) and ECKD-F


def _check_feature_pair(a: torch.Tensor, b: torch.Tensor, where: str) -> None:
    if a.shape != b.shape or a.dim() < 2:
        raise ValueError(f"{where}: expected two [B, ...] features of the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)} (adapt the student feature first)")


def fitnet_loss(student_feat_adapted: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """FitNet hint loss: MSE between the regressed student feature and the detached teacher's."""
    _check_feature_pair(student_feat_adapted, teacher_feat, "fitnet_loss")
    return F.mse_loss(student_feat_adapted, teacher_feat.detach())


def feature_loss_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, ``[B]`` (no detaching: the caller decides the direction)."""
    _check_feature_pair(a, b, "feature_loss_per_sample")
    return F.mse_loss(a, b, reduction="none").flatten(1).mean(dim=1)


def masked_feature_loss(source_feat: torch.Tensor, target_feat: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """ECKD-F: sum_i m_i * MSE_i(target, source) / B, source detached, gradient into target only.

    Rows are chosen with ``torch.where`` for the same reasons as in :func:`ec_loss`.
    """
    _check_feature_pair(source_feat, target_feat, "masked_feature_loss")
    _check_mask(mask, source_feat.shape[0], "masked_feature_loss")
    per_sample = feature_loss_per_sample(target_feat, source_feat.detach())
    return _masked_batch_sum(per_sample, mask) / source_feat.shape[0]


def hcl_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
             levels: Sequence[int] = (4, 2, 1)) -> torch.Tensor:
    """ReviewKD hierarchical context loss, summed over (fused student, teacher) feature pairs.

    Per pair: MSE at full resolution (weight 1) plus MSE after adaptive average pooling to each
    ``l x l`` in ``levels``, the k-th used level weighted 2^-k, all divided by the sum of the
    weights. As in the ReviewKD code, a level ``l >= H`` is skipped (pooling would not coarsen the
    map) and does not consume a weight. Teacher features are detached.
    """
    if len(student_feats) != len(teacher_feats) or len(student_feats) == 0:
        raise ValueError(f"hcl_loss: expected equally many student and teacher features (>= 1), got "
                         f"{len(student_feats)} and {len(teacher_feats)}")
    if any(int(l) != l or l < 1 for l in levels):
        raise ValueError(f"hcl_loss: pyramid levels must be positive integers, got {tuple(levels)}")
    total = None
    for i, (fs, ft) in enumerate(zip(student_feats, teacher_feats)):
        if fs.dim() != 4:
            raise ValueError(f"hcl_loss: pair {i} must be [B, C, H, W] maps, got {tuple(fs.shape)}")
        _check_feature_pair(fs, ft, f"hcl_loss pair {i}")
        ft = ft.detach()
        loss = F.mse_loss(fs, ft)
        weight, weight_sum = 1.0, 1.0
        for level in levels:
            if level >= fs.shape[2]:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
            weight_sum += weight
        total = loss / weight_sum if total is None else total + loss / weight_sum
    return total


def _pool_to_smaller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the spatially larger of two ``[B, C, H, W]`` maps to the other's size (AT/FSP code)."""
    if a.dim() != 4 or b.dim() != 4:
        raise ValueError(f"expected [B, C, H, W] maps, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    return F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size)


def attention_map(feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of Attention Transfer: ``normalize(mean_c |f|^p)`` per sample, ``[B, H*W]``.

    The channel mean of ``f.pow(p)`` (as the AT, CRD and mdistiller code write it: for even ``p`` it
    equals ``|f|^p``), flattened and L2-normalised, so maps of networks of different widths compare.
    """
    if feat.dim() != 4:
        raise ValueError(f"attention_map: expected a [B, C, H, W] map, got {tuple(feat.shape)}")
    return F.normalize(feat.pow(p).mean(1).flatten(1), dim=1)


def at_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
            p: float = 2.0) -> torch.Tensor:
    """Attention Transfer (Zagoruyko & Komodakis, ICLR 2017), summed over (student, teacher) pairs.

    Per pair: the larger map is average-pooled to the smaller's resolution, then the mean over batch
    and positions of the squared difference of the two attention maps (the CRD/mdistiller form;
    the 1000x weight of their CIFAR-100 benchmark is the caller's). Teacher maps are detached.
    """
    if len(student_feats) != len(teacher_feats) or len(student_feats) == 0:
        raise ValueError(f"at_loss: expected equally many student and teacher features (>= 1), got "
                         f"{len(student_feats)} and {len(teacher_feats)}")
    total = None
    for i, (fs, ft) in enumerate(zip(student_feats, teacher_feats)):
        if fs.shape[0] != ft.shape[0]:
            raise ValueError(f"at_loss pair {i}: batch sizes differ ({fs.shape[0]} vs {ft.shape[0]})")
        fs, ft = _pool_to_smaller(fs, ft.detach())
        loss = (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()
        total = loss if total is None else total + loss
    return total


def fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Flow of Solution Procedure (Yim et al., CVPR 2017): ``G[b, i, j] = mean_xy bottom[b,i,x,y] * top[b,j,x,y]``.

    The Gram matrix between the feature entering and the feature leaving a stretch of the network,
    ``[B, C_bottom, C_top]``; the larger map is average-pooled to the smaller's resolution first.
    """
    bottom, top = _pool_to_smaller(bottom, top)
    return torch.einsum("bihw,bjhw->bij", bottom, top) / (bottom.shape[-2] * bottom.shape[-1])


def fsp_loss(student_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
             teacher_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """FSP distillation: per (bottom, top) pair the mean squared difference of the FSP matrices, summed.

    Student and teacher matrices must have the same ``[C_bottom, C_top]`` shape (adapt the
    student's channels first when the architectures differ). Teacher matrices are detached.
    """
    if len(student_pairs) != len(teacher_pairs) or len(student_pairs) == 0:
        raise ValueError(f"fsp_loss: expected equally many student and teacher pairs (>= 1), got "
                         f"{len(student_pairs)} and {len(teacher_pairs)}")
    total = None
    for i, ((sb, st), (tb, tt)) in enumerate(zip(student_pairs, teacher_pairs)):
        gs, gt = fsp_matrix(sb, st), fsp_matrix(tb.detach(), tt.detach())
        if gs.shape != gt.shape:
            raise ValueError(f"fsp_loss pair {i}: FSP matrices {tuple(gs.shape)} and {tuple(gt.shape)} differ "
                             f"(adapt the student's channels to the teacher's first)")
        loss = (gs - gt).pow(2).mean()
        total = loss if total is None else total + loss
    return total
