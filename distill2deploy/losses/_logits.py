"""Losses on logits: Hinton KD, DKD, DML, multi-teacher targets and the ECKD masks and EC term.

Pure functions on tensors; the conventions are those of :mod:`distill2deploy.losses`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

MULTI_TEACHER_WEIGHTINGS = ("mean", "confidence", "entropy")


# --------------------------------------------------------------------------------------------
# input checks (cheap: shapes and Python numbers only, never a device sync)


def _check_temperature(temperature: float, where: str) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{where}: temperature must be a finite number > 0, got {temperature!r}")


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
        raise ValueError(f"dkd_warmup: the warm-up length must be >= 0 epochs, got {warmup_epochs!r}")
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
        raise ValueError(f"multi_teacher_weights: unknown weighting {weighting!r} (expected one of "
                         f"{', '.join(MULTI_TEACHER_WEIGHTINGS)})")
    logits = torch.stack([t.detach() for t in teacher_logits_list], dim=1).float()  # [B, K, C]
    if weights is None:
        prior = torch.full((k,), 1.0 / k, device=logits.device)
    else:
        if len(weights) != k or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"multi_teacher_weights: weights {list(weights)!r} are not {k} non-negative numbers "
                             "with a positive sum")
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
