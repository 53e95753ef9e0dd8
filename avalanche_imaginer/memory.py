"""Class-balanced exemplar memory with herding selection and an NME classifier."""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from avalanche.benchmarks.utils import AvalancheDataset
from torch import Tensor, nn

from ._utils import compute_features, first_input

__all__ = ["ExemplarMemory", "herding_order"]

logger = logging.getLogger(__name__)


def herding_order(features: Tensor, n: int) -> list[int]:
    """Indices of ``n`` samples chosen by herding, in order of selection.

    Each step picks the sample that brings the mean of the chosen normalised
    features closest to the mean of all of them. Deterministic.

    Reference: Rebuffi et al., "iCaRL: Incremental Classifier and
    Representation Learning", CVPR 2017.

    :param features: ``(N, D)`` features of the samples of one class.
    :param n: number of samples to choose (at most ``N``).
    """
    feats = F.normalize(features.float(), dim=1)  # (N, D)
    target = feats.mean(dim=0)  # (D,)
    n = min(n, feats.shape[0])
    chosen: list[int] = []
    running = torch.zeros_like(target)
    available = torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device)
    for k in range(1, n + 1):
        # distance of the mean after adding each candidate
        candidate_means = (running.unsqueeze(0) + feats) / k  # (N, D)
        dist = (candidate_means - target).norm(dim=1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        available[i] = False
        running += feats[i]
    return chosen


class ExemplarMemory:
    """Exemplars of every class seen so far, balanced across classes.

    With ``per_class=None`` the memory holds at most ``memory_size`` exemplars
    in all, ``memory_size // seen_classes`` per class, re-balanced after each
    experience by dropping the last-chosen exemplars of old classes. With
    ``per_class=m`` it keeps ``m`` per class whatever the number of classes.

    Exemplars are subsets of the experiences' Avalanche datasets, so they keep
    their transforms: :meth:`dataset` gives them with training transforms.

    :param memory_size: total budget of exemplars.
    :param per_class: fixed number of exemplars per class instead of a budget.
    :param herding: choose exemplars by herding; ``False`` takes random ones.
    :param flip_means: average class means with horizontally flipped images.
    """

    def __init__(
        self,
        memory_size: int = 2000,
        *,
        per_class: int | None = None,
        herding: bool = True,
        flip_means: bool = False,
    ):
        if not isinstance(memory_size, int) or memory_size < 0:
            raise ValueError(f"memory_size must be an int >= 0, got {memory_size!r}")
        if per_class is not None and (not isinstance(per_class, int) or per_class < 0):
            raise ValueError(
                f"per_class must be None or an int >= 0, got {per_class!r}"
            )
        self.memory_size = memory_size
        self.per_class = per_class
        self.herding = herding
        self.flip_means = flip_means
        # class id -> exemplars in order of selection
        self._exemplars: dict[int, AvalancheDataset] = {}
        self.class_means: dict[int, Tensor] = {}
        self._sample_bytes = 0

    # ------------------------------------------------------------------ content

    @property
    def classes(self) -> list[int]:
        return sorted(self._exemplars)

    def __len__(self) -> int:
        return sum(len(d) for d in self._exemplars.values())

    def quota(self, n_classes: int) -> int:
        """Exemplars per class when ``n_classes`` classes are stored."""
        if self.per_class is not None:
            return self.per_class
        return self.memory_size // max(n_classes, 1)

    def exemplars_of(self, class_id: int) -> AvalancheDataset:
        """Exemplars of one class, in order of selection."""
        return self._exemplars[class_id]

    def dataset(self, train: bool = True) -> AvalancheDataset | None:
        """All exemplars as one dataset (training transforms unless ``train=False``)."""
        parts = [self._exemplars[c] for c in self.classes if len(self._exemplars[c])]
        if not parts:
            return None
        data = parts[0]
        for part in parts[1:]:
            data = data.concat(part)
        return data.train() if train else data.eval()

    def nbytes(self) -> int:
        """Bytes of the stored input tensors (as loaded, e.g. float32 images)."""
        return len(self) * self._sample_bytes

    # ------------------------------------------------------------------ update

    def update(
        self,
        model: nn.Module,
        dataset: AvalancheDataset,
        new_classes: list[int],
        *,
        device: torch.device | str,
        batch_size: int = 256,
    ) -> None:
        """Add exemplars of ``new_classes`` from ``dataset``, then re-balance.

        :param model: a :class:`~avalanche_imaginer.models.SplitModel`; its
            features drive herding.
        :param dataset: the experience's dataset, holding the new classes.
        :param new_classes: classes of the experience.
        """
        n_classes = len(set(self._exemplars) | set(new_classes))
        quota = self.quota(n_classes)
        if quota == 0 and new_classes:
            warnings.warn(
                f"memory_size={self.memory_size} is too small to keep one exemplar "
                f"for each of {n_classes} classes: new classes get no exemplar",
                stacklevel=2,
            )
        by_class = dataset.targets.val_to_idx
        for c in new_classes:
            idx = list(by_class.get(c, []))
            if not idx:
                raise ValueError(f"class {c} has no sample in the experience's dataset")
            subset = dataset.subset(idx)
            if self.herding and quota > 0:
                feats = compute_features(
                    model, subset.eval(), batch_size=batch_size, device=device
                )
                order = herding_order(feats, quota)
            else:
                gen = torch.Generator().manual_seed(int(c))
                order = torch.randperm(len(idx), generator=gen)[:quota].tolist()
            self._exemplars[c] = subset.subset(order)
            if not self._sample_bytes:
                x = first_input(subset.eval()[0])
                self._sample_bytes = x.numel() * x.element_size()
        for c in list(self._exemplars):
            kept = self._exemplars[c]
            if len(kept) > quota:
                self._exemplars[c] = kept.subset(range(quota))
        logger.info(
            "memory: %d exemplars of %d classes (%d per class)",
            len(self),
            len(self._exemplars),
            quota,
        )

    # --------------------------------------------------------------------- NME

    def compute_class_means(
        self, model: nn.Module, *, device: torch.device | str, batch_size: int = 256
    ) -> None:
        """Normalised mean feature of each class's exemplars, for NME."""
        self.class_means = {}
        for c in self.classes:
            data = self._exemplars[c]
            if len(data) == 0:
                continue
            feats = compute_features(
                model,
                data.eval(),
                batch_size=batch_size,
                device=device,
                flip=self.flip_means,
            )
            mean = F.normalize(feats, dim=1).mean(dim=0)
            self.class_means[c] = F.normalize(mean, dim=0)

    def nme_scores(
        self, features: Tensor, n_outputs: int, mask_value: float = -1000.0
    ) -> Tensor:
        """Cosine of ``features`` to each class mean; ``mask_value`` for the others.

        The nearest mean in Euclidean distance of normalised vectors is the one
        of highest cosine, so ``argmax`` of these scores is the NME prediction.
        """
        if not self.class_means:
            raise RuntimeError(
                "NME evaluation needs class means: train on an experience first"
            )
        scores = features.new_full((features.shape[0], n_outputs), mask_value)
        classes = [c for c in self.class_means if c < n_outputs]
        means = torch.stack([self.class_means[c] for c in classes]).to(features)
        scores[:, classes] = F.normalize(features, dim=1) @ means.T  # (B, n_means)
        return scores
