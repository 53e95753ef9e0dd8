"""Feature generators: one per class, mixing an exemplar map with an unlabeled one."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CompactGeneratorBank",
    "ConditionalGenerator",
    "FeatureGenerator",
    "GeneratorBank",
    "StackedGenerators",
    "in_memory_format_of",
    "parameter_bytes",
]


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int, groups: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1, groups=groups, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, 1, 1, groups=groups, bias=False),
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

    def _tensors(self) -> dict[str, Tensor]:
        return _tensors_of(self)


def in_memory_format_of(module: nn.Module, maps: Tensor) -> nn.Module:
    """``module`` with its convolutions in the memory format of ``maps``.

    A model converted with ``model.to(memory_format=torch.channels_last)``
    gives channels-last maps; generators made for them follow, so that their
    convolutions need no layout conversion (a fitting step 12 % faster on
    our CPU, ``benchmarks.profile_step``).
    """
    if maps.dim() == 4 and not maps.is_contiguous():
        if maps.is_contiguous(memory_format=torch.channels_last):
            return module.to(memory_format=torch.channels_last)
    return module


def parameter_bytes(module: nn.Module) -> int:
    """Bytes held by the parameters and buffers of ``module``."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


class _Bank(nn.Module, Mapping):
    """What both banks share: a frozen mapping ``class id -> generator``."""

    # Mapping would compare by content and make the module unhashable; modules
    # are compared and hashed by identity.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def train(self, mode: bool = True):
        # Fitted generators stay in eval mode: their BatchNorm statistics are
        # part of what was fitted.
        return super().train(False)

    def nbytes(self) -> int:
        """Bytes held by all generators."""
        return parameter_bytes(self)


class GeneratorBank(_Bank):
    """The fitted generators of a strategy: a mapping ``class id -> generator``.

    Kept apart from the strategy's model, so that the deployed network holds
    no generator. Generators in the bank are frozen (no gradient).
    """

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


# ------------------------------------------------------- stacked generators


class StackedGenerators(nn.Module):
    """``K`` generators of one design run as one network of grouped convolutions.

    Group ``k`` of every convolution and BatchNorm holds generator ``k``, so
    one forward computes what ``K`` separate calls would, in a few large
    kernels instead of ``K`` small ones. Used to fit an experience's new
    classes together; :meth:`unstack` gives back the ``K`` generators.

    :param generators: ``K`` :class:`FeatureGenerator` of the same design
        (their current weights are copied).
    """

    def __init__(self, generators: list[FeatureGenerator]):
        super().__init__()
        if not generators:
            raise ValueError("StackedGenerators needs at least one generator")
        first = generators[0]
        k, c = len(generators), first.channels
        hidden = first.exit.in_channels
        self.k, self.channels = k, c
        self.entry: nn.Module = (
            nn.Identity()
            if isinstance(first.entry, nn.Identity)
            else nn.Conv2d(k * 2 * c, k * hidden, 1, groups=k, bias=False)
        )
        self.blocks = nn.Sequential(
            *(_ResidualBlock(k * hidden, groups=k) for _ in range(len(first.blocks)))
        )
        self.exit = nn.Conv2d(k * hidden, k * c, 1, groups=k)
        self.to(first.exit.weight.device)
        with torch.no_grad():
            for name, tensor in self._tensors().items():
                parts = [g._tensors()[name] for g in generators]
                # a BatchNorm's step counter is one number for all groups
                tensor.copy_(parts[0] if tensor.dim() == 0 else torch.cat(parts))

    def _tensors(self) -> dict[str, Tensor]:
        return _tensors_of(self)

    def forward(self, content: Tensor, style: Tensor) -> Tensor:
        """``(K, B, C, H, W)`` maps of each generator's own content and style."""
        k, b, c, h, w = content.shape
        x = torch.cat([content, style], dim=2)  # (K, B, 2C, H, W)
        x = x.transpose(0, 1).reshape(b, k * 2 * c, h, w)  # group k: its 2C channels
        out = self.exit(self.blocks(self.entry(x)))  # (B, K*C, H, W)
        return out.reshape(b, k, c, h, w).transpose(0, 1)  # (K, B, C, H, W)

    def unstack(self) -> list[FeatureGenerator]:
        """The ``K`` generators, in eval mode, with their own copy of the weights."""
        hidden = self.exit.in_channels // self.k
        out = []
        for i in range(self.k):
            g = FeatureGenerator(
                self.channels, hidden=hidden, n_blocks=len(self.blocks)
            ).to(self.exit.weight.device)
            with torch.no_grad():
                for name, tensor in g._tensors().items():
                    stacked = self._tensors()[name]
                    if stacked.dim() == 0:  # a BatchNorm's step counter
                        tensor.copy_(stacked)
                    else:
                        tensor.copy_(stacked.chunk(self.k)[i])
            out.append(g.eval())
        return out


def _tensors_of(module: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers by name (the order stacking relies on)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


# ------------------------------------------------------------- compact design


class _ModulatedBlock(nn.Module):
    """Residual block whose two BatchNorm outputs are scaled and shifted per sample."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor, code: Tensor) -> Tensor:
        # code: (B, 4, hidden) = scale and shift after bn1, then after bn2
        g1, b1, g2, b2 = (code[:, i, :, None, None] for i in range(4))  # (B, h, 1, 1)
        out = F.relu(self.bn1(self.conv1(x)) * g1 + b1)
        out = self.bn2(self.conv2(out)) * g2 + b2
        return F.relu(x + out)


class ConditionalGenerator(nn.Module):
    """One generator for all classes: a shared trunk and a small code per class.

    The trunk has the design of :class:`FeatureGenerator`; each class owns a
    code that scales and shifts the output of every BatchNorm of the residual
    blocks (FiLM; Perez et al., AAAI 2018), ``4 * hidden`` numbers per block.
    The trunk is fitted with the first experience's classes and then frozen;
    each later class only adds and fits its code, so a class costs
    ``4 * hidden * n_blocks`` numbers instead of a whole generator.

    :param channels: channels ``C`` of the feature maps.
    :param hidden: channels of the residual blocks.
    :param n_blocks: number of residual blocks.
    """

    def __init__(self, channels: int, *, hidden: int = 128, n_blocks: int = 2):
        super().__init__()
        self.channels, self.hidden, self.n_blocks = channels, hidden, n_blocks
        self.entry: nn.Module = (
            nn.Identity()
            if 2 * channels == hidden
            else nn.Conv2d(2 * channels, hidden, 1, bias=False)
        )
        self.blocks = nn.ModuleList(_ModulatedBlock(hidden) for _ in range(n_blocks))
        self.exit = nn.Conv2d(hidden, channels, 1)
        self.codes = nn.ParameterDict()

    @property
    def device(self) -> torch.device:
        return self.exit.weight.device

    @property
    def classes(self) -> list[int]:
        return sorted(int(k) for k in self.codes.keys())

    def add_class(self, class_id: int) -> None:
        """A code that leaves the trunk unchanged (scale 1, shift 0)."""
        code = torch.zeros(self.n_blocks, 4, self.hidden, device=self.device)
        code[:, 0::2] = 1.0  # the scales
        self.codes[str(int(class_id))] = nn.Parameter(code)

    def remove_class(self, class_id: int) -> None:
        del self.codes[str(int(class_id))]

    def code(self, class_id: int) -> nn.Parameter:
        return self.codes[str(int(class_id))]

    def trunk_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters shared by all classes (not the codes)."""
        for name, p in self.named_parameters():
            if not name.startswith("codes."):
                yield p

    def freeze(self) -> None:
        """No gradient anywhere, eval mode: the state that replay uses."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, content: Tensor, style: Tensor, labels) -> Tensor:
        """Generated maps of ``content`` maps of classes ``labels``.

        :param labels: one class id for the whole batch, or ``(B,)`` ids.
        """
        if content.shape != style.shape or content.dim() != 4:
            raise ValueError(
                "content and style must be feature maps (B, C, H, W) of the same "
                f"shape, got {tuple(content.shape)} and {tuple(style.shape)}"
            )
        if isinstance(labels, int):
            codes = self.code(labels).unsqueeze(0).expand(len(content), -1, -1, -1)
        else:
            present, rows = labels.unique(return_inverse=True)
            table = torch.stack([self.code(c) for c in present.tolist()])
            codes = table[rows]  # (B, n_blocks, 4, hidden)
        x = self.entry(torch.cat([content, style], dim=1))  # (B, hidden, H, W)
        for i, block in enumerate(self.blocks):
            x = block(x, codes[:, i])
        return self.exit(x)


class _ClassView(nn.Module):
    """``bank[c]`` of a compact bank: the shared generator bound to class ``c``."""

    def __init__(self, shared: ConditionalGenerator, class_id: int):
        super().__init__()
        object.__setattr__(self, "shared", shared)  # not a submodule: no copy
        self.class_id = class_id

    def forward(self, content: Tensor, style: Tensor) -> Tensor:
        return self.shared(content, style, self.class_id)


class CompactGeneratorBank(_Bank):
    """The generators of the compact design: ``class id -> generator`` as well.

    One :class:`ConditionalGenerator` serves every class; ``bank[c]`` is that
    generator bound to ``c``, and :meth:`generate` makes all the counterparts
    of a batch in one call.
    """

    def __init__(self):
        super().__init__()
        self.shared: ConditionalGenerator | None = None

    def __getitem__(self, class_id: int) -> nn.Module:
        if class_id not in self:
            raise KeyError(class_id)
        return _ClassView(self.shared, int(class_id))

    def __iter__(self) -> Iterator[int]:
        return iter(self.shared.classes if self.shared is not None else [])

    def __len__(self) -> int:
        return len(self.shared.codes) if self.shared is not None else 0

    def __contains__(self, class_id: object) -> bool:
        try:
            return self.shared is not None and str(int(class_id)) in self.shared.codes
        except (TypeError, ValueError):
            return False

    def set_shared(self, generator: ConditionalGenerator) -> None:
        """Store the fitted shared generator, frozen."""
        generator.freeze()
        self.shared = generator

    @torch.no_grad()
    def generate(self, content: Tensor, style: Tensor, labels: Tensor) -> Tensor:
        """All counterparts in one call, whatever the classes of ``labels``."""
        missing = sorted(set(labels.tolist()) - set(self))
        if missing:
            raise KeyError(f"no generator for classes {missing}")
        return self.shared(content, style, labels)
