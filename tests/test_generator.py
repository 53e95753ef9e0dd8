"""Feature generators, the generator bank and the fitting of one generator."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from avalanche_imaginer import (
    FeatureGenerator,
    GeneratorBank,
    GeneratorConfig,
    NonFiniteLossError,
)
from avalanche_imaginer import fitting as fitting_module
from avalanche_imaginer.fitting import fit_generator
from avalanche_imaginer.generator import StackedGenerators

CHANNELS = 16  # maps of model_builder(width=4): 16 x 2 x 2


def small_generator(channels: int = 4, seed: int = 0, **kwargs) -> FeatureGenerator:
    torch.manual_seed(seed)
    return FeatureGenerator(channels, **{"hidden": 8, "n_blocks": 1, **kwargs})


def small_config(**kwargs) -> GeneratorConfig:
    return GeneratorConfig(**{"hidden": 8, "n_blocks": 1, "batch_size": 16, **kwargs})


@pytest.fixture
def fitted_model(model_builder):
    """A tiny SplitModel whose classifier knows classes 0 and 1."""
    model = model_builder(width=4)
    avalanche_model_adaptation(
        model, SimpleNamespace(classes_in_this_experience=[0, 1])
    )
    return model


def random_maps(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, CHANNELS, 2, 2, generator=gen)


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "flags": [p.requires_grad for p in model.parameters()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modes"] == before["modes"], "train/eval modes changed"
    assert after["flags"] == before["flags"], "requires_grad flags changed"
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"{key} changed"


# ----------------------------------------------------------- FeatureGenerator


@pytest.mark.parametrize(("channels", "hidden"), [(4, 8), (4, 16), (3, 5)])
def test_generator_output_has_the_shape_of_the_maps(channels, hidden):
    gen = small_generator(channels, hidden=hidden)
    content = torch.randn(3, channels, 2, 3)
    out = gen(content, torch.randn_like(content))
    assert out.shape == content.shape
    # a 1x1 entry convolution only when 2C differs from the hidden width
    assert isinstance(gen.entry, nn.Identity) == (2 * channels == hidden)


def test_gradients_reach_every_generator_parameter():
    gen = small_generator(4, n_blocks=2)
    content = torch.randn(4, 4, 3, 3)
    gen(content, torch.randn_like(content)).square().mean().backward()
    for name, p in gen.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


def test_generator_rejects_mismatched_maps():
    gen = small_generator(4)
    with pytest.raises(ValueError, match="same shape"):
        gen(torch.randn(2, 4, 2, 2), torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="4 channels"):
        gen(torch.randn(2, 5, 2, 2), torch.randn(2, 5, 2, 2))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"channels": 0}, "channels"),
        ({"channels": 4, "hidden": 0}, "hidden"),
        ({"channels": 4, "n_blocks": -1}, "n_blocks"),
        ({"channels": 4.0}, "channels"),
    ],
)
def test_generator_rejects_bad_sizes(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FeatureGenerator(**kwargs)


@settings(max_examples=25, deadline=None, database=None)
@given(
    batch=st.integers(1, 8),
    channels=st.integers(1, 4),
    h=st.integers(1, 3),
    w=st.integers(1, 3),
    train=st.booleans(),
)
def test_generator_keeps_the_map_shape_for_any_batch(batch, channels, h, w, train):
    gen = small_generator(channels).train(train and batch * h * w > 1)
    content = torch.randn(batch, channels, h, w)
    with torch.no_grad():
        out = gen(content, torch.randn_like(content))
    assert out.shape == content.shape
    assert torch.isfinite(out).all()


# --------------------------------------------------------------- GeneratorBank


def test_bank_is_a_mapping_of_class_ids():
    bank = GeneratorBank()
    first, second = small_generator(seed=1), small_generator(seed=2)
    bank.add(7, first)
    bank.add(3, second)
    assert len(bank) == 2
    assert list(bank) == [3, 7]
    assert bank[7] is first and bank[3] is second
    assert 3 in bank and 7 in bank
    assert 5 not in bank and "x" not in bank and None not in bank
    assert dict(bank.items()) == {3: second, 7: first}
    with pytest.raises(KeyError):
        bank[5]


def test_bank_compares_and_hashes_by_identity():
    a, b = GeneratorBank(), GeneratorBank()
    assert a != b
    assert a == a
    assert len({a, b}) == 2


def test_bank_generators_are_frozen_and_stay_in_eval_mode():
    bank = GeneratorBank()
    generator = small_generator().train()
    bank.add(0, generator)
    assert not generator.training
    assert not any(p.requires_grad for p in generator.parameters())
    bank.train()
    assert not bank.training
    assert not any(m.training for m in bank.modules())
    # also when the bank sits inside a module put in training mode
    holder = nn.Module()
    holder.bank = bank
    holder.train()
    assert not any(m.training for m in bank.modules())


def test_bank_generate_uses_each_class_generator():
    bank = GeneratorBank()
    for c in (2, 5):
        bank.add(c, small_generator(seed=c))
    labels = torch.tensor([5, 2, 5, 2, 2])
    content = torch.randn(5, 4, 2, 2)
    style = torch.randn(5, 4, 2, 2)
    out = bank.generate(content, style, labels)
    assert out.shape == content.shape
    with torch.no_grad():
        for c in (2, 5):
            rows = labels == c
            expected = bank[c](content[rows], style[rows])
            assert torch.allclose(out[rows], expected)
    assert not out.requires_grad


def test_bank_generate_needs_a_generator_per_label():
    bank = GeneratorBank()
    bank.add(0, small_generator())
    content = torch.randn(2, 4, 2, 2)
    with pytest.raises(KeyError):
        bank.generate(content, content, torch.tensor([0, 1]))


def test_bank_nbytes_counts_parameters_and_buffers():
    bank = GeneratorBank()
    assert bank.nbytes() == 0
    generators = [small_generator(seed=s) for s in range(2)]
    for c, generator in enumerate(generators):
        bank.add(c, generator)
    expected = 0
    for generator in generators:
        for t in [*generator.parameters(), *generator.buffers()]:
            expected += t.numel() * t.element_size()
    # each BatchNorm holds an int64 counter besides its float statistics
    assert any(b.dtype == torch.int64 for b in generators[0].buffers())
    assert bank.nbytes() == expected


# --------------------------------------------------------------- fit_generator


@pytest.mark.parametrize("training", [True, False])
def test_fit_generator_leaves_the_model_untouched(fitted_model, training):
    model = fitted_model.train(training)
    before = snapshot(model)
    torch.manual_seed(0)
    generator, losses = fit_generator(
        model,
        1,
        random_maps(12, seed=1),
        random_maps(4, seed=2),
        random_maps(20, seed=3),
        small_config(epochs=2),
    )
    assert_unchanged(model, before)
    assert not generator.training
    assert set(losses) == {"ce", "sc", "sdc", "cycle", "loss"}
    assert losses["loss"] == pytest.approx(
        losses["ce"] + losses["sc"] + losses["sdc"] + losses["cycle"]
    )
    content = random_maps(3, seed=4)
    with torch.no_grad():
        out = generator(content, random_maps(3, seed=5))
    assert out.shape == content.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("ablation", "parts"),
    [
        ("no_generator", {"ce"}),
        ("sc", {"ce", "sc"}),
        ("sc_sdc", {"ce", "sc", "sdc"}),
        ("full", {"ce", "sc", "sdc", "cycle"}),
    ],
)
def test_fit_generator_losses_follow_the_ablation(fitted_model, ablation, parts):
    torch.manual_seed(0)
    _, losses = fit_generator(
        fitted_model,
        0,
        random_maps(8, seed=1),
        random_maps(2, seed=2),
        random_maps(8, seed=3),
        small_config(epochs=1, ablation=ablation),
    )
    assert set(losses) == parts | {"loss"}


def test_fit_generator_learns_to_be_classified_as_its_class(fitted_model):
    model = fitted_model.eval()
    real = random_maps(16, seed=1)
    config = small_config(epochs=100, lr=0.05, ablation="no_generator")
    torch.manual_seed(0)
    generator, losses = fit_generator(
        model, 1, real, real[:4], random_maps(16, seed=3), config
    )
    with torch.no_grad():
        mixes = generator(real[:4].repeat(4, 1, 1, 1), random_maps(16, seed=4))
        predicted = model.logits_of_map(mixes).argmax(dim=1)
    assert (predicted == 1).float().mean() > 0.9, losses


def test_fit_generator_raises_on_nan_maps(fitted_model):
    model = fitted_model.train()
    before = snapshot(model)
    real = random_maps(8, seed=1)
    real[:, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="experience 3, class 1"):
        fit_generator(
            model,
            1,
            real,
            random_maps(4, seed=2),
            random_maps(8, seed=3),
            small_config(epochs=1),
            experience=3,
        )
    assert_unchanged(model, before)


def test_fit_generator_raises_when_a_loss_becomes_nan(fitted_model, monkeypatch):
    def nan_loss(**kwargs):
        total = kwargs["logits"].sum() * float("nan")
        return total, {"ce": float("nan")}

    monkeypatch.setattr(fitting_module, "generator_loss", nan_loss)
    with pytest.raises(NonFiniteLossError, match="class 4"):
        fit_generator(
            fitted_model,
            4,
            random_maps(4, seed=1),
            random_maps(2, seed=2),
            random_maps(4, seed=3),
            small_config(epochs=1),
        )


# --------------------------------------------------- stacked and fit together


def test_stacked_generators_compute_what_each_generator_does():
    generators = [small_generator(seed=s).eval() for s in range(3)]
    stacked = StackedGenerators(generators).eval()
    content, style = torch.randn(3, 5, 4, 2, 2), torch.randn(3, 5, 4, 2, 2)
    with torch.no_grad():
        out = stacked(content, style)
        for k, generator in enumerate(generators):
            assert torch.allclose(out[k], generator(content[k], style[k]), atol=1e-6)
    for original, back in zip(generators, stacked.unstack()):
        for (name, a), b in zip(
            original.state_dict().items(), back.state_dict().values()
        ):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("ablation", ["sc", "full"])
def test_fitting_together_gives_the_generators_of_fitting_one_by_one(
    fitted_model, ablation
):
    """Same initial generators and batches: same fitted generators."""
    import copy

    from avalanche_imaginer.fitting import ClassMaps, fit_generators

    classes = (0, 1)
    maps = {
        c: ClassMaps(
            random_maps(20, 10 * c), random_maps(4, 10 * c + 1), random_maps(9, 3)
        )
        for c in classes
    }
    # a low clipping norm, so that per-generator clipping is exercised
    config = small_config(epochs=3, ablation=ablation, clip_norm=0.05, batch_size=8)
    initial = {c: small_generator(CHANNELS, seed=c) for c in classes}

    def rngs():
        return {c: torch.Generator().manual_seed(100 + c) for c in classes}

    one_by_one = {
        c: fit_generator(
            fitted_model,
            c,
            maps[c].real,
            maps[c].exemplars,
            maps[c].unlabeled,
            config,
            initial=copy.deepcopy(initial[c]),
            rng=rngs()[c],
        )
        for c in classes
    }
    together = fit_generators(
        fitted_model, maps, config, initial=copy.deepcopy(initial), rngs=rngs()
    )
    for c in classes:
        alone, losses = one_by_one[c]
        stacked, stacked_losses = together[c]
        assert stacked_losses == pytest.approx(losses, rel=1e-4, abs=1e-5)
        for name, value in alone.state_dict().items():
            other = stacked.state_dict()[name]
            assert torch.allclose(value.float(), other.float(), atol=1e-4), name
        assert not stacked.training


def test_fitting_together_names_the_class_whose_loss_is_nan(fitted_model):
    from avalanche_imaginer.fitting import ClassMaps, fit_generators

    bad = random_maps(8, 2)
    bad[:, 0, 0, 0] = float("nan")
    maps = {
        0: ClassMaps(random_maps(8, 1), random_maps(2, 3), random_maps(8, 4)),
        1: ClassMaps(bad, random_maps(2, 5), random_maps(8, 6)),
    }
    with pytest.raises(NonFiniteLossError, match="experience 2, class 1"):
        fit_generators(fitted_model, maps, small_config(epochs=1), experience=2)


# -------------------------------------------------------------- memory format


def _channels_last(module: nn.Module) -> bool:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return bool(convs) and all(
        m.weight.is_contiguous(memory_format=torch.channels_last)
        and not m.weight.is_contiguous()
        for m in convs
        if m.kernel_size != (1, 1)
    )


@pytest.mark.parametrize("together", [False, True])
def test_generators_follow_the_memory_format_of_their_maps(fitted_model, together):
    """Maps of a channels-last model give channels-last generators, and the
    same fitting as contiguous maps, up to float rounding."""
    from avalanche_imaginer.fitting import ClassMaps, fit_generators

    def maps(channels_last: bool) -> ClassMaps:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return ClassMaps(
            *(
                random_maps(n, s).contiguous(memory_format=fmt)
                for n, s in ((12, 1), (4, 2), (20, 3))
            )
        )

    config = small_config(epochs=2)
    fitted = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        if together:
            ((generator, _),) = fit_generators(
                fitted_model, {1: maps(channels_last)}, config
            ).values()
        else:
            m = maps(channels_last)
            generator, _ = fit_generator(
                fitted_model, 1, m.real, m.exemplars, m.unlabeled, config
            )
        fitted[channels_last] = generator
    assert _channels_last(fitted[True]) and not _channels_last(fitted[False])
    content, style = random_maps(3, 4), random_maps(3, 5)
    with torch.no_grad():
        out = fitted[True](
            content.contiguous(memory_format=torch.channels_last),
            style.contiguous(memory_format=torch.channels_last),
        )
        assert torch.allclose(out, fitted[False](content, style), atol=1e-4)
