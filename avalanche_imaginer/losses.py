"""Loss terms shared by LUCIR and the Imagine strategy.

Pure functions of tensors: no state, no plugin logic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SEMANTIC_MODES",
    "less_forget_loss",
    "less_forget_weight",
    "margin_ranking_loss",
    "semantic_vectors",
    "gram_matrix",
    "semantic_consistency",
    "style_consistency",
    "generator_loss",
]

SEMANTIC_MODES = ("gap", "pooled")


def less_forget_loss(features: Tensor, old_features: Tensor) -> Tensor:
    """Mean of ``1 - cos(f_old(x), f(x))`` over the batch.

    Reference: Hou et al., "Learning a Unified Classifier Incrementally via
    Rebalancing", CVPR 2019 (less-forget constraint).

    :param features: ``(B, D)`` features of the current model.
    :param old_features: ``(B, D)`` features of the frozen old model.
    """
    if features.shape != old_features.shape:
        raise ValueError(
            f"features {tuple(features.shape)} and old_features "
            f"{tuple(old_features.shape)} must have the same shape"
        )
    if features.shape[0] == 0:
        return features.new_zeros(())
    cos = F.cosine_similarity(features, old_features.detach(), dim=1)  # (B,)
    return (1.0 - cos).mean()


def less_forget_weight(lambda_base: float, n_old: int, n_new: int) -> float:
    """Adaptive weight ``lambda_base * sqrt(n_old / n_new)`` (0 with no old class)."""
    if n_old <= 0 or n_new <= 0:
        return 0.0
    return lambda_base * math.sqrt(n_old / n_new)


def margin_ranking_loss(
    cosines: Tensor,
    targets: Tensor,
    old_classes: Tensor,
    new_classes: Tensor,
    *,
    margin: float = 0.5,
    top_k: int = 2,
) -> Tensor:
    """LUCIR's inter-class separation on the old-class samples of a batch.

    For every sample of an old class, its ground-truth cosine must exceed each
    of its ``top_k`` highest new-class cosines by ``margin``:
    ``mean(relu(margin - cos_gt + cos_hard))``.

    :param cosines: ``(B, n_classes)`` unscaled cosine similarities.
    :param targets: ``(B,)`` class ids.
    :param old_classes: ids of the classes of earlier experiences.
    :param new_classes: ids of the classes of the current experience.
    """
    is_old = torch.isin(targets, old_classes.to(targets.device))
    if not is_old.any() or new_classes.numel() == 0:
        return cosines.new_zeros(())
    cos_old = cosines[is_old]  # (E, n_classes)
    gt = cos_old.gather(1, targets[is_old].unsqueeze(1))  # (E, 1)
    new_cos = cos_old[:, new_classes.to(cosines.device)]  # (E, n_new)
    k = min(top_k, new_cos.shape[1])
    hard = new_cos.topk(k, dim=1).values  # (E, k)
    return F.relu(margin - gt + hard).mean()


def semantic_vectors(maps: Tensor, mode: str = "gap") -> list[Tensor]:
    """Semantic descriptors of feature maps ``(B, C, H, W)``.

    ``"gap"`` (paper): global average pooling, ``[(B, C)]``; it keeps the
    maps' scale. ``"pooled"`` (authors' code): the L2-normalised spatial
    pooling of PODNet (sums of squares over H and over W, ``(B, C*(W+H))``)
    and the L2-normalised channel pooling ``(B, H*W)``; blind to scale.
    """
    if maps.dim() != 4:
        raise ValueError(f"maps must be (B, C, H, W), got shape {tuple(maps.shape)}")
    if mode == "gap":
        return [maps.mean(dim=(2, 3))]
    if mode == "pooled":
        sq = maps.pow(2)
        over_h = sq.sum(dim=2).flatten(1)  # (B, C*W)
        over_w = sq.sum(dim=3).flatten(1)  # (B, C*H)
        spatial = F.normalize(torch.cat([over_h, over_w], dim=1), dim=1)
        channel = F.normalize(maps.sum(dim=1).flatten(1), dim=1)  # (B, H*W)
        return [spatial, channel]
    raise ValueError(f"semantic mode must be one of {SEMANTIC_MODES}, got {mode!r}")


def gram_matrix(maps: Tensor, normalized: bool = False) -> Tensor:
    """Gram matrix ``(B, C, C)`` of the channels of ``(B, C, H, W)`` maps.

    ``normalized=False`` (paper): inner products of raw channels, divided by
    ``H*W`` so that values do not grow with the map size; it keeps the maps'
    scale. ``normalized=True`` (authors' code): each channel is L2-normalised
    first, so entries are channel cosine similarities.
    """
    if maps.dim() != 4:
        raise ValueError(f"maps must be (B, C, H, W), got shape {tuple(maps.shape)}")
    b, c, h, w = maps.shape
    rows = maps.reshape(b, c, h * w)  # (B, C, HW)
    if normalized:
        rows = F.normalize(rows, dim=2)
        return rows @ rows.transpose(1, 2)
    return rows @ rows.transpose(1, 2) / (h * w)


def semantic_consistency(a: Tensor, b: Tensor, mode: str = "gap") -> Tensor:
    """SC: ``||v(a) - v(b)||_2`` averaged over the batch, summed over descriptors."""
    terms = [
        (va - vb).norm(dim=1).mean()
        for va, vb in zip(semantic_vectors(a, mode), semantic_vectors(b, mode))
    ]
    return torch.stack(terms).sum()


def style_consistency(a: Tensor, b: Tensor, normalized: bool = False) -> Tensor:
    """SDC: ``||W(a) - W(b)||_F`` averaged over the batch."""
    diff = gram_matrix(a, normalized) - gram_matrix(b, normalized)  # (B, C, C)
    return diff.flatten(1).norm(dim=1).mean()


def generator_loss(
    *,
    logits: Tensor,
    target: int,
    mix: Tensor,
    real: Tensor,
    unlabeled: Tensor,
    exemplar: Tensor,
    cycle: Tensor | None,
    other_mix: Tensor | None,
    lam: float = 2.0,
    lam_cyc: float = 0.3,
    semantic: str = "gap",
    gram_normalized: bool = False,
    use_sc: bool = True,
    use_sdc: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """Total loss ``L_G`` of one class's generator and its parts.

    ``L_G = CE + SC + lam*SDC + lam_cyc*(SC_cyc + lam*SDC_cyc)``; a part that is
    switched off (or whose ``cycle`` is ``None``) is left out.

    Reference: Tang, Peng, Zheng, "Learning to Imagine: Diversify Memory for
    Incremental Learning using Unlabeled Data", CVPR 2022, Eq. 3-7.

    :param logits: ``(B, n_classes)`` logits of the mixes.
    :param target: the generator's class.
    :param mix: ``(B, C, H, W)`` generated maps ``G([exemplar; unlabeled])``.
    :param real: other real maps of the class (semantic anchor).
    :param unlabeled: the unlabeled maps (style anchor).
    :param exemplar: the exemplar maps (content, and the cycle's style).
    :param cycle: ``G([mix; exemplar])`` or ``None`` for no cycle terms.
    :param other_mix: other mixes of the class, the cycle's semantic anchor.
    """
    labels = torch.full((logits.shape[0],), target, device=logits.device)
    parts = {"ce": F.cross_entropy(logits, labels)}
    if use_sc:
        parts["sc"] = semantic_consistency(real, mix, semantic)
    if use_sdc:
        parts["sdc"] = lam * style_consistency(unlabeled, mix, gram_normalized)
    if cycle is not None:
        cyc = cycle.new_zeros(())
        if use_sc and other_mix is not None:
            cyc = cyc + semantic_consistency(other_mix, cycle, semantic)
        if use_sdc:
            cyc = cyc + lam * style_consistency(exemplar, cycle, gram_normalized)
        parts["cycle"] = lam_cyc * cyc
    total = torch.stack(list(parts.values())).sum()
    return total, {k: float(v.detach()) for k, v in parts.items()}
