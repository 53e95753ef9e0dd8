"""Herding, the class-balanced exemplar memory and the NME classifier."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from avalanche_imaginer import ExemplarMemory, herding_order

SAMPLE_BYTES = 1 * 8 * 8 * 4  # one float32 digit of 1 x 8 x 8


def inputs_of(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def labels_of(dataset) -> list[int]:
    return [int(dataset[i][1]) for i in range(len(dataset))]


@pytest.fixture
def model(model_builder):
    return model_builder(width=4).eval()


def update(memory, model, exp) -> None:
    memory.update(
        model,
        exp.dataset,
        sorted(exp.classes_in_this_experience),
        device="cpu",
        batch_size=64,
    )


# ---------------------------------------------------------------------- herding


def test_herding_order_is_a_deterministic_prefix_of_a_permutation():
    features = torch.randn(20, 5, generator=torch.Generator().manual_seed(0))
    order = herding_order(features, 7)
    assert len(order) == 7
    assert len(set(order)) == 7
    assert all(0 <= i < 20 for i in order)
    assert herding_order(features.clone(), 7) == order
    # greedy: choosing fewer gives the start of the same order
    assert herding_order(features, 4) == order[:4]
    full = herding_order(features, 20)
    assert sorted(full) == list(range(20))
    assert full[:7] == order
    assert herding_order(features, 50) == full, "n is capped at the class size"
    assert herding_order(features, 0) == []


def test_herding_picks_first_the_sample_nearest_to_the_mean():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [10.0, 1.0]])
    unit = F.normalize(features, dim=1)
    nearest = int((unit - unit.mean(dim=0)).norm(dim=1).argmin())
    assert herding_order(features, 1) == [nearest] == [2]
    # the second pick brings the mean of the two chosen nearest to the target
    second = herding_order(features, 2)[1]
    distances = [
        ((unit[2] + unit[i]) / 2 - unit.mean(dim=0)).norm().item() if i != 2 else 9
        for i in range(4)
    ]
    assert second == min(range(4), key=distances.__getitem__)


# ----------------------------------------------------------------------- memory


def test_memory_stays_within_budget_and_rebalances(model, digits_benchmark):
    exp0, exp1 = digits_benchmark.train_stream[:2]
    memory = ExemplarMemory(20)
    update(memory, model, exp0)
    assert memory.classes == [0, 1]
    assert [len(memory.exemplars_of(c)) for c in (0, 1)] == [10, 10]
    first_class0 = inputs_of(memory.exemplars_of(0))

    update(memory, model, exp1)
    assert memory.classes == [0, 1, 2, 3]
    assert len(memory) == 20
    assert [len(memory.exemplars_of(c)) for c in range(4)] == [5] * 4
    # old classes keep the first exemplars that herding chose
    assert torch.equal(inputs_of(memory.exemplars_of(0)), first_class0[:5])
    for c in range(4):
        assert labels_of(memory.exemplars_of(c)) == [c] * 5


def test_memory_budget_that_does_not_divide(model, digits_benchmark):
    memory = ExemplarMemory(7)
    for exp in digits_benchmark.train_stream[:2]:
        update(memory, model, exp)
    assert memory.quota(4) == 1
    assert len(memory) == 4 <= 7


def test_memory_with_a_fixed_number_per_class(model, digits_benchmark):
    memory = ExemplarMemory(5, per_class=3)
    for exp in digits_benchmark.train_stream[:2]:
        update(memory, model, exp)
    assert [len(memory.exemplars_of(c)) for c in range(4)] == [3] * 4
    assert len(memory) == 12, "per_class ignores memory_size"


def test_random_selection_is_seeded_per_class(model, digits_benchmark):
    exp0 = digits_benchmark.train_stream[0]
    first, second = ExemplarMemory(10, herding=False), ExemplarMemory(10, herding=False)
    update(first, model, exp0)
    update(second, model, exp0)
    for c in (0, 1):
        assert torch.equal(
            inputs_of(first.exemplars_of(c)), inputs_of(second.exemplars_of(c))
        )
    herded = ExemplarMemory(10)
    update(herded, model, exp0)
    assert not torch.equal(
        inputs_of(first.exemplars_of(0)), inputs_of(herded.exemplars_of(0))
    )


def test_memory_too_small_for_one_exemplar_per_class(model, digits_benchmark):
    memory = ExemplarMemory(1)
    with pytest.warns(UserWarning, match="memory_size=1"):
        update(memory, model, digits_benchmark.train_stream[0])
    assert len(memory) == 0
    assert memory.dataset() is None


def test_memory_dataset_gives_the_exemplars(model, digits_benchmark):
    memory = ExemplarMemory(6)
    assert memory.dataset() is None
    for exp in digits_benchmark.train_stream[:2]:
        update(memory, model, exp)
    data = memory.dataset()
    assert len(data) == len(memory) == 4
    assert labels_of(data) == [0, 1, 2, 3]
    expected = torch.cat([inputs_of(memory.exemplars_of(c)) for c in range(4)])
    assert torch.equal(inputs_of(data), expected)
    assert torch.equal(inputs_of(memory.dataset(train=False)), expected)


def test_memory_nbytes(model, digits_benchmark):
    memory = ExemplarMemory(10)
    assert memory.nbytes() == 0
    update(memory, model, digits_benchmark.train_stream[0])
    x = memory.exemplars_of(0)[0][0]
    assert x.numel() * x.element_size() == SAMPLE_BYTES
    assert memory.nbytes() == 10 * SAMPLE_BYTES


def test_memory_update_with_a_class_missing_from_the_data(model, digits_benchmark):
    memory = ExemplarMemory(10)
    with pytest.raises(ValueError, match="class 9"):
        memory.update(
            model, digits_benchmark.train_stream[0].dataset, [0, 9], device="cpu"
        )


def test_memory_update_keeps_the_model_mode(model_builder, digits_benchmark):
    model = model_builder(width=4).train()
    update(ExemplarMemory(4), model, digits_benchmark.train_stream[0])
    assert model.training
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"memory_size": -1}, "memory_size"), ({"per_class": -2}, "per_class")],
)
def test_memory_rejects_negative_sizes(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ExemplarMemory(**kwargs)


# -------------------------------------------------------------------------- NME


@pytest.mark.parametrize("flip", [False, True])
def test_class_means_and_nme(model, digits_benchmark, flip):
    memory = ExemplarMemory(12, flip_means=flip)
    for exp in digits_benchmark.train_stream[:2]:
        update(memory, model, exp)
    memory.compute_class_means(model, device="cpu")
    assert sorted(memory.class_means) == [0, 1, 2, 3]
    for mean in memory.class_means.values():
        assert mean.shape == (model.feature_size,)
        assert mean.norm().item() == pytest.approx(1.0, abs=1e-5)

    means = torch.stack([memory.class_means[c] for c in range(4)])
    scores = memory.nme_scores(3 * means, n_outputs=6, mask_value=-50.0)
    assert scores.shape == (4, 6)
    assert scores.argmax(dim=1).tolist() == [0, 1, 2, 3]
    assert (scores[:, 4:] == -50.0).all(), "classes without a mean are masked"
    assert torch.allclose(scores.diagonal(), torch.ones(4), atol=1e-5)


def test_class_means_match_the_exemplar_features(model, digits_benchmark):
    memory = ExemplarMemory(4)
    update(memory, model, digits_benchmark.train_stream[0])
    memory.compute_class_means(model, device="cpu")
    with torch.no_grad():
        feats = model.features(inputs_of(memory.exemplars_of(1)))
    expected = F.normalize(F.normalize(feats, dim=1).mean(dim=0), dim=0)
    assert torch.allclose(memory.class_means[1], expected, atol=1e-5)


def test_nme_needs_class_means():
    with pytest.raises(RuntimeError, match="class means"):
        ExemplarMemory(10).nme_scores(torch.randn(2, 4), n_outputs=3)
