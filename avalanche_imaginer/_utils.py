"""Small helpers shared by the modules of the package."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradient inside; modes and flags restored after."""
    modes = [[(m, m.training) for m in module.modules()] for module in modules]
    flags = [[(p, p.requires_grad) for p in module.parameters()] for module in modules]
    try:
        for module in modules:
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)
        yield
    finally:
        for group in modes:
            for m, mode in group:
                m.training = mode
        for group in flags:
            for p, flag in group:
                p.requires_grad_(flag)


def first_input(item, *, name: str = "dataset") -> Tensor:
    """The input tensor of a dataset item: the item itself or its first element.

    :param name: what the item comes from, for the error message.
    """
    x = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{name} items must be a tensor or a tuple/list whose first element "
            f"is a tensor, got an item whose input is {type(x).__name__}"
        )
    return x


def iterate_inputs(
    dataset: Dataset, batch_size: int, device: torch.device | str
) -> Iterator[Tensor]:
    """Input batches of ``dataset`` in order, on ``device``."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=getattr(dataset, "collate_fn", None),
    )
    for batch in loader:
        yield first_input(batch).to(device, non_blocking=True)


@torch.no_grad()
def compute_features(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device | str,
    maps: bool = False,
    flip: bool = False,
) -> Tensor:
    """Features ``(N, D)`` (or lower-part maps with ``maps=True``) of a dataset.

    The model is used in eval mode; its mode is restored afterwards. With
    ``flip``, features are averaged with those of horizontally flipped inputs.
    """
    with frozen(model):
        outs = []
        for x in iterate_inputs(dataset, batch_size, device):
            fn = model.feature_map if maps else model.features
            out = fn(x)
            if flip and x.dim() == 4:
                out = (out + fn(torch.flip(x, dims=(3,)))) / 2
            outs.append(out)
    if not outs:
        raise ValueError("cannot compute features of an empty dataset")
    return torch.cat(outs)
