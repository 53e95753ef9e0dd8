"""Generator diagnostics: values by hand on small tensors, and the plugin in a run."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_digits_stream, make_unlabeled_patches, small_resnet
from torch import nn

from avalanche_imaginer import CosineClassifier, ImagineStrategy, SplitModel
from avalanche_imaginer.diagnostics import generator_diagnostics, map_drift


def test_map_drift_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert map_drift(a, a * 3) == pytest.approx(0.0)
    # second row turned by 90 degrees: (0 + 1) / 2
    assert map_drift(a, torch.tensor([[1.0, 0.0], [5.0, 0.0]])) == pytest.approx(0.5)
    assert map_drift(a, -a) == pytest.approx(2.0)
    # rows beyond the shorter one (exemplars dropped by re-balancing) are ignored
    assert map_drift(a[:1], a) == pytest.approx(0.0)


class Doubler(nn.Module):
    """A stand-in generator: twice the content, whatever the style."""

    def forward(self, content, style):
        return 2 * content


def gap_model() -> SplitModel:
    """Identity lower part, GAP upper part, a cosine head over 2 classes."""
    model = SplitModel(
        nn.Identity(),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        None,
        feature_size=2,
    )
    clf: CosineClassifier = model.classifier
    clf.weight = nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    clf.active_units = torch.ones(2, dtype=torch.bool)
    clf.frozen_mask = torch.zeros(2, dtype=torch.bool)
    return model


def test_generator_diagnostics_by_hand():
    model = gap_model()
    # (3, 2, 1, 2) maps; GAP gives the mean of each channel's two values.
    content = torch.tensor(
        [
            [[[1.0, 3.0]], [[0.0, 0.0]]],  # GAP (2, 0): class 0
            [[[0.0, 0.0]], [[1.0, 1.0]]],  # GAP (0, 1): class 1
            [[[2.0, 2.0]], [[1.0, 1.0]]],  # GAP (2, 1): class 0
        ]
    )
    real = torch.tensor([[[[1.0, 1.0]], [[1.0, 1.0]]]])  # GAP (1, 1)
    reference = torch.tensor([[2.0, 0.0], [1.0, 0.0], [4.0, 2.0]])
    d = generator_diagnostics(
        model,
        Doubler(),
        0,
        content=content,
        style=torch.zeros_like(content),
        real=real,
        experience=3,
        fitted_in=1,
        reference=reference,
    )
    generated = 2 * content
    assert (d.experience, d.class_id, d.fitted_in) == (3, 0, 1)
    assert d.generated_mean == pytest.approx(float(generated.mean()))
    assert d.generated_std == pytest.approx(float(generated.std()))
    assert d.real_mean == pytest.approx(1.0)
    assert d.real_std == pytest.approx(0.0)
    assert math.isinf(d.std_ratio)
    assert d.classified == pytest.approx(2 / 3)
    # mean generated features (8/3, 4/3) vs real (1, 1)
    expected = (8 / 3 + 4 / 3) / (math.hypot(8 / 3, 4 / 3) * math.sqrt(2))
    assert d.cosine_to_class_mean == pytest.approx(expected)
    # pooled content (2,0), (0,1), (2,1) vs reference: cos 1, 0, 1
    assert d.drift == pytest.approx(1 / 3)


def test_generator_diagnostics_without_reference_reports_no_drift():
    model = gap_model()
    maps = torch.randn(4, 2, 3, 3)
    d = generator_diagnostics(
        model,
        Doubler(),
        1,
        content=maps,
        style=maps,
        real=maps,
        experience=0,
        fitted_in=0,
    )
    assert d.drift == 0.0
    assert d.std_ratio == pytest.approx(2.0)


def build(**overrides) -> ImagineStrategy:
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.determinism.rng_manager import RNGManager
    from avalanche.training.plugins import EvaluationPlugin

    RNGManager.set_random_seeds(0)
    model = small_resnet()
    kwargs = dict(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        unlabeled_data=make_unlabeled_patches(),
        memory_size=40,
        generator_epochs=1,
        train_mb_size=32,
        train_epochs=1,
        progress=False,
        device="cpu",
        evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]),
    )
    kwargs.update(overrides)
    return ImagineStrategy(**kwargs)


def run(strategy, n_experiences=3) -> list[float]:
    benchmark = make_digits_stream()
    accs = []
    for t in range(n_experiences):
        strategy.train(benchmark.train_stream[t])
        results = strategy.eval(benchmark.test_stream[: t + 1])
        accs.append(results["Top1_Acc_Stream/eval_phase/test_stream/Task000"])
    return accs


def test_diagnostics_plugin_measures_every_generator_after_each_experience():
    strategy = build()
    run(strategy)
    records = strategy.diagnostics.records
    # after experience t: the 2 * (t + 1) classes fitted so far
    assert [(r.experience, r.class_id) for r in records] == [
        (t, c) for t in range(3) for c in range(2 * (t + 1))
    ]
    for r in records:
        assert r.fitted_in == r.class_id // 2
        assert 0.0 <= r.classified <= 1.0
        assert -1.0 <= r.cosine_to_class_mean <= 1.0
        assert r.generated_std > 0 and r.real_std > 0
    at_fit = [r for r in records if r.experience == r.fitted_in]
    assert all(r.drift == pytest.approx(0.0, abs=1e-6) for r in at_fit)
    later = [r for r in records if r.experience > r.fitted_in]
    assert any(r.drift > 0 for r in later), "the lower part trains on: it drifts"
    # published to the evaluator, for the loggers
    metrics = strategy.evaluator.get_last_metrics()
    assert "Generator_classified/train_phase/Class005" in metrics
    mean = sum(r.classified for r in records if r.experience == 2) / 6
    assert metrics["Generator_classified/train_phase/mean"] == pytest.approx(mean)


def test_diagnostics_do_not_change_the_run():
    assert run(build(diagnostics=True), 2) == run(build(diagnostics=False), 2)


def test_no_generator_ablation_has_nothing_to_diagnose():
    strategy = build(ablation="no_generator")
    run(strategy, 2)
    assert strategy.diagnostics.records == []
