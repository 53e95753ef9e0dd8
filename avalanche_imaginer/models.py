"""Backbones split into a lower and an upper part, and the cosine classifier.

The generators of the method work on the feature map produced by the lower part
of the backbone, so every model used by the strategies of this package is a
:class:`SplitModel`: ``logits = classifier(upper(lower(x)))``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from avalanche.benchmarks.scenarios import CLExperience
from avalanche.models import DynamicModule
from torch import Tensor, nn

__all__ = [
    "CosineClassifier",
    "SplitModel",
    "resnet32",
    "resnet18",
    "split_torchvision_resnet",
]


class CosineClassifier(DynamicModule):
    """Cosine-normalised classifier that grows with each experience's classes.

    Logits are ``scale * cos(w_c, f)``. The learnable ``scale`` (sigma in the
    paper) bounds every logit in ``[-scale, scale]``. Rows are added through
    Avalanche's model adaptation, so the strategy's optimizer picks up the new
    weight tensor by name, as it does for Avalanche's ``IncrementalClassifier``.
    Units of classes not seen yet are masked with ``mask_value``.

    Reference: Hou et al., "Learning a Unified Classifier Incrementally via
    Rebalancing", CVPR 2019.

    :param in_features: size of the feature vector.
    :param scale: initial value of the learnable scale.
    :param learn_scale: whether the scale is a learnable parameter.
    :param freeze_old: whether the rows of classes seen in earlier experiences
        receive no gradient (LUCIR trains only the new classes' weights).
    :param mask_value: logit given to classes not seen yet.
    """

    def __init__(
        self,
        in_features: int,
        *,
        scale: float = 10.0,
        learn_scale: bool = True,
        freeze_old: bool = True,
        mask_value: float = -1000.0,
    ):
        super().__init__()
        if not isinstance(in_features, int) or in_features <= 0:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        self.in_features = in_features
        self.freeze_old = freeze_old
        self.mask_value = mask_value
        self.weight = nn.Parameter(torch.empty(0, in_features))
        scale_tensor = torch.tensor(float(scale))
        if learn_scale:
            self.scale = nn.Parameter(scale_tensor)
        else:
            self.register_buffer("scale", scale_tensor)
        # 1 for classes seen in training, 0 otherwise.
        self.register_buffer("active_units", torch.zeros(0, dtype=torch.bool))
        # Rows below this index belong to classes of earlier experiences.
        self.register_buffer("frozen_mask", torch.zeros(0, dtype=torch.bool))

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def seen_classes(self) -> list[int]:
        """Ids of the classes met in training so far."""
        return torch.nonzero(self.active_units).flatten().tolist()

    @torch.no_grad()
    def adaptation(self, experience: CLExperience):
        """Add a row for every class of ``experience`` not met before."""
        super().adaptation(experience)
        classes = _experience_classes(experience)
        if self.training:
            # Classes learned before this training experience keep their weights.
            self.frozen_mask = self.active_units.clone()
        needed = max(classes) + 1 if classes else 0
        if needed > self.out_features:
            self._grow(needed)
        if self.training:
            self.active_units[list(classes)] = True

    def _grow(self, n_rows: int) -> None:
        device = self.weight.device
        old = self.weight.data
        new = torch.empty(n_rows - old.shape[0], self.in_features, device=device)
        nn.init.normal_(new, std=1.0 / math.sqrt(self.in_features))
        # A new Parameter under the same name: Avalanche's update_optimizer
        # swaps it into the optimizer's parameter group.
        self.weight = nn.Parameter(torch.cat([old, new]))
        pad = n_rows - self.active_units.shape[0]
        self.active_units = F.pad(self.active_units, (0, pad))
        self.frozen_mask = F.pad(self.frozen_mask, (0, pad))

    @torch.no_grad()
    def imprint(self, class_ids: list[int], features: Tensor) -> None:
        """Set the weights of ``class_ids`` to their normalised mean features.

        :param class_ids: one class id per row of ``features``.
        :param features: ``(N, in_features)`` mean feature per class.
        """
        norm = self.weight[self.frozen_mask].norm(dim=1).mean()
        if not torch.isfinite(norm) or self.frozen_mask.sum() == 0:
            norm = torch.tensor(1.0, device=self.weight.device)
        rows = F.normalize(features.to(self.weight.device), dim=1) * norm
        self.weight.data[list(class_ids)] = rows

    def cosine(self, features: Tensor) -> Tensor:
        """Cosine similarity of ``features`` with every class weight, unmasked."""
        weight = self.weight
        if self.freeze_old and self.frozen_mask.any():
            keep = self.frozen_mask.unsqueeze(1)
            weight = torch.where(keep, weight.detach(), weight)
        return F.linear(F.normalize(features, dim=1), F.normalize(weight, dim=1))

    def forward(self, features: Tensor) -> Tensor:
        logits = self.scale * self.cosine(features)
        return logits.masked_fill(~self.active_units, self.mask_value)


def _experience_classes(experience: CLExperience) -> list[int]:
    classes = getattr(experience, "classes_in_this_experience", None)
    if classes is None:
        raise ValueError(
            "the experience carries no class information "
            "(classes_in_this_experience); use a class-incremental stream such "
            "as those of avalanche.benchmarks.nc_benchmark"
        )
    return sorted(int(c) for c in classes)


class SplitModel(nn.Module):
    """A network split into ``lower`` and ``upper`` parts, with a classifier.

    ``forward(x) = classifier(upper(lower(x)))``. ``lower`` returns the feature
    map ``(B, C, H, W)`` on which generators work; ``upper`` turns a map into a
    feature vector ``(B, D)``.

    :param lower: module from inputs to feature maps.
    :param upper: module from feature maps to feature vectors.
    :param classifier: module from feature vectors to logits. ``None`` makes a
        :class:`CosineClassifier` over the inferred feature size.
    :param feature_size: size ``D`` of the feature vector; inferred from the
        last layer of ``upper`` that declares its width when not given.
    """

    def __init__(
        self,
        lower: nn.Module,
        upper: nn.Module,
        classifier: nn.Module | None = None,
        *,
        feature_size: int | None = None,
    ):
        super().__init__()
        for name, value in (("lower", lower), ("upper", upper)):
            if not isinstance(value, nn.Module):
                raise TypeError(
                    f"{name} must be a torch.nn.Module, got {type(value).__name__}"
                )
        if classifier is not None and not isinstance(classifier, nn.Module):
            raise TypeError(
                "classifier must be a torch.nn.Module or None, got "
                f"{type(classifier).__name__}"
            )
        self.lower = lower
        self.upper = upper
        self.feature_size = (
            feature_size if feature_size is not None else _infer_width(upper)
        )
        self.classifier = (
            classifier
            if classifier is not None
            else CosineClassifier(self.feature_size)
        )

    def feature_map(self, x: Tensor) -> Tensor:
        """Map ``(B, C, H, W)`` given by the lower part."""
        return self.lower(x)

    def features_of_map(self, maps: Tensor) -> Tensor:
        """Feature vectors ``(B, D)`` of feature maps."""
        return self.upper(maps)

    def features(self, x: Tensor) -> Tensor:
        """Feature vectors ``(B, D)`` of inputs."""
        return self.upper(self.lower(x))

    def logits_of_map(self, maps: Tensor) -> Tensor:
        """Logits of feature maps (the path of generated features)."""
        return self.classifier(self.upper(maps))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.upper(self.lower(x)))


def _infer_width(upper: nn.Module) -> int:
    width = None
    for module in upper.modules():
        for attr in ("out_features", "num_features", "out_channels"):
            value = getattr(module, attr, None)
            if isinstance(value, int):
                width = value
                break
    if width is None:
        raise ValueError(
            "could not infer the feature size from `upper` (it has no layer with "
            "out_features, num_features or out_channels); pass feature_size="
        )
    return width


# --------------------------------------------------------------------- ResNet-32


class _BasicBlock(nn.Module):
    """CIFAR basic block; ``last_relu=False`` returns the map before its ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, last_relu=True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.last_relu = last_relu
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(out) if self.last_relu else out


class _ReLUThen(nn.Module):
    """Applies a ReLU then ``module``; the upper part starts from a pre-ReLU map."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(F.relu(x))


def resnet32(
    *,
    in_channels: int = 3,
    width: int = 16,
    blocks_per_stage: int = 5,
    classifier: nn.Module | None = None,
) -> SplitModel:
    """Reduced CIFAR ResNet (iCaRL/PODNet), split before the last block.

    ``lower`` is the stem, stage 1, stage 2 and all blocks of stage 3 but the
    last, returning the map before the final ReLU (``4*width x H/4 x W/4``,
    64 x 8 x 8 on CIFAR); ``upper`` is the last block and global average
    pooling. ``blocks_per_stage=5`` is ResNet-32, ``3`` is ResNet-20.
    """
    if blocks_per_stage < 2:
        raise ValueError(f"blocks_per_stage must be >= 2, got {blocks_per_stage}")
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
    ]
    in_planes = width
    for stage, planes in enumerate((width, 2 * width, 4 * width)):
        n_blocks = blocks_per_stage - 1 if stage == 2 else blocks_per_stage
        for i in range(n_blocks):
            stride = 2 if stage > 0 and i == 0 else 1
            last = stage == 2 and i == n_blocks - 1
            layers.append(_BasicBlock(in_planes, planes, stride, last_relu=not last))
            in_planes = planes
    lower = nn.Sequential(*layers)
    upper = nn.Sequential(
        _ReLUThen(_BasicBlock(in_planes, in_planes, 1)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    _init_weights(lower)
    _init_weights(upper)
    return SplitModel(lower, upper, classifier, feature_size=in_planes)


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------ torchvision ResNets


def split_torchvision_resnet(
    resnet: nn.Module, *, classifier: nn.Module | None = None
) -> SplitModel:
    """Split any torchvision ResNet after ``layer3``.

    ``lower`` = stem + ``layer1..layer3``; ``upper`` = ``layer4`` + pooling. The
    ResNet's own ``fc`` is dropped.
    """
    needed = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
    missing = [n for n in (*needed, "layer4", "avgpool") if not hasattr(resnet, n)]
    if missing:
        raise TypeError(
            "resnet must be a torchvision ResNet (missing attributes "
            f"{missing}), got {type(resnet).__name__}"
        )
    lower = nn.Sequential(*(getattr(resnet, n) for n in needed))
    upper = nn.Sequential(resnet.layer4, resnet.avgpool, nn.Flatten())
    return SplitModel(lower, upper, classifier)


def resnet18(
    *,
    weights=None,
    small_inputs: bool = False,
    classifier: nn.Module | None = None,
) -> SplitModel:
    """torchvision's ResNet-18 split after ``layer3`` (256 x 14 x 14 on 224 px).

    :param weights: torchvision weights enum or ``None`` (random init). Weights
        are loaded through torchvision, which may download them.
    :param small_inputs: replace the stem with a 3x3 stride-1 convolution and no
        max-pooling, for 32 x 32 inputs.
    """
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(weights=weights)
    if small_inputs:
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    return split_torchvision_resnet(net, classifier=classifier)
