"""LUCIR and the Imagine strategy, as Avalanche ``SupervisedTemplate`` subclasses."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import warnings
from collections.abc import Sequence

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins.evaluation import EvaluationPlugin, default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import Dataset

from .data import UnlabeledPool
from .fitting import ABLATIONS, DESIGNS, GeneratorConfig, NonFiniteLossError
from .generator import CompactGeneratorBank, GeneratorBank
from .memory import ExemplarMemory
from .models import CosineClassifier, SplitModel
from .plugins import (
    ClassBalancedFinetuningPlugin,
    ExemplarMemoryPlugin,
    GeneratorDiagnosticsPlugin,
    GeneratorFittingPlugin,
    ImaginedReplayPlugin,
    LessForgetPlugin,
    LowerLRPlugin,
    MarginRankingPlugin,
    WeightImprintingPlugin,
)

__all__ = ["CosineIncrementalTemplate", "LUCIR", "ImagineStrategy", "EVAL_CLASSIFIERS"]

logger = logging.getLogger(__name__)

#: How a strategy classifies at evaluation: the cosine head or NME.
EVAL_CLASSIFIERS = ("cnn", "nme")


def _check_number(name: str, value, *, minimum: float = 0.0, integer: bool = False):
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(
            f"{name} must be {'an int' if integer else 'a number'}, got "
            f"{type(value).__name__} {value!r}"
        )
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


class CosineIncrementalTemplate(SupervisedTemplate):
    """What LUCIR and the Imagine strategy share.

    A :class:`~avalanche_imaginer.models.SplitModel` with a
    :class:`~avalanche_imaginer.models.CosineClassifier`, an exemplar memory
    mixed into the training batches, the less-forget distillation, and
    evaluation by the cosine head or by the nearest mean of exemplars.

    ``forward`` caches the minibatch's feature maps (``mb_maps``) and
    features (``mb_features``) for the plugins.
    """

    def __init__(
        self,
        *,
        model: SplitModel,
        optimizer: Optimizer,
        memory_size: int,
        memory_per_class: int | None,
        herding: bool,
        lambda_base: float,
        lower_lr_factor: float,
        eval_classifier: str,
        mixed_precision: bool,
        own_plugins: list[SupervisedPlugin],
        train_mb_size: int,
        train_epochs: int,
        eval_mb_size: int | None,
        device,
        plugins: Sequence[SupervisedPlugin] | None,
        evaluator,
        eval_every: int,
    ):
        if not isinstance(model, SplitModel):
            raise TypeError(
                "model must be an avalanche_imaginer.SplitModel (lower and upper "
                f"parts and a classifier), got {type(model).__name__}; wrap your "
                "network with SplitModel(lower=..., upper=...)"
            )
        if not isinstance(model.classifier, CosineClassifier):
            raise TypeError(
                "model.classifier must be a CosineClassifier (build the SplitModel "
                f"with classifier=None), got {type(model.classifier).__name__}"
            )
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer, got "
                f"{type(optimizer).__name__}"
            )
        _check_number("memory_size", memory_size, integer=True)
        if memory_per_class is not None:
            _check_number("memory_per_class", memory_per_class, integer=True)
        _check_number("lambda_base", lambda_base)
        _check_number("lower_lr_factor", lower_lr_factor)
        _check_number("train_mb_size", train_mb_size, minimum=1, integer=True)
        _check_number("train_epochs", train_epochs, minimum=1, integer=True)
        if eval_mb_size is not None:
            _check_number("eval_mb_size", eval_mb_size, minimum=1, integer=True)
        if eval_classifier not in EVAL_CLASSIFIERS:
            raise ValueError(
                f"eval_classifier must be one of {EVAL_CLASSIFIERS}, "
                f"got {eval_classifier!r}"
            )
        if not isinstance(mixed_precision, bool):
            raise TypeError(
                "mixed_precision must be a bool, got "
                f"{type(mixed_precision).__name__} {mixed_precision!r}"
            )
        if plugins is not None and not isinstance(plugins, (list, tuple)):
            raise TypeError(
                f"plugins must be a list or None, got {type(plugins).__name__}"
            )
        self.memory = ExemplarMemory(
            memory_size, per_class=memory_per_class, herding=herding, flip_means=True
        )
        self.eval_classifier = eval_classifier
        self.mixed_precision = mixed_precision
        self.distillation = LessForgetPlugin(lambda_base)
        internal = [
            ExemplarMemoryPlugin(compute_means=eval_classifier == "nme"),
            self.distillation,
            *own_plugins,
        ]
        if lower_lr_factor != 1.0:
            internal.append(LowerLRPlugin(lower_lr_factor))
        self.mb_maps: Tensor | None = None
        self.mb_features: Tensor | None = None
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=torch.nn.CrossEntropyLoss(),
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=[*internal, *(plugins or [])],
            evaluator=evaluator if evaluator is not None else default_evaluator,
            eval_every=eval_every,
        )
        if mixed_precision and self.device.type != "cuda":
            warnings.warn(
                f"mixed_precision=True on device {self.device}: bfloat16 autocast "
                "is meant for GPUs and is usually slower on CPUs without bfloat16 "
                "units",
                stacklevel=3,
            )

    def autocast(self):
        """The context of the network's forward passes: bfloat16 autocast on
        the strategy's device with ``mixed_precision``, else nothing."""
        if not self.mixed_precision:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    @property
    def old_model(self):
        """The frozen copy of the model after the last experience (or ``None``)."""
        return self.distillation.old_model

    def forward(self):
        with self.autocast():
            maps = self.model.lower(self.mb_x)  # (B, C, H, W)
            features = self.model.upper(maps)  # (B, D)
        # the classifier and every loss work in float32
        features = features.float()
        self.mb_maps, self.mb_features = maps, features
        if not self.is_training and self.eval_classifier == "nme":
            return self.memory.nme_scores(
                features,
                self.model.classifier.out_features,
                self.model.classifier.mask_value,
            )
        return self.model.classifier(features)

    def _before_training_exp(self, **kwargs):
        _check_experience(self.experience)
        self._warn_if_memory_too_small()
        super()._before_training_exp(**kwargs)

    def _warn_if_memory_too_small(self) -> None:
        """Say before training, not after it, that new classes get no exemplar."""
        classes = set(self.memory.classes) | {
            int(c) for c in self.experience.classes_in_this_experience
        }
        if self.memory.quota(len(classes)) == 0:
            warnings.warn(
                f"memory_size={self.memory.memory_size} is too small to keep one "
                f"exemplar for each of the {len(classes)} classes seen after "
                f"experience {self.experience.current_experience}: classes will "
                "have no exemplar, and no generator is fitted for them",
                stacklevel=3,
            )

    def _after_training_exp(self, **kwargs):
        super()._after_training_exp(**kwargs)
        self.mb_maps = self.mb_features = None

    def backward(self):
        # Checked before the update, so that no step is taken on a NaN loss.
        if not torch.isfinite(self.loss):
            raise NonFiniteLossError(
                f"training loss became {float(self.loss)} in experience "
                f"{self.experience.current_experience} "
                f"(epoch {self.clock.train_exp_epochs}, "
                f"iteration {self.clock.train_epoch_iterations}); "
                "lower the learning rate"
            )
        super().backward()


def _check_experience(experience) -> None:
    classes = getattr(experience, "classes_in_this_experience", None)
    if classes is None:
        raise ValueError(
            "the experience carries no class information (classes_in_this_experience):"
            " use a class-incremental stream, e.g. avalanche.benchmarks.nc_benchmark"
        )
    tasks = getattr(experience, "task_labels", [0])
    if len(set(tasks)) > 1 or any(t != 0 for t in tasks):
        raise NotImplementedError(
            f"task-incremental streams are not supported (experience has task labels "
            f"{sorted(set(tasks))}): these strategies learn one shared head without "
            "task labels; build the stream with task_labels=False"
        )


class LUCIR(CosineIncrementalTemplate):
    """LUCIR: cosine classifier, less-forget distillation and margin ranking.

    Reference: Hou et al., "Learning a Unified Classifier Incrementally via
    Rebalancing", CVPR 2019.

    :param model: a :class:`~avalanche_imaginer.models.SplitModel` with its
        default cosine classifier.
    :param optimizer: the optimizer of the model's parameters.
    :param memory_size: total number of exemplars kept.
    :param memory_per_class: a fixed number of exemplars per class instead.
    :param herding: choose exemplars by herding (else at random).
    :param lambda_base: base weight of the less-forget distillation (5).
    :param margin: margin ``m`` of the ranking loss (0.5).
    :param top_k: hard new classes ``K`` of the ranking loss (2).
    :param margin_weight: weight of the ranking loss (1).
    :param imprint_weights: initialise new classes' weights from their means.
    :param finetuning_epochs: epochs of class-balanced fine-tuning of the
        classifier on the memory after each experience (0: off).
    :param lower_lr_factor: learning-rate factor of the lower part after the
        first experience (1: same as the rest).
    :param eval_classifier: ``"cnn"`` (cosine head) or ``"nme"``.
    :param mixed_precision: run the network's forward passes (lower and
        upper parts, the old model) under bfloat16 autocast, for GPUs; the
        classifier and the losses stay in float32.
    """

    def __init__(
        self,
        *,
        model: SplitModel,
        optimizer: Optimizer,
        memory_size: int = 2000,
        memory_per_class: int | None = None,
        herding: bool = True,
        lambda_base: float = 5.0,
        margin: float = 0.5,
        top_k: int = 2,
        margin_weight: float = 1.0,
        imprint_weights: bool = True,
        finetuning_epochs: int = 0,
        lower_lr_factor: float = 1.0,
        eval_classifier: str = "cnn",
        mixed_precision: bool = False,
        train_mb_size: int = 128,
        train_epochs: int = 1,
        eval_mb_size: int | None = 256,
        device=None,
        plugins: Sequence[SupervisedPlugin] | None = None,
        evaluator: EvaluationPlugin | None = None,
        eval_every: int = -1,
    ):
        _check_number("margin", margin)
        _check_number("top_k", top_k, minimum=1, integer=True)
        _check_number("margin_weight", margin_weight)
        _check_number("finetuning_epochs", finetuning_epochs, integer=True)
        own: list[SupervisedPlugin] = [
            MarginRankingPlugin(margin=margin, top_k=top_k, weight=margin_weight)
        ]
        if imprint_weights:
            own.append(WeightImprintingPlugin())
        if finetuning_epochs:
            own.append(ClassBalancedFinetuningPlugin(epochs=finetuning_epochs))
        super().__init__(
            model=model,
            optimizer=optimizer,
            memory_size=memory_size,
            memory_per_class=memory_per_class,
            herding=herding,
            lambda_base=lambda_base,
            lower_lr_factor=lower_lr_factor,
            eval_classifier=eval_classifier,
            mixed_precision=mixed_precision,
            own_plugins=own,
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=plugins,
            evaluator=evaluator,
            eval_every=eval_every,
        )


class ImagineStrategy(CosineIncrementalTemplate):
    """Learning to Imagine: exemplars diversified by per-class feature generators.

    At the end of each experience one generator per new class is fitted on the
    frozen network. While later experiences are trained, every exemplar in a
    batch gets ``n_generated`` imagined counterparts, made by its class's
    generator from its feature map and unlabeled maps; they are classified by
    the upper part and added to the loss. The less-forget distillation of
    LUCIR keeps the features close to the old model's. The trained
    ``strategy.model`` holds no generator: they are in ``strategy.generators``.

    Reference: Tang, Peng, Zheng, "Learning to Imagine: Diversify Memory for
    Incremental Learning using Unlabeled Data", CVPR 2022.

    :param model: a :class:`~avalanche_imaginer.models.SplitModel` with its
        default cosine classifier.
    :param optimizer: the optimizer of the model's parameters.
    :param unlabeled_data: a map-style dataset of unlabeled inputs (tensors,
        or tuples whose first element is the input; labels are ignored).
    :param memory_size: total number of exemplars kept.
    :param memory_per_class: a fixed number of exemplars per class instead.
    :param generator_epochs: epochs of each generator's fitting (40).
    :param n_generated: imagined counterparts per exemplar (2).
    :param replay_weight: weight of the counterparts' cross-entropy (0.1; the
        paper's is 1, which measured worse here on CIFAR-10: README, "Design
        choices").
    :param replay_weighting: ``"batch"`` (default): the counterparts' mean
        cross-entropy, times ``replay_weight``, weighs as much as the whole
        batch's, however few exemplars it holds; ``"sample"``: each
        counterpart weighs as one real sample of the batch (the authors' one
        cross-entropy over real and generated samples).
    :param lambda_base: base weight of the less-forget distillation (5).
    :param margin_weight: weight of LUCIR's margin ranking loss on exemplars
        (1, as LUCIR; 0 gives the paper's loss, which measured worse here:
        README, "Design choices").
    :param imprint_weights: initialise new classes' weights from their mean
        features, as LUCIR (measured better here).
    :param ablation: ``"full"``, ``"sc_sdc"``, ``"sc"`` (generator losses of
        the paper's ablation), ``"no_generator"`` (the same pipeline without
        imagined replay) or ``"copies"`` (no generator: the counterparts are
        copies of the exemplars' own maps, a control for what the extra weight
        on old classes does without the generators' diversity).
    :param generator_design: ``"per_class"`` (the paper: one generator per
        class) or ``"compact"`` (one shared trunk fitted on the first
        experience and a small code per class, about ``n_classes`` times fewer
        bytes; :class:`~avalanche_imaginer.generator.ConditionalGenerator`).
    :param generator: design and fitting schedule of the generators; its
        ``epochs``, ``ablation`` and ``design`` are set from the arguments above.
    :param unlabeled_per_class: unlabeled inputs drawn for each fitting.
    :param unlabeled_mining: keep only the unlabeled inputs that the model
        labels most confidently, re-mined after each experience (authors'
        code). Off by default: it costs a pass over the whole unlabeled set
        per experience and its benefit has not been measured here.
    :param generated_bn: BatchNorm mode of the upper part for generated maps.
    :param lower_lr_factor: learning-rate factor of the lower part after the
        first experience (1; the authors use 0.1 so that generators keep
        the lower part they were fitted on, which measured worse here).
    :param eval_classifier: ``"cnn"`` (cosine head) or ``"nme"``.
    :param mixed_precision: run the network's forward passes (lower and
        upper parts, the old model, imagined replay) under bfloat16 autocast,
        for GPUs; the classifier, the losses and the fitting of generators
        stay in float32.
    :param progress: progress bars while fitting generators.
    :param diagnostics: measure every generator after each experience
        (:class:`~avalanche_imaginer.plugins.GeneratorDiagnosticsPlugin`;
        results in ``strategy.diagnostics.records`` and the loggers).
    """

    def __init__(
        self,
        *,
        model: SplitModel,
        optimizer: Optimizer,
        unlabeled_data: Dataset,
        memory_size: int = 2000,
        memory_per_class: int | None = None,
        generator_epochs: int = 40,
        n_generated: int = 2,
        replay_weight: float = 0.1,
        replay_weighting: str = "batch",
        lambda_base: float = 5.0,
        margin_weight: float = 1.0,
        imprint_weights: bool = True,
        ablation: str = "full",
        generator_design: str = "per_class",
        generator: GeneratorConfig | None = None,
        unlabeled_per_class: int = 1024,
        unlabeled_mining: bool = False,
        generated_bn: str = "eval",
        lower_lr_factor: float = 1.0,
        eval_classifier: str = "cnn",
        mixed_precision: bool = False,
        progress: bool = True,
        diagnostics: bool = True,
        train_mb_size: int = 128,
        train_epochs: int = 1,
        eval_mb_size: int | None = 256,
        device=None,
        plugins: Sequence[SupervisedPlugin] | None = None,
        evaluator: EvaluationPlugin | None = None,
        eval_every: int = -1,
    ):
        _check_number("generator_epochs", generator_epochs, integer=True)
        _check_number("n_generated", n_generated, integer=True)
        _check_number("replay_weight", replay_weight)
        _check_number("margin_weight", margin_weight)
        _check_number(
            "unlabeled_per_class", unlabeled_per_class, minimum=1, integer=True
        )
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
        if generator_design not in DESIGNS:
            raise ValueError(
                f"generator_design must be one of {DESIGNS}, got {generator_design!r}"
            )
        if generator is not None and not isinstance(generator, GeneratorConfig):
            raise TypeError(
                "generator must be a GeneratorConfig or None, got "
                f"{type(generator).__name__}"
            )
        # A copy (validated again by its __post_init__): the caller's config
        # may be shared with other strategies.
        config = dataclasses.replace(
            generator or GeneratorConfig(),
            epochs=generator_epochs,
            ablation=ablation,
            design=generator_design,
        )
        self.unlabeled_pool = UnlabeledPool(unlabeled_data)
        self.generators = (
            CompactGeneratorBank() if config.design == "compact" else GeneratorBank()
        )
        self.generator_config = config
        self.ablation = ablation
        self.fitting = GeneratorFittingPlugin(
            config,
            unlabeled_per_class=unlabeled_per_class,
            mining=unlabeled_mining,
            progress=progress,
        )
        self.replay = ImaginedReplayPlugin(
            n_generated=n_generated if ablation != "no_generator" else 0,
            copies=ablation == "copies",
            weight=replay_weight,
            weighting=replay_weighting,
            bn_mode=generated_bn,
        )
        own = [self.fitting, self.replay]
        if margin_weight:
            own.append(MarginRankingPlugin(weight=margin_weight))
        if imprint_weights:
            own.append(WeightImprintingPlugin())
        self.diagnostics: GeneratorDiagnosticsPlugin | None = None
        if diagnostics:
            self.diagnostics = GeneratorDiagnosticsPlugin()
            own.append(self.diagnostics)
        super().__init__(
            model=model,
            optimizer=optimizer,
            memory_size=memory_size,
            memory_per_class=memory_per_class,
            herding=True,
            lambda_base=lambda_base,
            lower_lr_factor=lower_lr_factor,
            eval_classifier=eval_classifier,
            mixed_precision=mixed_precision,
            own_plugins=own,
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=plugins,
            evaluator=evaluator,
            eval_every=eval_every,
        )
        self._check_unlabeled()
        self.generators.to(self.device)

    def _check_unlabeled(self) -> None:
        """Fail now, not hours later, if the lower part cannot take the inputs."""
        example = self.unlabeled_pool.example()
        if not example.is_floating_point():
            raise TypeError(
                "unlabeled_data inputs must be floating-point tensors, got "
                f"{example.dtype}"
            )
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                maps = self.model.lower(example.unsqueeze(0).to(self.device))
        except Exception as err:
            raise ValueError(
                f"the model's lower part cannot take the unlabeled_data inputs of "
                f"shape {tuple(example.shape)}: {err}"
            ) from err
        finally:
            self.model.train(was_training)
        if maps.dim() != 4:
            raise ValueError(
                "the model's lower part must return feature maps (B, C, H, W), got "
                f"shape {tuple(maps.shape)}"
            )
