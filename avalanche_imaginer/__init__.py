"""Learning to Imagine (Tang, Peng, Zheng, CVPR 2022) for Avalanche, with LUCIR."""

from .checkpoint import register_optimizer_pickling
from .fitting import ABLATIONS, DESIGNS, GeneratorConfig, NonFiniteLossError
from .generator import (
    CompactGeneratorBank,
    ConditionalGenerator,
    FeatureGenerator,
    GeneratorBank,
)
from .memory import ExemplarMemory, herding_order
from .models import (
    CosineClassifier,
    SplitModel,
    resnet18,
    resnet32,
    split_torchvision_resnet,
)
from .strategies import EVAL_CLASSIFIERS, LUCIR, ImagineStrategy

__all__ = [
    "ABLATIONS",
    "DESIGNS",
    "CompactGeneratorBank",
    "ConditionalGenerator",
    "EVAL_CLASSIFIERS",
    "CosineClassifier",
    "ExemplarMemory",
    "FeatureGenerator",
    "GeneratorBank",
    "GeneratorConfig",
    "ImagineStrategy",
    "LUCIR",
    "NonFiniteLossError",
    "SplitModel",
    "herding_order",
    "resnet18",
    "resnet32",
    "split_torchvision_resnet",
]

__version__ = "0.1.0"

# Avalanche's save_checkpoint fails on torch optimizers without this (see
# checkpoint.py).
register_optimizer_pickling()
