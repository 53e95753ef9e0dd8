"""The compact design: one shared generator trunk and a small code per class."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from test_generator import CHANNELS, random_maps, small_config

from avalanche_imaginer import CompactGeneratorBank, ConditionalGenerator
from avalanche_imaginer.fitting import ClassMaps, fit_compact
from avalanche_imaginer.generator import parameter_bytes


def shared_generator(classes=(0, 1, 2), seed=0, **kwargs) -> ConditionalGenerator:
    torch.manual_seed(seed)
    generator = ConditionalGenerator(4, **{"hidden": 8, "n_blocks": 2, **kwargs})
    for c in classes:
        generator.add_class(c)
    return generator


def test_output_keeps_the_map_shape_and_codes_change_it():
    generator = shared_generator().eval()
    content, style = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    out = generator(content, style, 0)
    assert out.shape == content.shape
    with torch.no_grad():
        generator.code(1)[0, 1] += 1.0  # a shift after the first BatchNorm
    assert torch.equal(generator(content, style, 0), out)
    assert not torch.allclose(generator(content, style, 1), out)


def test_batched_generation_equals_one_call_per_class():
    bank = CompactGeneratorBank()
    generator = shared_generator(classes=(2, 5, 7))
    with torch.no_grad():  # distinct codes per class
        for c in (2, 5, 7):
            generator.code(c).add_(0.1 * c * torch.randn_like(generator.code(c)))
    bank.set_shared(generator)
    labels = torch.tensor([5, 2, 7, 5, 2, 2])
    content, style = torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3)
    out = bank.generate(content, style, labels)
    for c in (2, 5, 7):
        rows = labels == c
        with torch.no_grad():
            expected = bank[c](content[rows], style[rows])
        assert torch.allclose(out[rows], expected, atol=1e-6)
    assert not out.requires_grad
    with pytest.raises(KeyError, match=r"\[3\]"):
        bank.generate(content[:1], style[:1], torch.tensor([3]))


def test_bank_is_a_mapping_of_the_classes_with_a_code():
    bank = CompactGeneratorBank()
    assert len(bank) == 0 and list(bank) == [] and 0 not in bank
    bank.set_shared(shared_generator(classes=(4, 1)))
    assert list(bank) == [1, 4] and len(bank) == 2
    assert 4 in bank and 2 not in bank and "x" not in bank
    with pytest.raises(KeyError):
        bank[2]
    assert not any(p.requires_grad for p in bank.parameters())
    bank.train()
    assert not any(m.training for m in bank.modules())


def test_bytes_are_one_trunk_and_a_code_per_class():
    bank = CompactGeneratorBank()
    generator = shared_generator(classes=range(10), hidden=8, n_blocks=2)
    bank.set_shared(generator)
    trunk = copy.deepcopy(generator)
    for c in range(10):
        trunk.remove_class(c)
    code_bytes = 10 * 2 * 4 * 8 * 4  # classes x blocks x (2 scales, 2 shifts) x hidden
    assert bank.nbytes() == parameter_bytes(trunk) + code_bytes
    assert bank.nbytes() == parameter_bytes(generator)


@pytest.fixture
def model4(model_builder):
    model = model_builder(width=4)  # maps 16 x 2 x 2
    avalanche_model_adaptation(
        model, SimpleNamespace(classes_in_this_experience=[0, 1, 2, 3])
    )
    return model.eval()


def class_maps(seed: int) -> ClassMaps:
    return ClassMaps(
        random_maps(8, seed), random_maps(3, seed + 1), random_maps(8, seed + 2)
    )


def test_first_fit_trains_trunk_and_codes_later_fits_only_new_codes(model4):
    torch.manual_seed(0)
    generator = ConditionalGenerator(CHANNELS, hidden=8, n_blocks=1)
    generator.add_class(0)
    generator.add_class(1)
    initial = copy.deepcopy(generator)
    config = small_config(epochs=2)
    losses = fit_compact(
        model4,
        generator,
        {0: class_maps(1), 1: class_maps(5)},
        config,
        train_trunk=True,
    )
    assert set(losses) == {0, 1} and set(losses[0]) == {
        "ce",
        "sc",
        "sdc",
        "cycle",
        "loss",
    }
    trunk_after_first = [p.clone() for p in generator.trunk_parameters()]
    changed = [
        not torch.equal(a, b)
        for a, b in zip(initial.trunk_parameters(), generator.trunk_parameters())
    ]
    assert any(changed), "the trunk is fitted on the first experience"
    assert not torch.equal(generator.code(0), initial.code(0))
    assert not generator.training and not any(
        p.requires_grad for p in generator.parameters()
    )

    code0 = generator.code(0).clone()
    buffers = [b.clone() for b in generator.buffers()]
    generator.add_class(2)
    new_initial = generator.code(2).clone()
    fit_compact(model4, generator, {2: class_maps(9)}, config, train_trunk=False)
    for before, after in zip(trunk_after_first, generator.trunk_parameters()):
        assert torch.equal(before, after), "the trunk stays frozen"
    for before, after in zip(buffers, generator.buffers()):
        assert torch.equal(before, after), "its BatchNorm statistics too"
    assert torch.equal(generator.code(0), code0), "old codes are untouched"
    assert not torch.equal(generator.code(2), new_initial)
