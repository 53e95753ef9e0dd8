"""Benchmark configuration: defaults, a strict JSON reader and validation."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .datasets import DATASETS, UNLABELED_SOURCES

#: Methods the comparison knows, in the order of its tables.
METHODS = (
    "naive",
    "replay",
    "icarl",
    "lucir",
    "imagine_no_generator",
    "imagine_copies",
    "imagine_sc",
    "imagine_sc_sdc",
    "imagine",
    "imagine_compact",
    "joint",
)


#: ImagineStrategy arguments that the benchmark sets from its own fields.
SET_BY_BENCHMARK = {
    "model",
    "optimizer",
    "unlabeled_data",
    "memory_size",
    "generator_epochs",
    "n_generated",
    "ablation",
    "progress",
    "plugins",
    "device",
    "evaluator",
    "train_mb_size",
    "train_epochs",
    "eval_mb_size",
    "eval_every",
}


@dataclass
class Config:
    """One comparison: data, protocol, budget, methods and seeds.

    The defaults are the embedded digits run: no download, a few minutes on
    two CPU cores.
    """

    # data
    dataset: str = "digits"  # one of DATASETS
    data_root: str | None = None  # folder of the dataset (not for digits)
    download: bool = False  # torchvision CIFAR only, when asked
    image_size: int | None = None  # resize imagefolder images
    train_per_class: int | None = None  # subsample the training set
    test_per_class: int | None = None  # subsample the test set
    augment: bool = False  # random crop + flip on training inputs
    cache_dir: str = ".cache/benchmarks"  # decoded image folders
    # protocol
    first_exp_classes: int | None = None  # classes of the first experience
    steps: int = 5  # experiences (after the first when first_exp_classes)
    class_order_seed: int = 0
    heldout_classes: list[int] = field(default_factory=list)
    # unlabeled data
    unlabeled: str = "photos"  # one of UNLABELED_SOURCES
    unlabeled_path: str | None = None  # for "patches" and "path"
    unlabeled_size: int | None = None  # inputs kept / crops cut
    # model and training
    model: str = "resnet20"  # resnet20, resnet32 or resnet18
    width: int = 16  # channels of the first stage (resnet20/32)
    memory_size: int = 100
    epochs: int = 8
    batch_size: int = 32
    lr: float = 0.05
    weight_decay: float = 5e-4
    generator_epochs: int = 10
    n_generated: int = 2
    # further ImagineStrategy arguments for every Imagine method, e.g.
    # {"generated_bn": "train"}; unknown names are errors
    imagine_options: dict = field(default_factory=dict)
    # run
    methods: list[str] = field(
        default_factory=lambda: [
            "naive",
            "icarl",
            "lucir",
            "imagine_no_generator",
            "imagine",
        ]
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads
    # every method's network in channels-last memory format: a training
    # step 18 % faster on the CPU at CIFAR sizes (profile_step; generators
    # follow). Off by default:
    # torch 2.14's oneDNN corrupts the heap in the backward pass of a strided
    # 1x1 convolution with 2 or 4 input channels (a width-4 ResNet).
    channels_last: bool = False

    def __post_init__(self):
        self.validate()

    def _validate_imagine_options(self) -> None:
        import inspect

        from avalanche_imaginer import ImagineStrategy

        if not isinstance(self.imagine_options, dict):
            raise ValueError(
                "imagine_options must be a mapping of ImagineStrategy arguments, "
                f"got {self.imagine_options!r}"
            )
        allowed = set(inspect.signature(ImagineStrategy).parameters) - SET_BY_BENCHMARK
        unknown = sorted(set(self.imagine_options) - allowed)
        if unknown:
            raise ValueError(
                f"imagine_options: unknown or benchmark-set argument(s) {unknown}; "
                f"allowed: {sorted(allowed)}"
            )
        generator = self.imagine_options.get("generator")
        if generator is not None:
            from avalanche_imaginer import GeneratorConfig

            if not isinstance(generator, dict):
                raise ValueError(
                    "imagine_options.generator must be a mapping of GeneratorConfig "
                    f"fields, got {generator!r}"
                )
            fields = {f.name for f in dataclasses.fields(GeneratorConfig)}
            bad = sorted(set(generator) - fields)
            if bad:
                raise ValueError(
                    f"imagine_options.generator: unknown field(s) {bad}; known: "
                    f"{sorted(fields)}"
                )

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset != "digits" and not self.data_root:
            raise ValueError(f"dataset {self.dataset!r} needs data_root")
        if self.unlabeled not in UNLABELED_SOURCES:
            raise ValueError(
                f"unlabeled must be one of {UNLABELED_SOURCES}, got {self.unlabeled!r}"
            )
        if self.unlabeled in ("patches", "path") and not self.unlabeled_path:
            raise ValueError(f"unlabeled={self.unlabeled!r} needs unlabeled_path")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be among {METHODS}, got {self.methods}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if self.model not in ("resnet20", "resnet32", "resnet18"):
            raise ValueError(
                f"model must be resnet20, resnet32 or resnet18, got {self.model!r}"
            )
        for name in ("steps", "epochs", "batch_size", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("memory_size", "generator_epochs", "n_generated"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self._validate_imagine_options()

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> Config:
        """Read a JSON config; an unknown key is an error."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(
                f"{path}: a config is a JSON object, got {type(data).__name__}"
            )
        data.pop("_comment", None)
        return cls.from_dict({**data, **overrides}, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}"
            )
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
