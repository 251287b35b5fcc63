"""Distillation losses as pure functions on tensors (no models inside).

Formulas follow ``docs/methods.md``; every function is unit-tested on hand-made inputs.

Conventions shared by all functions here:

* logits are ``[B, C]``, labels ``[B]`` (int64), masks ``[B]`` bool, features ``[B, ...]``;
* the side that *teaches* (teacher, peer, source) is detached inside the function, so callers can
  pass live tensors of a network that is trained by another term without leaking gradient;
* "batch mean" divides by the full batch size ``B`` even when a mask selects fewer samples, so a
  masked loss shrinks with the number of samples it corrects instead of being re-normalised.

Every check here raises ``ValueError`` / ``TypeError`` and names the function, never a config key:
a user's hyper-parameters (temperature, weights, weighting names) are checked once, when the config
loads (each method's ``check_options``); what reaches these functions wrong is a caller bug.

:mod:`._logits` holds the losses on logits, :mod:`._features` those on feature maps.
"""
from __future__ import annotations

from ._features import (at_loss, attention_map, feature_loss_per_sample, fitnet_loss, fsp_loss, fsp_matrix,
                        hcl_loss, masked_feature_loss)
from ._logits import (MULTI_TEACHER_WEIGHTINGS, ErrorMasks, correctness, dkd_loss, dkd_terms, dkd_warmup, dml_loss,
                      ec_loss, error_masks, kd_loss, kl_div_tempered, mask_fractions, multi_teacher_targets,
                      multi_teacher_weights, soft_target_kd)

__all__ = [
    "ErrorMasks", "MULTI_TEACHER_WEIGHTINGS", "at_loss", "attention_map", "correctness", "dkd_loss", "dkd_terms",
    "dkd_warmup", "dml_loss", "ec_loss", "error_masks", "feature_loss_per_sample", "fitnet_loss", "fsp_loss",
    "fsp_matrix", "hcl_loss", "kd_loss", "kl_div_tempered", "mask_fractions", "masked_feature_loss",
    "multi_teacher_targets", "multi_teacher_weights", "soft_target_kd",
]
