"""Unlabeled data: a pool of inputs drawn at random, and pseudo-label mining."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from ._utils import compute_features, first_input

__all__ = ["UnlabeledPool", "mine_unlabeled"]

logger = logging.getLogger(__name__)


class UnlabeledPool:
    """Random draws of inputs from an unlabeled map-style dataset.

    Items may be input tensors or tuples/lists whose first element is the
    input (labels are ignored), as in torchvision and Avalanche datasets.

    :param dataset: the unlabeled dataset.
    """

    def __init__(self, dataset: Dataset):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                "unlabeled_data must be a map-style dataset (with __getitem__ and "
                f"__len__), got {type(dataset).__name__}"
            )
        if len(dataset) == 0:
            raise ValueError("unlabeled_data is empty: it must hold at least one input")
        # Items of another kind (e.g. file names) would fail only at the first
        # generator fitting, after a whole experience of training.
        first_input(dataset[0], name="unlabeled_data")
        self.dataset = dataset
        self.active: Tensor | None = None  # indices kept by mining, or all

    def __len__(self) -> int:
        return len(self.dataset) if self.active is None else len(self.active)

    def example(self) -> Tensor:
        """The first input, to check that a model takes it."""
        return first_input(self.dataset[0], name="unlabeled_data")

    def _input(self, index: int) -> Tensor:
        return first_input(self.dataset[index])

    def sample(self, n: int, device: torch.device | str) -> Tensor:
        """``n`` inputs drawn uniformly with replacement, stacked on ``device``."""
        picks = torch.randint(len(self), (n,))
        if self.active is not None:
            picks = self.active[picks]
        tensors = getattr(self.dataset, "tensors", None)
        if tensors is not None:  # TensorDataset: one indexing call
            batch = tensors[0][picks]
        else:
            batch = torch.stack([self._input(int(i)) for i in picks])
        return batch.to(device, non_blocking=True)

    def restrict(self, indices: Tensor | None) -> None:
        """Draw only from ``indices`` of the dataset (``None``: from all)."""
        self.active = None if indices is None else indices.clone().long()


@torch.no_grad()
def mine_unlabeled(
    model: nn.Module,
    pool: UnlabeledPool,
    *,
    per_class: int = 100,
    max_entropy: float | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> Tensor:
    """Indices of the unlabeled inputs that the model labels most confidently.

    The model predicts every unlabeled input; for each predicted class, the
    ``per_class`` inputs of lowest prediction entropy are kept (and only
    those under ``max_entropy`` when given), as in the authors' code.
    """
    feats = compute_features(
        model, _InputsOnly(pool.dataset), batch_size=batch_size, device=device
    )
    logits = model.classifier(feats)
    probs = torch.softmax(logits, dim=1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)  # (N,)
    predicted = logits.argmax(dim=1)
    kept = []
    for c in predicted.unique():
        rows = torch.nonzero(predicted == c).flatten()
        ent = entropy[rows]
        if max_entropy is not None:
            rows, ent = rows[ent < max_entropy], ent[ent < max_entropy]
        kept.append(rows[ent.argsort()[:per_class]])
    indices = torch.cat(kept).sort().values.cpu() if kept else torch.empty(0)
    if indices.numel() == 0:
        logger.warning("unlabeled mining kept no input; drawing from all of them")
        return torch.arange(len(pool.dataset))
    logger.info("unlabeled mining kept %d of %d inputs", len(indices), len(feats))
    return indices


class _InputsOnly(Dataset):
    """A view of a dataset that yields the input tensor of each item."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tensor:
        return first_input(self.dataset[index])


def subset_inputs(dataset: Dataset, indices) -> Dataset:
    """Inputs-only view of ``dataset`` restricted to ``indices``."""
    return _InputsOnly(Subset(dataset, list(indices)))
