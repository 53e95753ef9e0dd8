"""Avalanche plugins: one concern of LUCIR or of the Imagine strategy each.

The plugins expect a strategy built on
:class:`~avalanche_imaginer.strategies.base.CosineIncrementalTemplate`: a
:class:`~avalanche_imaginer.models.SplitModel` as model, an
:class:`~avalanche_imaginer.memory.ExemplarMemory` as ``strategy.memory``, and
the minibatch's feature maps and features cached by its ``forward`` as
``strategy.mb_maps`` and ``strategy.mb_features``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metric_results import MetricValue
from torch import Tensor
from tqdm.auto import tqdm

from ._utils import compute_features, frozen
from .data import mine_unlabeled
from .diagnostics import GeneratorDiagnostics, generator_diagnostics
from .fitting import (
    WITHOUT_GENERATORS,
    ClassMaps,
    GeneratorConfig,
    fit_compact,
    fit_generator,
    fit_generators,
)
from .generator import ConditionalGenerator, GeneratorBank, in_memory_format_of
from .losses import less_forget_loss, less_forget_weight, margin_ranking_loss

__all__ = [
    "ExemplarMemoryPlugin",
    "LessForgetPlugin",
    "MarginRankingPlugin",
    "WeightImprintingPlugin",
    "LowerLRPlugin",
    "ClassBalancedFinetuningPlugin",
    "GeneratorFittingPlugin",
    "ImaginedReplayPlugin",
    "GeneratorDiagnosticsPlugin",
    "BN_MODES",
    "REPLAY_WEIGHTINGS",
]

logger = logging.getLogger(__name__)

#: How generated maps pass through the BatchNorm layers of the upper part.
BN_MODES = ("eval", "train", "separate")

#: How the counterparts' cross-entropy is weighed against the batch's.
REPLAY_WEIGHTINGS = ("batch", "sample")


def _autocast(strategy):
    """The strategy's mixed-precision context of forward passes (or none)."""
    make = getattr(strategy, "autocast", None)
    return make() if make is not None else contextlib.nullcontext()


def _new_classes(strategy) -> list[int]:
    return sorted(int(c) for c in strategy.experience.classes_in_this_experience)


def _old_and_new(strategy) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids of the classes of earlier experiences and of the current one."""
    clf = strategy.model.classifier
    old = torch.nonzero(clf.frozen_mask).flatten()
    new = torch.nonzero(clf.active_units & ~clf.frozen_mask).flatten()
    return old, new


class ExemplarMemoryPlugin(SupervisedPlugin):
    """Mixes the exemplars into the training data and updates the memory.

    Exemplars join the experience's data before the dataloader is made (as
    Avalanche's iCaRL does), so batches hold both. After training, exemplars of
    the new classes are chosen and the memory re-balanced; class means for NME
    are recomputed when ``compute_means``.
    """

    def __init__(self, *, compute_means: bool = False):
        super().__init__()
        self.compute_means = compute_means

    def after_train_dataset_adaptation(self, strategy, **kwargs):
        exemplars = strategy.memory.dataset(train=True)
        if exemplars is None:
            return
        strategy.adapted_dataset = strategy.adapted_dataset.concat(exemplars)

    def after_training_exp(self, strategy, **kwargs):
        strategy.memory.update(
            strategy.model,
            strategy.experience.dataset,
            _new_classes(strategy),
            device=strategy.device,
            batch_size=strategy.eval_mb_size,
        )
        if self.compute_means:
            strategy.memory.compute_class_means(
                strategy.model, device=strategy.device, batch_size=strategy.eval_mb_size
            )


class LessForgetPlugin(SupervisedPlugin):
    """LUCIR's less-forget distillation on the features of every sample.

    ``lambda_base * sqrt(old_classes / new_classes) * mean(1 - cos(f_old, f))``.
    The frozen ``old_model`` is a copy of the model taken after each
    experience.
    """

    def __init__(self, lambda_base: float = 5.0):
        super().__init__()
        self.lambda_base = lambda_base
        self.old_model = None
        self.weight = 0.0

    def before_training_exp(self, strategy, **kwargs):
        old, new = _old_and_new(strategy)
        self.weight = less_forget_weight(self.lambda_base, len(old), len(new))

    def before_backward(self, strategy, **kwargs):
        if self.old_model is None or self.weight == 0.0:
            return
        with torch.no_grad(), _autocast(strategy):
            old_features = self.old_model.features(strategy.mb_x)
        loss = less_forget_loss(strategy.mb_features, old_features.float())
        strategy.loss += self.weight * loss

    def after_training_exp(self, strategy, **kwargs):
        self.old_model = copy.deepcopy(strategy.model).eval()
        for p in self.old_model.parameters():
            p.requires_grad_(False)


class MarginRankingPlugin(SupervisedPlugin):
    """LUCIR's margin ranking loss on the exemplars of each batch."""

    def __init__(self, *, margin: float = 0.5, top_k: int = 2, weight: float = 1.0):
        super().__init__()
        self.margin = margin
        self.top_k = top_k
        self.weight = weight

    def before_backward(self, strategy, **kwargs):
        old, new = _old_and_new(strategy)
        if len(old) == 0 or self.weight == 0.0:
            return
        cosines = strategy.model.classifier.cosine(strategy.mb_features)
        loss = margin_ranking_loss(
            cosines, strategy.mb_y, old, new, margin=self.margin, top_k=self.top_k
        )
        strategy.loss += self.weight * loss


class WeightImprintingPlugin(SupervisedPlugin):
    """Initialises new classes' weights from their normalised mean features.

    Done before training on each experience after the first (LUCIR).
    """

    def before_training_exp(self, strategy, **kwargs):
        old, new = _old_and_new(strategy)
        if len(old) == 0:
            return
        dataset = strategy.experience.dataset.eval()
        by_class = dataset.targets.val_to_idx
        means = []
        for c in new.tolist():
            feats = compute_features(
                strategy.model,
                dataset.subset(list(by_class[c])),
                batch_size=strategy.eval_mb_size,
                device=strategy.device,
            )
            means.append(F.normalize(feats, dim=1).mean(dim=0))
        strategy.model.classifier.imprint(new.tolist(), torch.stack(means))


class LowerLRPlugin(SupervisedPlugin):
    """Trains the lower part at ``factor`` times the learning rate after the first
    experience, by scaling its gradients (exact for SGD, with or without
    momentum; with adaptive optimizers such as Adam it only damps the step).
    """

    def __init__(self, factor: float = 0.1):
        super().__init__()
        self.factor = factor

    def before_update(self, strategy, **kwargs):
        if self.factor == 1.0 or not strategy.model.classifier.frozen_mask.any():
            return
        for p in strategy.model.lower.parameters():
            if p.grad is not None:
                p.grad.mul_(self.factor)


class ClassBalancedFinetuningPlugin(SupervisedPlugin):
    """Fine-tunes the classifier on the (class-balanced) memory after training.

    Runs after the memory update of each experience after the first; the
    backbone is frozen and features are computed once, without augmentation.
    """

    def __init__(self, *, epochs: int = 20, lr: float = 0.01, batch_size: int = 128):
        super().__init__()
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size

    def after_training_exp(self, strategy, **kwargs):
        clf = strategy.model.classifier
        exemplars = strategy.memory.dataset(train=False)
        if self.epochs == 0 or exemplars is None or not clf.frozen_mask.any():
            return
        feats = compute_features(
            strategy.model,
            exemplars,
            batch_size=strategy.eval_mb_size,
            device=strategy.device,
        )
        labels = torch.as_tensor(list(exemplars.targets), device=strategy.device)
        params = [p for p in clf.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        freeze_old, clf.freeze_old = clf.freeze_old, False
        try:
            for _ in range(self.epochs):
                order = torch.randperm(len(feats), device=feats.device)
                for rows in order.split(self.batch_size):
                    loss = F.cross_entropy(clf(feats[rows]), labels[rows])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        finally:
            clf.freeze_old = freeze_old


class GeneratorFittingPlugin(SupervisedPlugin):
    """Fits one generator per new class at the end of each experience.

    Runs after the memory update, while the experience's data is reachable.
    The network is frozen while fitting; the maps of the class's samples, of
    its exemplars and of ``unlabeled_per_class`` unlabeled inputs are computed
    once, then the generator is fitted on random triplets of them.

    :param config: the generators' design and fitting schedule.
    :param unlabeled_per_class: unlabeled inputs drawn for each class's fitting.
    :param mining: re-mine the unlabeled pool after each experience (keep, per
        predicted class, the lowest-entropy inputs).
    :param mining_per_class: inputs kept per predicted class when mining.
    :param progress: show a progress bar over the classes.
    """

    def __init__(
        self,
        config: GeneratorConfig,
        *,
        unlabeled_per_class: int = 1024,
        mining: bool = False,
        mining_per_class: int = 100,
        progress: bool = True,
    ):
        super().__init__()
        self.config = config
        self.unlabeled_per_class = unlabeled_per_class
        self.mining = mining
        self.mining_per_class = mining_per_class
        self.progress = progress
        self.fit_seconds: dict[int, float] = {}
        self.fit_losses: dict[int, dict[str, float]] = {}

    def after_training_exp(self, strategy, **kwargs):
        if self.config.ablation in WITHOUT_GENERATORS or self.config.epochs == 0:
            return
        exp_id = strategy.experience.current_experience
        dataset = strategy.experience.dataset.eval()
        together = self.config.design == "compact" or self.config.fit_together
        fitted, pending = {}, {}  # pending: class id -> maps, fitted together
        classes = _new_classes(strategy)
        for c in tqdm(
            classes, desc=f"generators (exp {exp_id})", disable=not self.progress
        ):
            start = time.perf_counter()
            maps = self._class_maps(strategy, dataset, c)
            if maps is None:
                continue
            if together:
                pending[c] = maps
                self.fit_seconds[c] = time.perf_counter() - start
                continue
            fitted[c], losses = fit_generator(
                strategy.model,
                c,
                maps.real,
                maps.exemplars,
                maps.unlabeled,
                self.config,
                experience=exp_id,
            )
            self._done(c, time.perf_counter() - start, losses)
        if pending and self.config.design == "compact":
            shared = self._fit_compact(strategy, pending, exp_id)
        elif pending:
            fitted = self._fit_together(strategy, pending, exp_id)
        # Stored only once every class of the experience is fitted: an error
        # above leaves the bank as it was.
        for c, generator in fitted.items():
            strategy.generators.add(c, generator)
        if pending and self.config.design == "compact":
            strategy.generators.set_shared(shared)
        if self.mining:
            strategy.unlabeled_pool.restrict(
                mine_unlabeled(
                    strategy.model,
                    strategy.unlabeled_pool,
                    per_class=self.mining_per_class,
                    device=strategy.device,
                    batch_size=strategy.eval_mb_size,
                )
            )

    def _class_maps(self, strategy, dataset, c: int) -> ClassMaps | None:
        """Maps of class ``c``'s samples, exemplars and fresh unlabeled inputs."""
        memory = strategy.memory
        if c not in memory.classes or len(memory.exemplars_of(c)) == 0:
            logger.warning("class %d has no exemplar: no generator is fitted", c)
            return None
        model, device, batch = strategy.model, strategy.device, strategy.eval_mb_size
        return ClassMaps(
            real=compute_features(
                model,
                dataset.subset(list(dataset.targets.val_to_idx[c])),
                batch_size=batch,
                device=device,
                maps=True,
            ),
            exemplars=compute_features(
                model,
                memory.exemplars_of(c).eval(),
                batch_size=batch,
                device=device,
                maps=True,
            ),
            unlabeled=self._unlabeled_maps(
                model, strategy.unlabeled_pool, device, batch
            ),
        )

    def _unlabeled_maps(self, model, pool, device, batch: int) -> torch.Tensor:
        with frozen(model), torch.no_grad():
            return torch.cat(
                [
                    model.feature_map(pool.sample(n, device))
                    for n in _chunks(self.unlabeled_per_class, batch)
                ]
            )

    def _fit_compact(self, strategy, maps: dict, exp_id: int):
        """The bank's shared generator with codes for ``maps``' classes, fitted.

        A copy is fitted, so that an error leaves the bank's generator as it was.
        """
        start = time.perf_counter()
        bank = strategy.generators
        first = bank.shared is None
        if first:
            real = next(iter(maps.values())).real
            shared = in_memory_format_of(
                ConditionalGenerator(
                    real.shape[1],
                    hidden=self.config.hidden,
                    n_blocks=self.config.n_blocks,
                ).to(strategy.device),
                real,
            )
        else:
            shared = copy.deepcopy(bank.shared)
        for c in maps:
            shared.add_class(c)
        losses = fit_compact(
            strategy.model,
            shared,
            maps,
            self.config,
            train_trunk=first,
            experience=exp_id,
        )
        seconds = (time.perf_counter() - start) / len(maps)
        for c in maps:
            self._done(c, self.fit_seconds[c] + seconds, losses[c])
        return shared

    def _fit_together(self, strategy, maps: dict, exp_id: int) -> dict:
        """Per-class generators of ``maps``' classes, fitted as one stacked net."""
        start = time.perf_counter()
        results = fit_generators(strategy.model, maps, self.config, experience=exp_id)
        seconds = (time.perf_counter() - start) / len(maps)
        for c, (_, losses) in results.items():
            self._done(c, self.fit_seconds[c] + seconds, losses)
        return {c: generator for c, (generator, _) in results.items()}

    def _done(self, c: int, seconds: float, losses: dict[str, float]) -> None:
        self.fit_seconds[c] = seconds
        self.fit_losses[c] = losses
        logger.info(
            "generator of class %d fitted in %.1f s, final loss %.4f (%s)",
            c,
            seconds,
            losses["loss"],
            ", ".join(f"{k}={v:.4f}" for k, v in losses.items() if k != "loss"),
        )


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - i) for i in range(0, total, size)]


class ImaginedReplayPlugin(SupervisedPlugin):
    """Adds the loss of imagined counterparts of the batch's exemplars.

    Each exemplar of an old class gets ``n_generated`` counterparts
    ``G_y([f1(x) ; f1(u)])`` from its class's frozen generator and fresh
    unlabeled inputs ``u``; they go through the upper part and the classifier,
    and their weighted cross-entropy is added to the loss. A batch without
    exemplars adds nothing.

    :param n_generated: counterparts per exemplar.
    :param weight: weight of their cross-entropy (0.1, as
        :class:`~avalanche_imaginer.ImagineStrategy`; the paper's is 1).
    :param weighting: ``"batch"``: ``weight * mean CE`` of the counterparts,
        which then weigh as much as the whole batch of real samples, however
        few exemplars it holds; ``"sample"``: ``weight * sum CE / B`` for a
        batch of ``B`` real samples, so that each counterpart weighs as one
        real sample of the batch's mean cross-entropy (as one cross-entropy
        over real and generated samples in the authors' code).
    :param copies: replay copies of the exemplars' own maps instead of
        generated ones (no generator, no unlabeled data): a control that adds
        the same weight on old classes without the generators' diversity.
    :param bn_mode: BatchNorm of the upper part for generated maps: ``"eval"``
        (the running statistics of real maps, untouched by generated ones),
        ``"train"`` (batch statistics, which also enter the running statistics
        real inputs are evaluated with, as the authors' CIFAR code) or
        ``"separate"`` (batch statistics, with running statistics of their own,
        as the authors' ImageNet code; those of real maps are untouched).
    """

    def __init__(
        self,
        *,
        n_generated: int = 2,
        weight: float = 0.1,
        weighting: str = "batch",
        bn_mode: str = "eval",
        copies: bool = False,
    ):
        super().__init__()
        if bn_mode not in BN_MODES:
            raise ValueError(f"generated_bn must be one of {BN_MODES}, got {bn_mode!r}")
        if weighting not in REPLAY_WEIGHTINGS:
            raise ValueError(
                f"replay_weighting must be one of {REPLAY_WEIGHTINGS}, "
                f"got {weighting!r}"
            )
        self.n_generated = n_generated
        self.weight = weight
        self.weighting = weighting
        self.bn_mode = bn_mode
        self.copies = copies
        self.last_count = 0  # counterparts generated for the last batch
        self.total_generated = 0  # counterparts generated in the whole run
        self.generation_seconds = 0.0  # time spent in the generators
        self._warned: set[int] = set()
        # "separate": per BatchNorm layer of the upper part, the running
        # statistics of generated maps (made on first use)
        self._generated_stats: list[dict[str, torch.Tensor]] | None = None

    def before_backward(self, strategy, **kwargs):
        self.last_count = 0
        bank: GeneratorBank = strategy.generators
        if self.n_generated == 0 or self.weight == 0.0:
            return
        if len(bank) == 0 and not self.copies:
            return
        old, _ = _old_and_new(strategy)
        y = strategy.mb_y
        is_exemplar = torch.isin(y, old)
        # copies need no generator; counterparts need their class's
        replayable = (
            torch.ones_like(is_exemplar)
            if self.copies
            else torch.isin(y, torch.tensor(list(bank), device=y.device))
        )
        for c in y[is_exemplar & ~replayable].unique().tolist():
            if c not in self._warned:
                self._warned.add(c)
                logger.warning(
                    "class %d has no generator: its exemplars get no counterpart", c
                )
        rows = torch.nonzero(is_exemplar & replayable).flatten()
        if len(rows) == 0:
            return
        model = strategy.model
        labels = y[rows].repeat_interleave(self.n_generated)  # (E*n,)
        content = strategy.mb_maps[rows].detach().repeat_interleave(self.n_generated, 0)
        with _autocast(strategy):
            if self.copies:
                generated = content
            else:
                generated = self._generate(strategy, bank, content, labels)
            if self.bn_mode == "eval":
                with _bn_eval(model.upper):
                    logits = model.logits_of_map(generated)
            elif self.bn_mode == "separate":
                with self._own_statistics(model.upper):
                    logits = model.logits_of_map(generated)
            else:
                logits = model.logits_of_map(generated)
        logits = logits.float()
        if self.weighting == "batch":
            loss = F.cross_entropy(logits, labels)
        else:
            loss = F.cross_entropy(logits, labels, reduction="sum") / len(y)
        strategy.loss += self.weight * loss
        self.last_count = len(labels)
        self.total_generated += len(labels)

    def _generate(self, strategy, bank, content: Tensor, labels: Tensor) -> Tensor:
        """Counterparts ``(N, C, H, W)`` of ``content`` maps of ``labels``."""
        model = strategy.model
        with torch.no_grad(), frozen(model.lower):
            style = model.feature_map(
                strategy.unlabeled_pool.sample(len(labels), strategy.device)
            )
        start = time.perf_counter()
        generated = bank.generate(content, style, labels)
        self.generation_seconds += time.perf_counter() - start
        return generated

    @contextlib.contextmanager
    def _own_statistics(self, module: torch.nn.Module):
        """Generated maps normalised by batch statistics, and kept in their own
        running statistics: those of real maps are swapped out meanwhile."""
        layers = _batchnorms(module)
        names = ("running_mean", "running_var", "num_batches_tracked")
        if self._generated_stats is None:
            self._generated_stats = [
                {n: getattr(m, n).clone() for n in names} for m in layers
            ]
        real = [{n: getattr(m, n) for n in names} for m in layers]
        modes = [m.training for m in layers]
        try:
            for m, stats in zip(layers, self._generated_stats):
                m.train()
                for n in names:
                    setattr(m, n, stats[n])
            yield
        finally:
            for m, stats, mode in zip(layers, real, modes):
                m.training = mode
                for n in names:
                    setattr(m, n, stats[n])


class GeneratorDiagnosticsPlugin(SupervisedPlugin):
    """Measures every fitted generator after each training experience.

    For each class with a generator: the mean and standard deviation of
    generated vs real maps, the share of counterparts that the current network
    classifies as the class, the cosine of their pooled features to the real
    class mean, and how far the exemplars' maps have drifted since the
    generator was fitted (see :mod:`avalanche_imaginer.diagnostics`). Runs
    after the generators of the experience are fitted; results are kept in
    ``records``, logged, and published to the strategy's loggers as
    ``Generator_<statistic>/train_phase/Class<id>`` (and ``.../mean``).

    :param counterparts_per_exemplar: counterparts generated per exemplar.
    """

    PUBLISHED = ("std_ratio", "classified", "cosine_to_class_mean", "drift")

    def __init__(self, *, counterparts_per_exemplar: int = 4):
        super().__init__()
        self.counterparts_per_exemplar = counterparts_per_exemplar
        self.records: list[GeneratorDiagnostics] = []
        self.seconds = 0.0  # time spent measuring, apart from the method's own
        # class id -> pooled exemplar maps (N, C) when its generator was fitted
        self._reference: dict[int, torch.Tensor] = {}
        self._fitted_in: dict[int, int] = {}

    def after_training_exp(self, strategy, **kwargs):
        if len(strategy.generators) == 0:
            return
        start = time.perf_counter()
        # Its own random draws: measuring must not change the run it measures.
        with torch.random.fork_rng(devices=[]):
            results = self._measure(strategy)
        self.records.extend(results)
        self._publish(strategy, results)
        self.seconds += time.perf_counter() - start

    def _measure(self, strategy) -> list[GeneratorDiagnostics]:
        bank: GeneratorBank = strategy.generators
        model, device, batch = strategy.model, strategy.device, strategy.eval_mb_size
        exp_id = strategy.experience.current_experience
        dataset = strategy.experience.dataset.eval()
        by_class = dataset.targets.val_to_idx
        now = []
        for c in bank:
            if (
                c not in strategy.memory.classes
                or len(strategy.memory.exemplars_of(c)) == 0
            ):
                continue
            content = compute_features(
                model,
                strategy.memory.exemplars_of(c).eval(),
                batch_size=batch,
                device=device,
                maps=True,
            )  # (N, C, H, W)
            if c not in self._reference:  # fitted at the end of this experience
                self._reference[c] = content.mean(dim=(2, 3)).cpu()  # (N, C)
                self._fitted_in[c] = exp_id
                real = compute_features(
                    model,
                    dataset.subset(list(by_class[c])),
                    batch_size=batch,
                    device=device,
                    maps=True,
                )
            else:  # the class's data is gone: its exemplars are the real maps
                real = content
            # tiled, not interleaved: the first rows stay the exemplars in order,
            # aligned with the reference for the drift
            content = content.repeat(self.counterparts_per_exemplar, 1, 1, 1)
            with torch.no_grad(), frozen(model):
                style = model.feature_map(
                    strategy.unlabeled_pool.sample(len(content), device)
                )
            result = generator_diagnostics(
                model,
                bank[c],
                c,
                content=content,
                style=style,
                real=real,
                experience=exp_id,
                fitted_in=self._fitted_in[c],
                reference=self._reference[c],
            )
            now.append(result)
            logger.info(
                "generator of class %d after experience %d: std %.3f vs real %.3f, "
                "%.0f%% classified as its class, cosine to class mean %.3f, "
                "drift %.4f",
                c,
                exp_id,
                result.generated_std,
                result.real_std,
                100 * result.classified,
                result.cosine_to_class_mean,
                result.drift,
            )
        return now

    def _publish(self, strategy, results: list[GeneratorDiagnostics]) -> None:
        evaluator = getattr(strategy, "evaluator", None)
        if evaluator is None or not results:
            return
        x = strategy.clock.train_iterations
        for key in self.PUBLISHED:
            values = [getattr(r, key) for r in results]
            for r, value in zip(results, values):
                name = f"Generator_{key}/train_phase/Class{r.class_id:03d}"
                evaluator.publish_metric_value(MetricValue(self, name, value, x))
            mean = sum(values) / len(values)
            name = f"Generator_{key}/train_phase/mean"
            evaluator.publish_metric_value(MetricValue(self, name, mean, x))


def _batchnorms(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        m
        for m in module.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]


class _bn_eval:
    """Puts the BatchNorm layers of a module in eval mode inside the block."""

    def __init__(self, module: torch.nn.Module):
        self.layers = _batchnorms(module)

    def __enter__(self):
        self.modes = [m.training for m in self.layers]
        for m in self.layers:
            m.eval()

    def __exit__(self, *exc):
        for m, mode in zip(self.layers, self.modes):
            m.training = mode
