"""Feature generators: one per class, mixing an exemplar map with an unlabeled one."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeatureGenerator", "GeneratorBank", "parameter_bytes"]


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.body(x))


class FeatureGenerator(nn.Module):
    """Generator ``G_c``: ``[h_exemplar ; h_unlabeled] -> h_mix``.

    Residual blocks on the channel concatenation of two maps of ``channels``
    channels, preceded by a 1x1 convolution ``2C -> hidden`` when ``2C !=
    hidden`` and followed by a 1x1 convolution ``hidden -> C``. The output has
    the shape of the input maps.

    Reference: Tang, Peng, Zheng, "Learning to Imagine: Diversify Memory for
    Incremental Learning using Unlabeled Data", CVPR 2022 (Sec. 3.2; the paper
    uses ``n_blocks=2``, ``hidden=128``).

    :param channels: channels ``C`` of the feature maps.
    :param hidden: channels of the residual blocks.
    :param n_blocks: number of residual blocks.
    """

    def __init__(self, channels: int, *, hidden: int = 128, n_blocks: int = 2):
        super().__init__()
        for name, value in (
            ("channels", channels),
            ("hidden", hidden),
            ("n_blocks", n_blocks),
        ):
            if not isinstance(value, int) or value < (0 if name == "n_blocks" else 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.channels = channels
        self.entry: nn.Module = (
            nn.Identity()
            if 2 * channels == hidden
            else nn.Conv2d(2 * channels, hidden, 1, bias=False)
        )
        self.blocks = nn.Sequential(*(_ResidualBlock(hidden) for _ in range(n_blocks)))
        self.exit = nn.Conv2d(hidden, channels, 1)

    def forward(self, content: Tensor, style: Tensor) -> Tensor:
        if content.shape != style.shape or content.dim() != 4:
            raise ValueError(
                "content and style must be feature maps (B, C, H, W) of the same "
                f"shape, got {tuple(content.shape)} and {tuple(style.shape)}"
            )
        if content.shape[1] != self.channels:
            raise ValueError(
                f"the generator expects maps with {self.channels} channels, got "
                f"{content.shape[1]}"
            )
        x = torch.cat([content, style], dim=1)  # (B, 2C, H, W)
        return self.exit(self.blocks(self.entry(x)))


def parameter_bytes(module: nn.Module) -> int:
    """Bytes held by the parameters and buffers of ``module``."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


class GeneratorBank(nn.Module, Mapping):
    """The fitted generators of a strategy: a mapping ``class id -> generator``.

    Kept apart from the strategy's model, so that the deployed network holds
    no generator. Generators in the bank are frozen (no gradient).
    """

    # Mapping would compare by content and make the module unhashable; modules
    # are compared and hashed by identity.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __init__(self):
        super().__init__()
        self._generators = nn.ModuleDict()

    def __getitem__(self, class_id: int) -> FeatureGenerator:
        return self._generators[str(int(class_id))]

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(int(k) for k in self._generators.keys()))

    def __len__(self) -> int:
        return len(self._generators)

    def __contains__(self, class_id: object) -> bool:
        try:
            return str(int(class_id)) in self._generators  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False

    def add(self, class_id: int, generator: FeatureGenerator) -> None:
        """Store the fitted ``generator`` of ``class_id``, frozen, in eval mode."""
        generator.eval()
        for p in generator.parameters():
            p.requires_grad_(False)
        self._generators[str(int(class_id))] = generator

    def train(self, mode: bool = True):
        # Fitted generators stay in eval mode: their BatchNorm statistics are
        # part of what was fitted.
        return super().train(False)

    def nbytes(self) -> int:
        """Bytes held by all generators."""
        return parameter_bytes(self)

    @torch.no_grad()
    def generate(self, content: Tensor, style: Tensor, labels: Tensor) -> Tensor:
        """Generated maps for ``content`` maps of classes ``labels``.

        One call per class present in ``labels``, not per sample.

        :param content: ``(N, C, H, W)`` exemplar maps.
        :param style: ``(N, C, H, W)`` unlabeled maps.
        :param labels: ``(N,)`` class ids; each must have a generator.
        """
        out = torch.empty_like(content)
        for class_id in labels.unique().tolist():
            rows = labels == class_id
            out[rows] = self[class_id](content[rows], style[rows])
        return out
