"""Bad arguments fail at construction, with the argument named in the message."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from avalanche_imaginer import (
    ABLATIONS,
    LUCIR,
    GeneratorConfig,
    ImagineStrategy,
    SplitModel,
)

STRATEGIES = [ImagineStrategy, LUCIR]


@pytest.fixture
def build(model_builder, unlabeled_patches):
    """``build(cls, **overrides)``: a strategy on a tiny model, CPU, no training."""

    def make(cls, **overrides):
        model = overrides.pop("model", None)
        if model is None:
            model = model_builder()
        kwargs = {
            "model": model,
            "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
            "device": "cpu",
        }
        if cls is ImagineStrategy:
            kwargs["unlabeled_data"] = unlabeled_patches
            kwargs["progress"] = False
        return cls(**{**kwargs, **overrides})

    return make


def test_valid_arguments_build_both_strategies(build):
    imagine = build(ImagineStrategy)
    assert isinstance(imagine.model, SplitModel)
    assert len(imagine.unlabeled_pool) == 256
    lucir = build(LUCIR)
    assert lucir.memory.memory_size == 2000


# ------------------------------------------------------------------------ model


@pytest.mark.parametrize("cls", STRATEGIES)
def test_model_must_be_a_split_model(build, cls):
    with pytest.raises(TypeError, match="model must be an avalanche_imaginer.Split"):
        build(cls, model=nn.Linear(64, 10))


@pytest.mark.parametrize("cls", STRATEGIES)
def test_model_classifier_must_be_cosine(build, model_builder, cls):
    model = model_builder(classifier=nn.Linear(32, 10))
    with pytest.raises(TypeError, match="model.classifier must be a CosineClassifier"):
        build(cls, model=model)


@pytest.mark.parametrize("cls", STRATEGIES)
def test_optimizer_must_be_an_optimizer(build, cls):
    with pytest.raises(TypeError, match="optimizer must be"):
        build(cls, optimizer="sgd")


@pytest.mark.parametrize("cls", STRATEGIES)
def test_plugins_must_be_a_list(build, cls):
    with pytest.raises(TypeError, match="plugins must be a list"):
        build(cls, plugins="not plugins")


# --------------------------------------------------------------- unlabeled data


def test_unlabeled_data_empty(build):
    with pytest.raises(ValueError, match="unlabeled_data is empty"):
        build(ImagineStrategy, unlabeled_data=TensorDataset(torch.empty(0, 1, 8, 8)))


@pytest.mark.parametrize("data", [5, None, {"x"}])
def test_unlabeled_data_not_a_dataset(build, data):
    with pytest.raises(TypeError, match="unlabeled_data must be a map-style dataset"):
        build(ImagineStrategy, unlabeled_data=data)


@pytest.mark.parametrize("data", [["a.png", "b.png"], [("a.png", 0)]])
def test_unlabeled_data_items_not_tensors(build, data):
    with pytest.raises(TypeError, match="unlabeled_data items must be a tensor"):
        build(ImagineStrategy, unlabeled_data=data)


def test_unlabeled_inputs_the_lower_part_cannot_take(build):
    rgb = TensorDataset(torch.randn(4, 3, 8, 8))  # the model takes 1 channel
    with pytest.raises(ValueError, match=r"cannot take the unlabeled_data inputs"):
        build(ImagineStrategy, unlabeled_data=rgb)


def test_unlabeled_inputs_of_integer_dtype(build):
    raw = TensorDataset(torch.randint(0, 255, (4, 1, 8, 8)))
    with pytest.raises(TypeError, match="unlabeled_data inputs must be floating"):
        build(ImagineStrategy, unlabeled_data=raw)


def test_unlabeled_check_leaves_the_model_mode(build, model_builder):
    model = model_builder().train()
    build(ImagineStrategy, model=model)
    assert model.training


# ------------------------------------------------------------------------ numbers


# (argument, value, error): a value of the wrong kind is a TypeError, one out
# of range a ValueError.
COMMON_NUMBERS = [
    ("memory_size", -1, ValueError),
    ("memory_size", 1.5, TypeError),
    ("memory_per_class", -1, ValueError),
    ("memory_per_class", 2.0, TypeError),
    ("lambda_base", -1.0, ValueError),
    ("lambda_base", math.nan, ValueError),
    ("lambda_base", "5", TypeError),
    ("lower_lr_factor", -0.1, ValueError),
    ("train_mb_size", 0, ValueError),
    ("train_epochs", 0, ValueError),
    ("eval_mb_size", 0, ValueError),
]
IMAGINE_NUMBERS = [
    ("n_generated", -1, ValueError),
    ("n_generated", 1.0, TypeError),
    ("generator_epochs", -1, ValueError),
    ("replay_weight", -1.0, ValueError),
    ("replay_weight", math.inf, ValueError),
    ("unlabeled_per_class", 0, ValueError),
]
LUCIR_NUMBERS = [
    ("margin", -0.5, ValueError),
    ("top_k", 0, ValueError),
    ("margin_weight", -1.0, ValueError),
    ("finetuning_epochs", -1, ValueError),
]


def _cases(cls, numbers):
    return [
        pytest.param(cls, name, value, error, id=f"{cls.__name__}-{name}={value!r}")
        for name, value, error in numbers
    ]


@pytest.mark.parametrize(
    ("cls", "name", "value", "error"),
    _cases(ImagineStrategy, COMMON_NUMBERS + IMAGINE_NUMBERS)
    + _cases(LUCIR, COMMON_NUMBERS + LUCIR_NUMBERS),
)
def test_bad_numbers(build, cls, name, value, error):
    with pytest.raises(error, match=f"^{name} must be") as info:
        build(cls, **{name: value})
    assert repr(value) in str(info.value), "the message shows the value received"


@pytest.mark.parametrize("cls", STRATEGIES)
def test_bool_is_not_a_number(build, cls):
    with pytest.raises(TypeError, match="memory_size must be an int, got bool"):
        build(cls, memory_size=True)


@pytest.mark.parametrize("cls", STRATEGIES)
def test_mixed_precision_must_be_a_bool(build, cls):
    with pytest.raises(TypeError, match="mixed_precision must be a bool, got str"):
        build(cls, mixed_precision="bf16")


# ------------------------------------------------------------------------ modes


@pytest.mark.parametrize(
    ("cls", "name"),
    [
        (ImagineStrategy, "ablation"),
        (ImagineStrategy, "generated_bn"),
        (ImagineStrategy, "replay_weighting"),
        (ImagineStrategy, "eval_classifier"),
        (LUCIR, "eval_classifier"),
    ],
)
def test_bad_mode_strings(build, cls, name):
    with pytest.raises(ValueError, match=f"{name} must be one of .*'bogus'"):
        build(cls, **{name: "bogus"})


@pytest.mark.parametrize("mode", ["cnn", "nme"])
@pytest.mark.parametrize("cls", STRATEGIES)
def test_every_eval_classifier_is_accepted(build, cls, mode):
    assert build(cls, eval_classifier=mode).eval_classifier == mode


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_ablation_is_accepted(build, ablation):
    strategy = build(ImagineStrategy, ablation=ablation)
    assert strategy.generator_config.ablation == ablation
    # the pipeline without generators replays no imagined counterpart
    assert (strategy.replay.n_generated == 0) == (ablation == "no_generator")
    assert strategy.replay.copies == (ablation == "copies")


# ------------------------------------------------------------- generator config


@pytest.mark.parametrize("config", [{"hidden": 8}, "full", 8])
def test_generator_config_of_the_wrong_type(build, config):
    with pytest.raises(TypeError, match="generator must be a GeneratorConfig"):
        build(ImagineStrategy, generator=config)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden", 0),
        ("n_blocks", 1.5),
        ("batch_size", 0),
        ("epochs", -1),
        ("lr", -0.1),
        ("momentum", -1),
        ("weight_decay", "0"),
        ("lam", -2.0),
        ("lam_cyc", math.nan),
        ("clip_norm", 0.0),
        ("clip_norm", "5"),
        ("semantic", "bogus"),
        ("ablation", "bogus"),
    ],
)
def test_generator_config_bad_fields(field, value):
    with pytest.raises(ValueError, match=rf"\b{field} must be"):
        GeneratorConfig(**{field: value})


def test_generator_config_is_copied_not_changed(build):
    shared = GeneratorConfig(hidden=16)
    first = build(ImagineStrategy, generator=shared, generator_epochs=3)
    second = build(ImagineStrategy, generator=shared, ablation="sc")
    assert (shared.epochs, shared.ablation) == (40, "full")
    assert (first.generator_config.epochs, first.generator_config.ablation) == (
        3,
        "full",
    )
    assert second.generator_config.epochs == 40
    assert second.generator_config.ablation == "sc"
    assert first.generator_config.hidden == second.generator_config.hidden == 16
