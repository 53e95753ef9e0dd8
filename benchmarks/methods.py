"""Build each compared method on the same backbone, optimizer and budget."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from avalanche.models import IncrementalClassifier
from avalanche.training import Cumulative, ICaRL, Naive, Replay
from avalanche.training.plugins import LRSchedulerPlugin
from torch import nn

from avalanche_imaginer import (
    LUCIR,
    GeneratorConfig,
    ImagineStrategy,
    SplitModel,
    resnet18,
    resnet32,
)

from .config import Config

#: The Imagine variants of the comparison: the paper's ablations, the copies
#: control and the compact generator design, as ImagineStrategy arguments.
IMAGINE_VARIANTS = {
    "imagine_no_generator": {"ablation": "no_generator"},
    "imagine_copies": {"ablation": "copies"},
    "imagine_sc": {"ablation": "sc"},
    "imagine_sc_sdc": {"ablation": "sc_sdc"},
    "imagine": {"ablation": "full"},
    "imagine_compact": {"ablation": "full", "generator_design": "compact"},
}


def build_model(
    cfg: Config, input_shape, classifier: nn.Module | None = None
) -> SplitModel:
    """The backbone every method uses, split for the generators."""
    channels, size = input_shape[0], input_shape[-1]
    if cfg.model == "resnet18":
        model = resnet18(small_inputs=size <= 64, classifier=classifier)
    else:
        model = resnet32(
            in_channels=channels,
            width=cfg.width,
            blocks_per_stage=3 if cfg.model == "resnet20" else 5,
            classifier=classifier,
        )
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@dataclass
class Built:
    strategy: object
    exemplar_bytes: callable = field(default=lambda: 0)
    generator_bytes: callable = field(default=lambda: 0)
    generator_seconds: callable = field(default=lambda: 0.0)
    diagnostics: callable = field(default=lambda: [])
    diagnostics_seconds: callable = field(default=lambda: 0.0)
    generated: callable = field(default=lambda: (0, 0.0))  # (count, seconds)
    generator_classes: callable = field(default=lambda: 0)


def _sample_bytes(stream) -> int:
    x = stream.benchmark.train_stream[0].dataset[0][0]
    return x.numel() * x.element_size()


def imagine_options(cfg: Config) -> dict:
    """The config's extra ImagineStrategy arguments, ``generator`` as a config."""
    options = dict(cfg.imagine_options)
    if isinstance(options.get("generator"), dict):
        options["generator"] = GeneratorConfig(**options["generator"])
    return options


def build_method(method: str, cfg: Config, stream, evaluator) -> Built:
    """The strategy of ``method`` with the config's budget."""
    device = torch.device(cfg.device)
    n_classes = stream.n_classes
    common = dict(
        train_mb_size=cfg.batch_size,
        train_epochs=cfg.epochs,
        eval_mb_size=256,
        device=device,
        evaluator=evaluator,
    )

    def optimizer_for(model: nn.Module):
        opt = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
        return opt, LRSchedulerPlugin(sched, reset_scheduler=True, reset_lr=True)

    # Avalanche's Replay has no default criterion; the three plain baselines
    # learn with cross-entropy
    plain = dict(common, criterion=torch.nn.CrossEntropyLoss())
    if method in ("naive", "replay", "joint"):
        probe = build_model(cfg, stream.input_shape, classifier=nn.Identity())
        model = build_model(
            cfg,
            stream.input_shape,
            classifier=IncrementalClassifier(
                probe.feature_size, initial_out_features=2
            ),
        )
        opt, sched = optimizer_for(model)
        if method == "naive":
            return Built(Naive(model=model, optimizer=opt, plugins=[sched], **plain))
        if method == "joint":
            return Built(
                Cumulative(model=model, optimizer=opt, plugins=[sched], **plain)
            )
        strategy = Replay(
            model=model,
            optimizer=opt,
            mem_size=cfg.memory_size,
            plugins=[sched],
            **plain,
        )
        size = _sample_bytes(stream)
        replay = next(p for p in strategy.plugins if hasattr(p, "storage_policy"))
        return Built(
            strategy, exemplar_bytes=lambda: len(replay.storage_policy.buffer) * size
        )

    if method == "icarl":
        backbone = build_model(cfg, stream.input_shape, classifier=nn.Identity())
        extractor = nn.Sequential(backbone.lower, backbone.upper)
        classifier = nn.Linear(backbone.feature_size, n_classes)
        opt, sched = optimizer_for(nn.ModuleList([extractor, classifier]))
        strategy = ICaRL(
            feature_extractor=extractor,
            classifier=classifier,
            optimizer=opt,
            memory_size=cfg.memory_size,
            buffer_transform=None,
            fixed_memory=True,
            plugins=[sched],
            **common,
        )
        icarl = next(p for p in strategy.plugins if hasattr(p, "x_memory"))
        return Built(
            strategy,
            exemplar_bytes=lambda: sum(
                x.numel() * x.element_size() for x in icarl.x_memory
            ),
        )

    model = build_model(cfg, stream.input_shape)
    opt, sched = optimizer_for(model)
    if method == "lucir":
        strategy = LUCIR(
            model=model,
            optimizer=opt,
            memory_size=cfg.memory_size,
            plugins=[sched],
            **common,
        )
        return Built(strategy, exemplar_bytes=strategy.memory.nbytes)
    if method in IMAGINE_VARIANTS:
        strategy = ImagineStrategy(
            model=model,
            optimizer=opt,
            unlabeled_data=stream.unlabeled,
            memory_size=cfg.memory_size,
            generator_epochs=cfg.generator_epochs,
            n_generated=cfg.n_generated,
            **{**imagine_options(cfg), **IMAGINE_VARIANTS[method]},
            progress=False,
            plugins=[sched],
            **common,
        )
        return Built(
            strategy,
            exemplar_bytes=strategy.memory.nbytes,
            generator_bytes=strategy.generators.nbytes,
            generator_seconds=lambda: sum(strategy.fitting.fit_seconds.values()),
            # diagnostics=False in the config's imagine_options: none measured
            diagnostics=lambda: [
                r.as_dict() for r in getattr(strategy.diagnostics, "records", [])
            ],
            diagnostics_seconds=lambda: getattr(strategy.diagnostics, "seconds", 0.0),
            generator_classes=lambda: len(strategy.generators),
            generated=lambda: (
                strategy.replay.total_generated,
                strategy.replay.generation_seconds,
            ),
        )
    raise ValueError(f"unknown method {method!r}")
