"""End-to-end behaviour of LUCIR and ImagineStrategy on the digits stream."""

from __future__ import annotations

import io

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.logging import TextLogger
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from conftest import seed_everything

from avalanche_imaginer import LUCIR, FeatureGenerator, ImagineStrategy

STREAM_ACC = "Top1_Acc_Stream/eval_phase/test_stream/Task000"


def quiet_evaluator(stream: io.StringIO | None = None) -> EvaluationPlugin:
    loggers = [TextLogger(stream)] if stream is not None else []
    return EvaluationPlugin(
        accuracy_metrics(stream=True, experience=True),
        loss_metrics(epoch=True),
        loggers=loggers,
    )


def sgd(model, lr=0.05):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def average_incremental_accuracy(strategy, benchmark) -> float:
    """Train on every experience; mean accuracy on the classes seen so far."""
    accs = []
    for t, experience in enumerate(benchmark.train_stream):
        strategy.train(experience)
        results = strategy.eval(benchmark.test_stream[: t + 1])
        accs.append(results[STREAM_ACC])
    return sum(accs) / len(accs)


def make_imagine(model, unlabeled, **kwargs) -> ImagineStrategy:
    defaults = dict(
        memory_size=60,
        generator_epochs=3,
        train_mb_size=32,
        train_epochs=3,
        eval_mb_size=256,
        progress=False,
        evaluator=quiet_evaluator(),
    )
    defaults.update(kwargs)
    return ImagineStrategy(
        model=model, optimizer=sgd(model), unlabeled_data=unlabeled, **defaults
    )


def make_lucir(model, **kwargs) -> LUCIR:
    defaults = dict(
        memory_size=60, train_mb_size=32, train_epochs=1, evaluator=quiet_evaluator()
    )
    defaults.update(kwargs)
    return LUCIR(model=model, optimizer=sgd(model), **defaults)


def test_lucir_beats_naive_by_15_points(digits_stream, model_builder):
    seed_everything()
    lucir = make_lucir(model_builder(), train_epochs=4)
    lucir_acc = average_incremental_accuracy(lucir, digits_stream)

    seed_everything()
    from avalanche.models import IncrementalClassifier

    probe = model_builder()
    naive_model = model_builder(
        classifier=IncrementalClassifier(probe.feature_size, initial_out_features=2)
    )
    naive = Naive(
        model=naive_model,
        optimizer=sgd(naive_model),
        train_mb_size=32,
        train_epochs=4,
        evaluator=quiet_evaluator(),
    )
    naive_acc = average_incremental_accuracy(naive, digits_stream)
    assert lucir_acc > naive_acc + 0.15, (lucir_acc, naive_acc)


def test_lucir_runs_with_nme_and_text_logger(digits_stream, model_builder):
    seed_everything()
    model = model_builder()
    log = io.StringIO()
    strategy = make_lucir(
        model,
        memory_size=40,
        finetuning_epochs=1,
        eval_classifier="nme",
        evaluator=quiet_evaluator(log),
    )
    for experience in digits_stream.train_stream[:2]:
        strategy.train(experience)
    results = strategy.eval(digits_stream.test_stream[:2])
    assert results[STREAM_ACC] > 0.5  # 4 classes: chance is 0.25
    assert "Top1_Acc_Stream" in log.getvalue()
    assert model.classifier.out_features == 4


def test_imagine_end_to_end(digits_stream, model_builder, unlabeled_patches):
    seed_everything()
    model = model_builder()
    strategy = make_imagine(model, unlabeled_patches)
    counts, exemplar_rows = [], []

    def record(strategy, **kwargs):
        old = torch.tensor(
            [c for c in strategy.generators], device=strategy.mb_y.device
        )
        exemplar_rows.append(int(torch.isin(strategy.mb_y, old).sum()))
        counts.append(strategy.replay.last_count)

    accs = []
    seen = []
    snapshots = {}
    for t, experience in enumerate(digits_stream.train_stream):
        strategy.replay.after_backward = record
        strategy.train(experience)
        seen += experience.classes_in_this_experience
        # A generator for every class seen so far, none inside the model.
        assert sorted(strategy.generators) == sorted(seen)
        generator_params = {
            id(p) for g in strategy.generators.values() for p in g.parameters()
        }
        assert not generator_params & {id(p) for p in strategy.model.parameters()}
        assert not any(
            isinstance(m, FeatureGenerator) for m in strategy.model.modules()
        )
        # Generators fitted earlier are unchanged by later experiences.
        for c, state in snapshots.items():
            now = strategy.generators[c].state_dict()
            assert all(torch.equal(state[k], now[k]) for k in state)
        for c in experience.classes_in_this_experience:
            snapshots[c] = {
                k: v.clone() for k, v in strategy.generators[c].state_dict().items()
            }
        results = strategy.eval(digits_stream.test_stream[: t + 1])
        accs.append(results[STREAM_ACC])

    # Every batch got n_generated counterparts per exemplar, and some had them.
    assert counts == [2 * e for e in exemplar_rows]
    assert sum(counts) > 0
    # Far above chance on all ten classes (chance: 0.10).
    assert accs[-1] > 0.45, accs
    assert sum(accs) / len(accs) > 0.6, accs


def test_fitting_leaves_model_unchanged(
    digits_stream, model_builder, unlabeled_patches
):
    seed_everything()
    model = model_builder()
    strategy = make_imagine(model, unlabeled_patches, generator_epochs=2)
    captured = {}

    class Capture:
        """Records the model right before and after the fitting plugin runs."""

        def __init__(self, key):
            self.key = key

        def __call__(self, strategy, **kwargs):
            captured[self.key] = (
                {k: v.clone() for k, v in strategy.model.state_dict().items()},
                strategy.model.training,
            )

    fitting = strategy.fitting
    original = fitting.after_training_exp

    def wrapped(strategy, **kwargs):
        Capture("before")(strategy)
        original(strategy, **kwargs)
        Capture("after")(strategy)

    fitting.after_training_exp = wrapped
    strategy.train(digits_stream.train_stream[0])
    (before, mode_before), (after, mode_after) = captured["before"], captured["after"]
    assert len(strategy.generators) == 2
    assert mode_before == mode_after
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_no_generator_ablation_generates_nothing(
    digits_stream, model_builder, unlabeled_patches
):
    seed_everything()
    model = model_builder()
    strategy = make_imagine(
        model, unlabeled_patches, ablation="no_generator", train_epochs=1
    )
    counts = []
    strategy.replay.after_backward = lambda s, **kw: counts.append(s.replay.last_count)
    for experience in digits_stream.train_stream[:2]:
        strategy.train(experience)
    assert len(strategy.generators) == 0
    assert counts and not any(counts)


def test_copies_ablation_replays_exemplar_maps_without_generators(
    digits_stream, model_builder, unlabeled_patches
):
    seed_everything()
    model = model_builder()
    strategy = make_imagine(
        model, unlabeled_patches, ablation="copies", train_epochs=1, n_generated=3
    )
    seen = []

    def record(s, **kw):
        exemplars = torch.isin(s.mb_y, torch.tensor(s.memory.classes)).sum()
        seen.append((s.replay.last_count, int(exemplars)))

    strategy.replay.after_backward = record
    for experience in digits_stream.train_stream[:2]:
        strategy.train(experience)
    assert len(strategy.generators) == 0
    assert strategy.fitting.fit_seconds == {}
    # the second experience's batches: 3 copies of each exemplar they hold
    second = seen[len(seen) // 2 :]
    assert any(count for count, _ in second)
    assert all(count == 3 * exemplars for count, exemplars in second)
    assert strategy.replay.generation_seconds == 0.0


@pytest.mark.parametrize("ablation", ["sc", "sc_sdc"])
def test_generator_ablations_run(
    ablation, digits_stream, model_builder, unlabeled_patches
):
    seed_everything()
    model = model_builder()
    strategy = make_imagine(
        model,
        unlabeled_patches,
        ablation=ablation,
        train_epochs=1,
        generator_epochs=1,
    )
    for experience in digits_stream.train_stream[:2]:
        strategy.train(experience)
    assert sorted(strategy.generators) == sorted(
        digits_stream.train_stream[0].classes_in_this_experience
        + digits_stream.train_stream[1].classes_in_this_experience
    )
    parts = strategy.fitting.fit_losses
    assert all(torch.isfinite(torch.tensor(v["loss"])) for v in parts.values())


def test_compact_generators_train_and_replay_end_to_end(
    digits_stream, model_builder, unlabeled_patches
):
    seed_everything()
    model = model_builder()
    # 3 epochs (make_imagine's): with 2 this tiny model is still near chance on
    # the first experience, and the accuracy check below would test nothing
    strategy = make_imagine(model, unlabeled_patches, generator_design="compact")
    counts = []
    strategy.replay.after_backward = lambda s, **kw: counts.append(s.replay.last_count)
    seen = []
    for t, experience in enumerate(digits_stream.train_stream[:3]):
        strategy.train(experience)
        seen += experience.classes_in_this_experience
        assert sorted(strategy.generators) == sorted(seen)
        results = strategy.eval(digits_stream.test_stream[: t + 1])
    assert sum(counts) > 0, "exemplars got imagined counterparts"
    assert results[STREAM_ACC] > 0.4  # 6 classes: chance is 0.17
    assert strategy.generator_config.design == "compact"
    one_generator = FeatureGenerator(
        model.lower(torch.zeros(1, 1, 8, 8)).shape[1], hidden=128, n_blocks=2
    )
    per_class_bytes = len(seen) * sum(
        t.numel() * t.element_size()
        for t in [*one_generator.parameters(), *one_generator.buffers()]
    )
    assert strategy.generators.nbytes() < per_class_bytes / 5
    assert not any(
        isinstance(m, type(strategy.generators.shared))
        for m in strategy.model.modules()
    )


def test_generators_fitted_together_in_a_run(
    digits_stream, model_builder, unlabeled_patches
):
    from avalanche_imaginer import GeneratorConfig

    seed_everything()
    model = model_builder()
    strategy = make_imagine(
        model,
        unlabeled_patches,
        generator=GeneratorConfig(fit_together=True),
        generator_epochs=1,
        train_epochs=1,
    )
    for experience in digits_stream.train_stream[:2]:
        strategy.train(experience)
    assert sorted(strategy.generators) == [0, 1, 2, 3]
    assert all(isinstance(g, FeatureGenerator) for g in strategy.generators.values())
    assert set(strategy.fitting.fit_seconds) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "options",
    [
        {"generated_bn": "train"},
        {"generated_bn": "separate"},
        {"margin_weight": 0.0, "imprint_weights": False},
        {"lower_lr_factor": 0.1},
        {"unlabeled_mining": True},
        {"replay_weighting": "sample"},
        {"eval_classifier": "nme"},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_each_imagine_option_runs_end_to_end(
    options, digits_stream, model_builder, unlabeled_patches
):
    seed_everything()
    model = model_builder()
    strategy = make_imagine(
        model, unlabeled_patches, train_epochs=1, generator_epochs=1, **options
    )
    counts = []
    strategy.replay.after_backward = lambda s, **kw: counts.append(s.replay.last_count)
    for t, experience in enumerate(digits_stream.train_stream[:2]):
        strategy.train(experience)
        results = strategy.eval(digits_stream.test_stream[: t + 1])
    assert sum(counts) > 0
    assert sorted(strategy.generators) == [0, 1, 2, 3]
    assert 0.0 <= results[STREAM_ACC] <= 1.0


def test_separate_statistics_leave_the_real_ones_alone(
    digits_stream, model_builder, unlabeled_patches
):
    """With generated_bn='separate' the running statistics real inputs are
    evaluated with are those of real batches only: a hook sees them unchanged
    by the generated forward."""
    seed_everything()
    model = model_builder()
    strategy = make_imagine(
        model,
        unlabeled_patches,
        train_epochs=1,
        generator_epochs=1,
        generated_bn="separate",
    )
    bn = next(m for m in model.upper.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []

    class Around:
        def before_backward(self, strategy, **kwargs):
            seen.append(("before", bn.running_mean.clone()))

        def after_backward(self, strategy, **kwargs):
            seen.append(("after", bn.running_mean.clone()))

    plugin = Around()
    replay = strategy.replay
    original = replay.before_backward

    def wrapped(strategy, **kwargs):
        plugin.before_backward(strategy)
        original(strategy, **kwargs)
        plugin.after_backward(strategy)

    replay.before_backward = wrapped
    for experience in digits_stream.train_stream[:2]:
        strategy.train(experience)
    assert replay.last_count or replay.total_generated > 0
    pairs = list(zip(seen[::2], seen[1::2]))
    assert pairs and all(torch.equal(a[1], b[1]) for a, b in pairs)
    own = replay._generated_stats
    assert own is not None and not torch.equal(own[0]["running_mean"], bn.running_mean)


@pytest.mark.parametrize("cls", ["lucir", "imagine"])
def test_mixed_precision_runs_the_network_in_bfloat16(
    cls, digits_stream, model_builder, unlabeled_patches
):
    """bfloat16 autocast (here on the CPU, with its warning) for the network's
    passes; features, logits and losses stay in float32."""
    seed_everything()
    model = model_builder()
    with pytest.warns(UserWarning, match="mixed_precision=True on device cpu"):
        if cls == "imagine":
            strategy = make_imagine(
                model,
                unlabeled_patches,
                train_epochs=1,
                generator_epochs=1,
                mixed_precision=True,
            )
        else:
            strategy = make_lucir(model, mixed_precision=True)
    seen = []

    class Watch:
        def before_backward(self, strategy, **kwargs):
            seen.append(
                (strategy.mb_maps.dtype, strategy.mb_features.dtype, strategy.loss)
            )

    strategy.plugins.append(Watch())
    for t, experience in enumerate(digits_stream.train_stream[:2]):
        strategy.train(experience)
        results = strategy.eval(digits_stream.test_stream[: t + 1])
    assert {(maps, features) for maps, features, _ in seen} == {
        (torch.bfloat16, torch.float32)
    }
    assert all(loss.dtype == torch.float32 for _, _, loss in seen)
    assert 0.0 <= results[STREAM_ACC] <= 1.0
    if cls == "imagine":
        assert strategy.replay.total_generated > 0
        assert sorted(strategy.generators) == [0, 1, 2, 3]
