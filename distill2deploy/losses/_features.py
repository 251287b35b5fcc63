"""Feature losses: FitNet hints, attention transfer, FSP matrices, ReviewKD's HCL and ECKD-F's masked MSE.

Pure functions on tensors; the conventions are those of :mod:`distill2deploy.losses`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._logits import _check_mask, _masked_batch_sum


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
