"""Diagnostics of fitted generators: do imagined counterparts still look like
their class, at the scale of real maps, in the current feature space?

Whether generators help hinges on three faults that these numbers expose:
generated maps off the scale of real ones, generated maps that the network no
longer classifies as their class, and a lower part that drifted away from the
feature space the generator was fitted in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._utils import frozen
from .generator import FeatureGenerator
from .models import SplitModel

__all__ = ["GeneratorDiagnostics", "generator_diagnostics", "map_drift"]


@dataclass
class GeneratorDiagnostics:
    """Statistics of one class's imagined counterparts at one point of a run.

    ``real_*`` are measured on real maps of the class: its training samples
    when the generator is fitted, its exemplars afterwards (the only real
    samples left).
    """

    experience: int  # index of the experience just trained
    class_id: int
    fitted_in: int  # experience whose data the generator was fitted on
    generated_mean: float  # mean of the generated maps' values
    generated_std: float  # standard deviation of the generated maps' values
    real_mean: float
    real_std: float
    std_ratio: float  # generated_std / real_std; 1 is the scale of real maps
    classified: float  # share of counterparts the network labels as the class
    cosine_to_class_mean: float  # pooled generated features vs real class mean
    drift: float  # 1 - cos of exemplars' pooled maps, now vs at fitting

    def as_dict(self) -> dict:
        return asdict(self)


def map_drift(now: Tensor, reference: Tensor) -> float:
    """Mean of ``1 - cos`` between rows of ``(N, C)`` pooled maps (0: no drift)."""
    n = min(len(now), len(reference))
    if n == 0:
        return 0.0
    cos = F.cosine_similarity(now[:n], reference[:n].to(now.device), dim=1)  # (n,)
    return float((1.0 - cos).mean().clamp_min(0.0))  # no rounding below 0


@torch.no_grad()
def generator_diagnostics(
    model: SplitModel,
    generator: FeatureGenerator,
    class_id: int,
    *,
    content: Tensor,
    style: Tensor,
    real: Tensor,
    experience: int,
    fitted_in: int,
    reference: Tensor | None = None,
) -> GeneratorDiagnostics:
    """Diagnostics of ``generator`` on ``(content, style)`` pairs of maps.

    :param content: ``(N, C, H, W)`` exemplar maps, in the current feature space.
    :param style: ``(N, C, H, W)`` unlabeled maps.
    :param real: ``(M, C, H, W)`` real maps of the class.
    :param reference: ``(N', C)`` pooled exemplar maps at fitting time, aligned
        with the first rows of ``content``, for the drift; ``None`` reports no
        drift.
    """
    with frozen(model, generator):
        generated = generator(content, style)  # (N, C, H, W)
        feats = model.features_of_map(generated)  # (N, D)
        real_feats = model.features_of_map(real)  # (M, D)
        predicted = model.classifier(feats).argmax(dim=1)  # (N,)
    real_std = float(real.std())
    generated_std = float(generated.std())
    cosine = F.cosine_similarity(feats.mean(dim=0), real_feats.mean(dim=0), dim=0)
    drift = 0.0
    if reference is not None:
        drift = map_drift(content.mean(dim=(2, 3)), reference)  # (N, C) pooled
    return GeneratorDiagnostics(
        experience=experience,
        class_id=int(class_id),
        fitted_in=fitted_in,
        generated_mean=float(generated.mean()),
        generated_std=generated_std,
        real_mean=float(real.mean()),
        real_std=real_std,
        std_ratio=generated_std / real_std if real_std > 0 else float("inf"),
        classified=float((predicted == class_id).float().mean()),
        cosine_to_class_mean=float(cosine),
        drift=drift,
    )
