"""Checkpoint and resume, determinism, and errors met while training."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin
from conftest import make_digits_stream, make_unlabeled_patches, small_resnet
from torch.utils.data import TensorDataset

from avalanche_imaginer import LUCIR, ImagineStrategy, NonFiniteLossError

STREAM_ACC = "Top1_Acc_Stream/eval_phase/test_stream/Task000"
TESTS = Path(__file__).parent


def build(cls, **overrides):
    """A seeded strategy on the tiny digits model, as the resume script builds it."""
    RNGManager.set_random_seeds(0)
    model = small_resnet()
    kwargs = dict(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        memory_size=60,
        train_mb_size=32,
        train_epochs=2,
        device="cpu",
        evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]),
    )
    if cls is ImagineStrategy:
        kwargs.update(
            unlabeled_data=make_unlabeled_patches(), generator_epochs=2, progress=False
        )
    kwargs.update(overrides)
    return cls(**kwargs)


# A run in a fresh process: train from the checkpoint (if any) and stop after
# experience `stop`, saving a checkpoint there.
RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, {tests!r})
    from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint
    from conftest import make_digits_stream
    from test_reliability import build, STREAM_ACC
    import avalanche_imaginer

    torch.set_num_threads(1)
    cls = getattr(avalanche_imaginer, {cls!r})
    benchmark = make_digits_stream()
    strategy, start = maybe_load_checkpoint(build(cls), {path!r})
    accs = []
    for t in range(start, {stop}):
        strategy.train(benchmark.train_stream[t])
        accs.append(strategy.eval(benchmark.test_stream[: t + 1])[STREAM_ACC])
    save_checkpoint(strategy, {path!r})
    generators = sorted(getattr(strategy, "generators", {{}}))
    print(json.dumps({{"start": start, "accs": accs, "generators": generators}}))
    """
)


def run_in_new_process(cls_name: str, path: Path, stop: int) -> dict:
    script = RESUME_SCRIPT.format(
        tests=str(TESTS), cls=cls_name, path=str(path), stop=stop
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=TESTS,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def uninterrupted(cls, n_experiences: int) -> list[float]:
    strategy = build(cls)
    benchmark = make_digits_stream()
    accs = []
    for t in range(n_experiences):
        strategy.train(benchmark.train_stream[t])
        accs.append(strategy.eval(benchmark.test_stream[: t + 1])[STREAM_ACC])
    return accs


@pytest.mark.parametrize("cls", [ImagineStrategy, LUCIR])
def test_resume_in_a_new_process_gives_the_uninterrupted_accuracies(cls, tmp_path):
    path = tmp_path / "checkpoint.pkl"
    first = run_in_new_process(cls.__name__, path, stop=2)
    assert first["start"] == 0 and len(first["accs"]) == 2
    second = run_in_new_process(cls.__name__, path, stop=4)
    assert second["start"] == 2, "resumed after the saved experience"
    expected = uninterrupted(cls, 4)
    assert first["accs"] + second["accs"] == expected
    if cls is ImagineStrategy:
        # The generators fitted before the stop came back with the checkpoint.
        assert second["generators"] == list(range(8))


def test_checkpoint_keeps_memory_generators_old_model_and_optimizer(tmp_path):
    from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint

    strategy = build(ImagineStrategy)
    benchmark = make_digits_stream()
    for experience in benchmark.train_stream[:2]:
        strategy.train(experience)
    path = tmp_path / "checkpoint.pkl"
    save_checkpoint(strategy, path)
    loaded, start = maybe_load_checkpoint(build(ImagineStrategy), path)
    assert start == 2
    assert loaded.memory.classes == strategy.memory.classes == [0, 1, 2, 3]
    assert len(loaded.memory) == len(strategy.memory)
    assert sorted(loaded.generators) == [0, 1, 2, 3]
    for c in loaded.generators:
        saved, now = strategy.generators[c].state_dict(), loaded.generators[c]
        assert all(torch.equal(v, now.state_dict()[k]) for k, v in saved.items())
    for a, b in zip(strategy.old_model.parameters(), loaded.old_model.parameters()):
        assert torch.equal(a, b)
    assert loaded.model.classifier.out_features == 4
    # The optimizer steps the loaded model's parameters, with their momentum.
    params = {id(p) for p in loaded.model.parameters()}
    groups = loaded.optimizer.param_groups
    assert all(id(p) in params for g in groups for p in g["params"])
    assert loaded.optimizer.state_dict()["state"].keys() == (
        strategy.optimizer.state_dict()["state"].keys()
    )


# ------------------------------------------------------------------ determinism


@pytest.mark.parametrize("cls", [ImagineStrategy, LUCIR])
def test_same_seed_same_results(cls):
    first = uninterrupted(cls, 2)
    second = uninterrupted(cls, 2)
    assert first == second


def test_another_seed_other_results():
    first = uninterrupted(ImagineStrategy, 1)
    RNGManager.set_random_seeds(1)
    strategy = build(ImagineStrategy)
    RNGManager.set_random_seeds(1)  # build() seeds 0; draw the training with 1
    benchmark = make_digits_stream()
    strategy.train(benchmark.train_stream[0])
    other = strategy.eval(benchmark.test_stream[:1])[STREAM_ACC]
    assert [other] != first


# ------------------------------------------------------- errors while training


def test_stream_without_class_information_is_an_error():
    strategy = build(LUCIR)

    class Bare:
        """An experience with data but no classes_in_this_experience."""

        def __init__(self, experience):
            self.dataset = experience.dataset
            self.current_experience = 0
            self.origin_stream = experience.origin_stream

    experience = make_digits_stream().train_stream[0]
    with pytest.raises(ValueError, match="classes_in_this_experience"):
        strategy.train(Bare(experience))


def test_task_incremental_streams_are_not_supported():
    train, test = make_digits_stream().train_stream, None
    x = torch.cat([torch.stack([s[0] for s in e.dataset]) for e in train[:2]])
    y = torch.cat([torch.tensor([s[1] for s in e.dataset]) for e in train[:2]])
    test = TensorDataset(x, y)
    benchmark = nc_benchmark(
        TensorDataset(x, y),
        test,
        n_experiences=2,
        task_labels=True,
        seed=0,
        class_ids_from_zero_in_each_exp=True,
    )
    strategy = build(LUCIR)
    strategy.train(benchmark.train_stream[0])  # task 0 alone is accepted
    with pytest.raises(NotImplementedError, match="task-incremental"):
        strategy.train(benchmark.train_stream[1])


def test_memory_too_small_warns_before_the_first_step():
    strategy = build(ImagineStrategy, memory_size=3, train_epochs=1)
    benchmark = make_digits_stream()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen_at_first_step = []

        class FirstStep(SupervisedPlugin):
            def before_training_iteration(self, strategy, **kwargs):
                if strategy.clock.train_exp_iterations == 0:
                    seen_at_first_step.append(
                        [
                            str(w.message)
                            for w in caught
                            if "too small" in str(w.message)
                        ]
                    )

        strategy.plugins.append(FirstStep())
        strategy.train(benchmark.train_stream[0])  # 2 classes: 1 exemplar each
        strategy.train(benchmark.train_stream[1])  # 4 classes: none
    assert seen_at_first_step[0] == []
    assert len(seen_at_first_step[1]) == 1
    assert "memory_size=3 is too small" in seen_at_first_step[1][0]
    assert "4 classes seen after experience 1" in seen_at_first_step[1][0]


@pytest.mark.parametrize("cls", [ImagineStrategy, LUCIR])
def test_nan_training_loss_stops_before_the_update(cls):
    strategy = build(cls)
    snapshots = []

    class Snapshot(SupervisedPlugin):
        """The parameters at the first step, after the classifier has grown."""

        def before_forward(self, strategy, **kwargs):
            params = strategy.model.named_parameters()
            snapshots.append({k: v.detach().clone() for k, v in params})

    strategy.plugins.append(Snapshot())
    strategy._criterion = lambda *args: torch.tensor(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"loss became nan in experience 0"):
        strategy.train(make_digits_stream().train_stream[0])
    assert len(snapshots) == 1, "stopped at the first step"
    after = dict(strategy.model.named_parameters())
    assert all(torch.equal(v, after[k]) for k, v in snapshots[0].items()), (
        "no optimizer step was taken on the NaN loss"
    )


def test_nan_in_generator_fitting_names_the_class_and_keeps_nothing(monkeypatch):
    import avalanche_imaginer.fitting as fitting

    strategy = build(ImagineStrategy, train_epochs=1)
    real_loss = fitting.generator_loss

    def nan_for_class_1(**kwargs):
        total, parts = real_loss(**kwargs)
        if kwargs["target"] == 1:
            total = total * float("nan")
        return total, parts

    monkeypatch.setattr(fitting, "generator_loss", nan_for_class_1)
    with pytest.raises(NonFiniteLossError, match="experience 0, class 1"):
        strategy.train(make_digits_stream().train_stream[0])
    assert len(strategy.generators) == 0, "class 0's generator was not kept alone"
