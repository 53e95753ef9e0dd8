"""Fitting one class's feature generator on a frozen network."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._utils import frozen
from .generator import (
    ConditionalGenerator,
    FeatureGenerator,
    StackedGenerators,
    in_memory_format_of,
)
from .losses import SEMANTIC_MODES, generator_loss
from .models import SplitModel

__all__ = [
    "ABLATIONS",
    "DESIGNS",
    "WITHOUT_GENERATORS",
    "ClassMaps",
    "GeneratorConfig",
    "NonFiniteLossError",
    "fit_compact",
    "fit_generator",
    "fit_generators",
]

#: The paper's ablations of the generator's losses (Table 4), and
#: ``"copies"``: counterparts that are copies of the exemplar's own map, which
#: give old classes the same extra weight without a generator's diversity.
ABLATIONS = ("no_generator", "copies", "sc", "sc_sdc", "full")

#: Ablations that fit no generator.
WITHOUT_GENERATORS = ("no_generator", "copies")

#: Generator designs: one generator per class (paper), or one shared trunk
#: with a small code per class (``"compact"``, this package's option).
DESIGNS = ("per_class", "compact")


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; nothing of the failed fitting is kept."""


@dataclass
class GeneratorConfig:
    """How generators are built and fitted.

    Defaults follow the paper and the authors' CIFAR config, except the
    learning rate and clipping: the paper's raw losses (raw GAP and Gram)
    can diverge to NaN at 0.1.
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
    design: str = "per_class"  # one of DESIGNS
    # per-class design: fit an experience's new classes together, as one
    # stacked network of grouped convolutions (same optimisation, faster)
    fit_together: bool = False

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
        if not isinstance(self.fit_together, bool):
            raise ValueError(
                f"generator fit_together must be a bool, got {self.fit_together!r}"
            )
        if self.design not in DESIGNS:
            raise ValueError(f"design must be one of {DESIGNS}, got {self.design!r}")
        if self.ablation not in ABLATIONS:
            raise ValueError(
                f"ablation must be one of {ABLATIONS}, got {self.ablation!r}"
            )

    @property
    def milestones(self) -> list[int]:
        """Steps of the x0.1 decays: epochs 20, 30, 35 of 40, scaled."""
        return sorted({max(1, round(self.epochs * f)) for f in (0.5, 0.75, 0.875)})


@dataclass
class ClassMaps:
    """The maps one class's generator is fitted on.

    :param real: ``(N, C, H, W)`` maps of the class's training samples.
    :param exemplars: ``(M, C, H, W)`` maps of its exemplars.
    :param unlabeled: ``(U, C, H, W)`` maps of unlabeled inputs.
    """

    real: Tensor
    exemplars: Tensor
    unlabeled: Tensor

    def sample(
        self, n: int, rng: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``n`` random (real, exemplar, unlabeled) triplets, drawn with replacement.

        :param rng: the random generator of the draws (torch's global one if None).
        """
        device = self.real.device

        def draw(maps: Tensor) -> Tensor:
            rows = torch.randint(
                len(maps), (n,), generator=rng, device=rng_device(rng, device)
            )
            return maps[rows.to(device)]

        return draw(self.real), draw(self.exemplars), draw(self.unlabeled)

    def pairs(
        self, n: int, rng: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``n`` random (exemplar, unlabeled) pairs, as replay makes them."""
        device = self.exemplars.device
        rows_c = torch.randint(
            len(self.exemplars), (n,), generator=rng, device=rng_device(rng, device)
        )
        rows_s = torch.randint(
            len(self.unlabeled), (n,), generator=rng, device=rng_device(rng, device)
        )
        return self.exemplars[rows_c.to(device)], self.unlabeled[rows_s.to(device)]


def rng_device(rng: torch.Generator | None, device: torch.device) -> torch.device:
    """Where draws of ``rng`` are made: its own device, or the maps' by default."""
    return device if rng is None else rng.device


def _class_loss(model, generate, class_id, triplet, config):
    """``L_G`` of one class on a triplet batch; ``generate(content, style)``."""
    real, exemplar, unlabeled = triplet
    mix = generate(exemplar, unlabeled)  # (B, C, H, W)
    cycle = generate(mix, exemplar) if config.ablation == "full" else None
    return _loss_of_mix(model.logits_of_map(mix), class_id, mix, cycle, triplet, config)


def _loss_of_mix(logits, class_id, mix, cycle, triplet, config):
    """``L_G`` of one class from its mixes (and cycle mixes, or ``None``)."""
    real, exemplar, unlabeled = triplet
    return generator_loss(
        logits=logits,
        target=class_id,
        mix=mix,
        real=real,
        unlabeled=unlabeled,
        exemplar=exemplar,
        cycle=cycle,
        # another mix of the class: the same batch shifted by one
        other_mix=mix.roll(1, dims=0) if cycle is not None else None,
        lam=config.lam,
        lam_cyc=config.lam_cyc,
        semantic=config.semantic,
        gram_normalized=config.gram_normalized,
        use_sc=config.ablation in ("sc", "sc_sdc", "full"),
        use_sdc=config.ablation in ("sc_sdc", "full"),
    )


def _optimize(
    params,
    config: GeneratorConfig,
    steps_per_epoch: int,
    step,
    describe,
    *,
    clip_groups: int | None = None,
):
    """SGD with the config's schedule, clipping and NaN guard over ``step()``.

    ``step()`` returns ``(loss, parts)``; ``describe()`` names what is fitted,
    for the error raised on a non-finite loss. With ``clip_groups=K`` the
    parameters are ``K`` stacked generators, each clipped on its own.
    """
    params = list(params)
    optimizer = torch.optim.SGD(
        params,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, [m * steps_per_epoch for m in config.milestones], gamma=0.1
    )
    last: dict[str, float] = {}
    for _ in range(config.epochs * steps_per_epoch):
        loss, last = step()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"generator loss became {float(loss)} while fitting {describe()} "
                f"(parts: {last}); lower the generator learning rate or enable "
                "clip_norm"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_norm is not None and clip_groups is not None:
            _clip_per_group(params, clip_groups, config.clip_norm)
        elif config.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
        optimizer.step()
        scheduler.step()
    return last


def _where(experience: int | None, class_id: int) -> str:
    where = f"experience {experience}, " if experience is not None else ""
    return f"{where}class {class_id}"


def fit_generator(
    model: SplitModel,
    class_id: int,
    real_maps: Tensor,
    exemplar_maps: Tensor,
    unlabeled_maps: Tensor,
    config: GeneratorConfig,
    *,
    experience: int | None = None,
    initial: FeatureGenerator | None = None,
    rng: torch.Generator | None = None,
) -> tuple[FeatureGenerator, dict[str, float]]:
    """Fit the generator of ``class_id`` with the network frozen.

    :param model: the network; frozen (eval mode, no gradient) while fitting,
        and left in its former mode.
    :param real_maps: ``(N, C, H, W)`` maps of the class's training samples.
    :param exemplar_maps: ``(M, C, H, W)`` maps of its exemplars.
    :param unlabeled_maps: ``(U, C, H, W)`` maps of unlabeled inputs.
    :param experience: index of the experience, for error messages.
    :param initial: the generator to start from (changed in place); a new one
        of the config's design when ``None``.
    :param rng: the random generator of the batches (torch's global one if None).
    :return: the fitted generator (eval mode) and its last losses.
    :raises NonFiniteLossError: when a loss becomes NaN or infinite.
    """
    maps = ClassMaps(real_maps, exemplar_maps, unlabeled_maps)
    generator = initial
    if generator is None:
        generator = in_memory_format_of(
            FeatureGenerator(
                real_maps.shape[1], hidden=config.hidden, n_blocks=config.n_blocks
            ).to(real_maps.device),
            real_maps,
        )
    steps_per_epoch = max(1, math.ceil(len(real_maps) / config.batch_size))

    def step():
        triplet = maps.sample(config.batch_size, rng)
        return _class_loss(model, generator, class_id, triplet, config)

    with frozen(model):
        generator.train()
        last = _optimize(
            generator.parameters(),
            config,
            steps_per_epoch,
            step,
            lambda: f"the generator of {_where(experience, class_id)}",
        )
    _recalibrate_batchnorm(
        generator, lambda n: generator(*maps.pairs(n, rng)), config.batch_size
    )
    last["loss"] = sum(last.values())
    return generator, last


def fit_generators(
    model: SplitModel,
    maps: dict[int, ClassMaps],
    config: GeneratorConfig,
    *,
    experience: int | None = None,
    initial: dict[int, FeatureGenerator] | None = None,
    rngs: dict[int, torch.Generator] | None = None,
) -> dict[int, tuple[FeatureGenerator, dict[str, float]]]:
    """Fit the generators of several classes together, as one stacked network.

    The same optimisation as :func:`fit_generator` for each class (its own
    batches, loss, momentum, schedule, gradient clipping and BatchNorm
    statistics), in grouped convolutions
    (:class:`~avalanche_imaginer.generator.StackedGenerators`) instead of one
    small network at a time. Every class takes the number of steps of the
    largest class, which is :func:`fit_generator`'s when classes have the same
    number of samples. Given the same initial generators and random
    generators, the results are those of :func:`fit_generator`, up to float
    rounding.

    :param maps: the maps of each class to fit.
    :param initial: generators to start from; new ones when ``None``.
    :param rngs: the random generator of each class's batches (torch's
        global one when ``None``).
    :return: each class's fitted generator (eval mode) and last losses.
    :raises NonFiniteLossError: when a loss becomes NaN or infinite.
    """
    classes = sorted(maps)
    rngs = rngs or {}
    if initial is None:
        channels = maps[classes[0]].real.shape[1]
        device = maps[classes[0]].real.device
        initial = {
            c: FeatureGenerator(
                channels, hidden=config.hidden, n_blocks=config.n_blocks
            ).to(device)
            for c in classes
        }
    stacked = in_memory_format_of(
        StackedGenerators([initial[c] for c in classes]), maps[classes[0]].real
    )
    k, b = len(classes), config.batch_size
    steps_per_epoch = max(1, max(math.ceil(len(maps[c].real) / b) for c in classes))
    last: dict[int, dict[str, float]] = {}
    failed = {"class": classes[0]}

    def step():
        draws = [maps[c].sample(b, rngs.get(c)) for c in classes]
        real, exemplar, unlabeled = (
            torch.stack([d[i] for d in draws]) for i in range(3)
        )  # each (K, B, C, H, W)
        mix = stacked(exemplar, unlabeled)  # (K, B, C, H, W)
        use_cycle = config.ablation == "full"
        cycle = stacked(mix, exemplar) if use_cycle else None
        logits = model.logits_of_map(mix.flatten(0, 1)).unflatten(0, (k, b))
        total = 0.0
        for i, c in enumerate(classes):
            loss, last[c] = _loss_of_mix(
                logits[i],
                c,
                mix[i],
                cycle[i] if use_cycle else None,
                (real[i], exemplar[i], unlabeled[i]),
                config,
            )
            if not torch.isfinite(loss):
                failed["class"] = c
                return loss, last[c]
            # parameters are disjoint: the sum's gradient is each class's own
            total = total + loss
        return total, last[classes[-1]]

    with frozen(model):
        stacked.train()
        _optimize(
            stacked.parameters(),
            config,
            steps_per_epoch,
            step,
            lambda: f"the generator of {_where(experience, failed['class'])}",
            clip_groups=k,
        )

    def pairs(n):
        drawn = [maps[c].pairs(n, rngs.get(c)) for c in classes]
        content = torch.stack([d[0] for d in drawn])  # (K, n, C, H, W)
        return stacked(content, torch.stack([d[1] for d in drawn]))

    _recalibrate_batchnorm(stacked, pairs, b)
    fitted = {
        c: in_memory_format_of(g, maps[c].real)
        for c, g in zip(classes, stacked.unstack())
    }
    for c in classes:
        last[c]["loss"] = sum(last[c].values())
    return {c: (fitted[c], last[c]) for c in classes}


def _clip_per_group(params: list[Tensor], groups: int, max_norm: float) -> None:
    """``clip_grad_norm_`` applied to each group of stacked parameters alone.

    Row block ``k`` of every parameter belongs to generator ``k``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    squares = sum(g.reshape(groups, -1).pow(2).sum(dim=1) for g in grads)  # (K,)
    coef = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        # scaled in place through a broadcast, not through reshape(), which
        # copies the gradient of a channels-last weight instead of viewing it
        rows = coef.repeat_interleave(g.shape[0] // groups)  # (K * rows,)
        g.mul_(rows.view(-1, *([1] * (g.dim() - 1))))


def fit_compact(
    model: SplitModel,
    generator: ConditionalGenerator,
    maps: dict[int, ClassMaps],
    config: GeneratorConfig,
    *,
    train_trunk: bool,
    experience: int | None = None,
) -> dict[int, dict[str, float]]:
    """Fit the class codes of ``maps``' classes (and the trunk) of ``generator``.

    Every step draws a batch for each class; the loss is the mean of the
    classes' ``L_G``. With ``train_trunk`` (the first experience) the shared
    trunk is fitted with the codes, then frozen for good; later experiences fit
    only their new classes' codes, the trunk in eval mode.

    :param generator: the shared generator, with a code for each class of
        ``maps`` already added. Changed in place.
    :return: the last losses of each class.
    :raises NonFiniteLossError: when a loss becomes NaN or infinite.
    """
    classes = sorted(maps)
    per_class = max(1, config.batch_size // len(classes))
    steps_per_epoch = max(
        1, math.ceil(max(len(m.real) for m in maps.values()) / per_class)
    )
    params = [generator.code(c) for c in classes]
    if train_trunk:
        params += list(generator.trunk_parameters())
    last: dict[int, dict[str, float]] = {}
    current = {"class": classes[0]}

    def step():
        total = 0.0
        for c in classes:
            current["class"] = c
            loss, last[c] = _class_loss(
                model,
                lambda content, style, c=c: generator(content, style, c),
                c,
                maps[c].sample(per_class),
                config,
            )
            if not torch.isfinite(loss):
                return loss, last[c]
            total = total + loss
        return total / len(classes), last[classes[-1]]

    with frozen(model):
        generator.train(train_trunk)  # a frozen trunk keeps its BatchNorm statistics
        for p in generator.trunk_parameters():
            p.requires_grad_(train_trunk)
        for c in classes:
            generator.code(c).requires_grad_(True)
        _optimize(
            params,
            config,
            steps_per_epoch,
            step,
            lambda: f"the shared generator for {_where(experience, current['class'])}",
        )
    if train_trunk:

        def pairs(n):
            per = max(1, n // len(classes))
            drawn = [maps[c].pairs(per) for c in classes]
            content = torch.cat([d[0] for d in drawn])  # (K*per, C, H, W)
            style = torch.cat([d[1] for d in drawn])
            labels = torch.tensor(classes).repeat_interleave(per)  # (K*per,)
            return generator(content, style, labels.to(content.device))

        _recalibrate_batchnorm(generator, pairs, config.batch_size)
    generator.freeze()
    for c in classes:
        last[c]["loss"] = sum(last[c].values())
    return last


@torch.no_grad()
def _recalibrate_batchnorm(generator: nn.Module, generate, batch_size: int) -> None:
    """Re-estimate the generator's BatchNorm statistics on (exemplar, unlabeled) pairs.

    During fitting the cycle pass also feeds ``[mix ; exemplar]`` through the
    generator, so its running statistics blend two input distributions; in
    replay it only sees ``[exemplar ; unlabeled]``. ``generate(n)`` runs the
    generator on ``n`` such pairs. Left in eval mode.
    """
    layers = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the passes below
    generator.train()
    for _ in range(max(1, 1024 // batch_size)):
        generate(batch_size)
    for m in layers:
        m.momentum = 0.1
    generator.eval()
