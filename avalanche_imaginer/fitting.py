"""Fitting one class's feature generator on a frozen network."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._utils import frozen
from .generator import FeatureGenerator
from .losses import SEMANTIC_MODES, generator_loss
from .models import SplitModel

__all__ = ["GeneratorConfig", "ABLATIONS", "fit_generator", "NonFiniteLossError"]

#: The paper's ablations of the generator's losses (Table 4).
ABLATIONS = ("no_generator", "sc", "sc_sdc", "full")


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; nothing of the failed fitting is kept."""


@dataclass
class GeneratorConfig:
    """How generators are built and fitted.

    Defaults follow the paper and the authors' CIFAR config, except the
    learning rate and clipping: the paper's raw losses diverge at 0.1
    (../METHOD.md, "Pitfalls").
    """

    hidden: int = 128  # channels of the residual blocks
    n_blocks: int = 2  # residual blocks (the paper's best)
    epochs: int = 40  # passes over the class's real samples
    batch_size: int = 64  # (exemplar, unlabeled, real) triplets per step
    lr: float = 0.01  # SGD learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_norm: float | None = 5.0  # gradient norm clipping; None: off
    lam: float = 2.0  # weight of the style terms
    lam_cyc: float = 0.3  # weight of the cycle terms
    semantic: str = "gap"  # "gap" (paper) or "pooled" (authors' code)
    gram_normalized: bool = False  # channel-normalised Gram (authors' code)
    ablation: str = "full"  # one of ABLATIONS

    def __post_init__(self):
        for name in ("hidden", "n_blocks", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"generator {name} must be an int >= 1, got {value!r}")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(
                f"generator epochs must be an int >= 0, got {self.epochs!r}"
            )
        for name in ("lr", "momentum", "weight_decay", "lam", "lam_cyc"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"generator {name} must be >= 0, got {value!r}")
        if self.clip_norm is not None and (
            not isinstance(self.clip_norm, (int, float)) or not self.clip_norm > 0
        ):
            raise ValueError(
                f"generator clip_norm must be a number > 0 or None, got "
                f"{self.clip_norm!r}"
            )
        if self.semantic not in SEMANTIC_MODES:
            raise ValueError(
                f"semantic must be one of {SEMANTIC_MODES}, got {self.semantic!r}"
            )
        if self.ablation not in ABLATIONS:
            raise ValueError(
                f"ablation must be one of {ABLATIONS}, got {self.ablation!r}"
            )

    @property
    def milestones(self) -> list[int]:
        """Steps of the x0.1 decays: epochs 20, 30, 35 of 40, scaled."""
        return sorted({max(1, round(self.epochs * f)) for f in (0.5, 0.75, 0.875)})


def fit_generator(
    model: SplitModel,
    class_id: int,
    real_maps: Tensor,
    exemplar_maps: Tensor,
    unlabeled_maps: Tensor,
    config: GeneratorConfig,
    *,
    experience: int | None = None,
) -> tuple[FeatureGenerator, dict[str, float]]:
    """Fit the generator of ``class_id`` with the network frozen.

    :param model: the network; frozen (eval mode, no gradient) while fitting,
        and left in its former mode.
    :param real_maps: ``(N, C, H, W)`` maps of the class's training samples.
    :param exemplar_maps: ``(M, C, H, W)`` maps of its exemplars.
    :param unlabeled_maps: ``(U, C, H, W)`` maps of unlabeled inputs.
    :param experience: index of the experience, for error messages.
    :return: the fitted generator (eval mode) and its last losses.
    :raises NonFiniteLossError: when a loss becomes NaN or infinite.
    """
    device = real_maps.device
    generator = FeatureGenerator(
        real_maps.shape[1], hidden=config.hidden, n_blocks=config.n_blocks
    ).to(device)
    optimizer = torch.optim.SGD(
        generator.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = max(1, math.ceil(len(real_maps) / config.batch_size))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, [m * steps_per_epoch for m in config.milestones], gamma=0.1
    )
    use_sc = config.ablation in ("sc", "sc_sdc", "full")
    use_sdc = config.ablation in ("sc_sdc", "full")
    use_cycle = config.ablation == "full"
    last: dict[str, float] = {}
    b = config.batch_size
    with frozen(model):
        generator.train()
        for _ in range(config.epochs * steps_per_epoch):
            real = real_maps[torch.randint(len(real_maps), (b,), device=device)]
            exemplar = exemplar_maps[
                torch.randint(len(exemplar_maps), (b,), device=device)
            ]
            unlabeled = unlabeled_maps[
                torch.randint(len(unlabeled_maps), (b,), device=device)
            ]
            mix = generator(exemplar, unlabeled)  # (B, C, H, W)
            cycle = generator(mix, exemplar) if use_cycle else None
            # another mix of the class: the same batch shifted by one
            other_mix = mix.roll(1, dims=0) if use_cycle else None
            loss, last = generator_loss(
                logits=model.logits_of_map(mix),
                target=class_id,
                mix=mix,
                real=real,
                unlabeled=unlabeled,
                exemplar=exemplar,
                cycle=cycle,
                other_mix=other_mix,
                lam=config.lam,
                lam_cyc=config.lam_cyc,
                semantic=config.semantic,
                gram_normalized=config.gram_normalized,
                use_sc=use_sc,
                use_sdc=use_sdc,
            )
            if not torch.isfinite(loss):
                where = f"experience {experience}, " if experience is not None else ""
                raise NonFiniteLossError(
                    f"generator loss became {float(loss)} while fitting the generator "
                    f"of {where}class {class_id} (parts: {last}); lower the "
                    "generator learning rate or enable clip_norm"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(generator.parameters(), config.clip_norm)
            optimizer.step()
            scheduler.step()
    _recalibrate_batchnorm(generator, exemplar_maps, unlabeled_maps, b)
    last["loss"] = sum(last.values())
    return generator, last


@torch.no_grad()
def _recalibrate_batchnorm(
    generator: FeatureGenerator, content: Tensor, style: Tensor, batch_size: int
) -> None:
    """Re-estimate the generator's BatchNorm statistics on (exemplar, unlabeled) pairs.

    During fitting the cycle pass also feeds ``[mix ; exemplar]`` through the
    generator, so its running statistics blend two input distributions; in
    replay it only sees ``[exemplar ; unlabeled]``. Left in eval mode.
    """
    layers = [m for m in generator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the passes below
    generator.train()
    device = content.device
    for _ in range(max(1, 1024 // batch_size)):
        rows_c = torch.randint(len(content), (batch_size,), device=device)
        rows_s = torch.randint(len(style), (batch_size,), device=device)
        generator(content[rows_c], style[rows_s])
    for m in layers:
        m.momentum = 0.1
    generator.eval()
