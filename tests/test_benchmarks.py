"""The comparison command: metrics, strict configs and a smoke run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from benchmarks.compare import main
from benchmarks.config import METHODS, Config
from benchmarks.metrics import average_forgetting, average_incremental_accuracy

# ---------------------------------------------------------------------- metrics


def test_average_incremental_accuracy_includes_the_first_experience():
    assert average_incremental_accuracy([0.9, 0.6, 0.3]) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="empty"):
        average_incremental_accuracy([])


def test_average_forgetting_of_a_hand_made_matrix():
    # matrix[t][j]: accuracy on experience j after training on experience t.
    matrix = [
        [0.9],
        [0.7, 0.8],
        [0.5, 0.6, 0.95],
    ]
    # exp 0: best before the last 0.9, final 0.5 -> 0.4
    # exp 1: best before the last 0.8, final 0.6 -> 0.2
    assert average_forgetting(matrix) == pytest.approx(0.3)


def test_average_forgetting_counts_gains_as_negative():
    assert average_forgetting([[0.5], [0.7, 0.9]]) == pytest.approx(-0.2)
    assert average_forgetting([[0.8]]) == 0.0


def test_average_forgetting_rejects_a_short_row():
    with pytest.raises(ValueError, match="row 1"):
        average_forgetting([[0.5], [0.7]])


# ----------------------------------------------------------------------- config


def test_config_file_with_an_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"dataset": "digits", "epoch": 3}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epoch'\]"):
        Config.from_file(path)


def test_config_file_values_and_overrides(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"epochs": 3, "seeds": [4, 5], "_comment": "x"}))
    cfg = Config.from_file(path, epochs=2)
    assert cfg.epochs == 2 and cfg.seeds == [4, 5]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"dataset": "mnist"}, "dataset must be one of"),
        ({"dataset": "cifar10"}, "needs data_root"),
        ({"methods": ["lucir", "podnet"]}, "methods must be among"),
        ({"unlabeled": "patches"}, "needs unlabeled_path"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"seeds": []}, "at least one seed"),
        ({"imagine_options": {"model": 1}}, "benchmark-set argument"),
        ({"imagine_options": {"generated_bm": "eval"}}, r"\['generated_bm'\]"),
        (
            {"imagine_options": {"generator": {"lr2": 1}}},
            r"unknown field\(s\) \['lr2'\]",
        ),
    ],
)
def test_config_rejects_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        Config(**fields)


def test_imagine_options_from_the_command_line():
    from benchmarks.compare import parse_args

    cfg, _ = parse_args(
        [
            "--imagine-option",
            "generated_bn=separate",
            "--imagine-option",
            "margin_weight=1.0",
            "--imagine-option",
            'generator={"lr": 0.02}',
        ]
    )
    assert cfg.imagine_options == {
        "generated_bn": "separate",
        "margin_weight": 1.0,
        "generator": {"lr": 0.02},
    }
    from benchmarks.methods import imagine_options

    assert imagine_options(cfg)["generator"].lr == 0.02


def test_shipped_configs_are_valid():
    from importlib.resources import files

    configs = sorted(files("benchmarks").joinpath("configs").iterdir())
    assert configs, "benchmarks/configs holds no config"
    for path in configs:
        data = json.loads(path.read_text())
        data.pop("_comment", None)
        # Paths are the user's: any non-empty value passes validation.
        Config.from_dict(data, source=path.name)


# -------------------------------------------------------------------- smoke run


def test_compare_smoke_run_writes_every_result(tmp_path, capsys):
    out = tmp_path / "out"
    records = main(
        [
            "--steps",
            "2",
            "--epochs",
            "1",
            "--generator-epochs",
            "1",
            "--memory-size",
            "20",
            "--width",
            "4",
            "--seeds",
            "0",
            "--methods",
            "naive",
            "lucir",
            "imagine",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert [r["method"] for r in records] == ["naive", "lucir", "imagine"]
    saved = json.loads((out / "results.json").read_text())
    assert saved == records
    required = {
        "method",
        "seed",
        "dataset",
        "steps",
        "accuracy_per_step",
        "avg_inc_acc",
        "final_acc",
        "forgetting",
        "train_seconds",
        "generator_seconds",
        "exemplar_bytes",
        "generator_bytes",
    }
    for record in saved:
        assert required <= record.keys()
        assert record["steps"] == 2 and len(record["accuracy_per_step"]) == 2
        assert 0.0 <= record["final_acc"] <= 1.0
    by_method = {r["method"]: r for r in saved}
    assert by_method["naive"]["exemplar_bytes"] == 0
    assert by_method["lucir"]["exemplar_bytes"] == 20 * 8 * 8 * 4  # float32 8x8
    assert by_method["imagine"]["generator_bytes"] > 0
    assert by_method["imagine"]["generator_seconds"] > 0
    assert by_method["imagine"]["diagnostics_seconds"] > 0
    assert by_method["imagine"]["generator_classes"] == 10
    assert by_method["imagine"]["train_seconds"] > 0
    assert by_method["lucir"]["diagnostics_seconds"] == 0
    assert by_method["lucir"]["generator_bytes"] == 0
    table = (out / "results.md").read_text()
    for method in ("naive", "lucir", "imagine"):
        assert f"| {method} | 1 |" in table
    assert (out / "accuracy.png").stat().st_size > 0
    # generator diagnostics: 5 classes after experience 0, 10 after experience 1
    diagnostics = by_method["imagine"]["diagnostics"]
    assert [d["experience"] for d in diagnostics] == [0] * 5 + [1] * 10
    assert by_method["lucir"]["diagnostics"] == []
    assert "| imagine | when fitted |" in table
    assert "| imagine | after the last experience |" in table
    assert (out / "diagnostics.png").stat().st_size > 0
    environment = json.loads((out / "environment.json").read_text())
    assert environment["torch"] == torch.__version__
    assert "| imagine | 1 |" in capsys.readouterr().out


def test_environment_is_recorded_before_the_runs(tmp_path, monkeypatch):
    from benchmarks import compare

    calls = []
    monkeypatch.setattr(
        compare, "_environment", lambda: calls.append("environment") or {"commit": "c"}
    )
    run_one = compare.run_one

    def counted(*args, **kwargs):
        calls.append("run")
        return run_one(*args, **kwargs)

    monkeypatch.setattr(compare, "run_one", counted)
    out = tmp_path / "out"
    args = ["--steps", "2", "--epochs", "1", "--width", "4", "--threads", "1"]
    main([*args, "--seeds", "0", "1", "--methods", "naive", "--out", str(out)])
    # once, before the first run: an edit during the runs does not change it
    assert calls == ["environment", "run", "run"]
    assert json.loads((out / "environment.json").read_text()) == {"commit": "c"}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_builds_and_trains_one_experience(method):
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from benchmarks.datasets import build_stream
    from benchmarks.methods import build_method

    cfg = Config(width=4, epochs=1, generator_epochs=1, memory_size=20, steps=5)
    stream = build_stream(cfg)
    evaluator = EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])
    built = build_method(method, cfg, stream, evaluator)
    built.strategy.train(stream.benchmark.train_stream[0])
    results = built.strategy.eval(stream.benchmark.test_stream[:1])
    assert 0.0 <= results["Top1_Acc_Stream/eval_phase/test_stream/Task000"] <= 1.0


@pytest.mark.parametrize("channels_last", [False, True])
def test_models_take_the_configured_memory_format(channels_last):
    from benchmarks.methods import build_model

    # width 8: torch 2.14's oneDNN corrupts the heap on channels-last width 4
    cfg = Config(width=8, channels_last=channels_last)
    model = build_model(cfg, (1, 8, 8))
    conv = next(
        m
        for m in model.lower.modules()
        if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1
    )
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == (
        channels_last
    )
    assert conv.weight.is_contiguous() != channels_last
    model.classifier.adaptation(SimpleNamespace(classes_in_this_experience=[0, 1]))
    loss = model(torch.randn(4, 1, 8, 8)).sum()
    loss.backward()
    maps = model.feature_map(torch.randn(2, 1, 8, 8))
    assert maps.is_contiguous() != channels_last


def test_every_method_is_known_to_the_builder():
    from benchmarks.methods import IMAGINE_VARIANTS

    builtin = {"naive", "replay", "icarl", "lucir", "joint"}
    assert set(METHODS) == builtin | set(IMAGINE_VARIANTS)


def test_profile_step_smoke_run(tmp_path):
    from benchmarks.profile_step import main as profile

    results = profile(
        [
            "--repeats",
            "1",
            "--generator-epochs",
            "1",
            "--fit-samples",
            "8",
            "--hidden",
            "8",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    step = results["step"]
    assert step["imagine_step_seconds"] > 0 and step["lucir_step_seconds"] > 0
    assert {"generate", "style_maps", "backward_step"} <= step["imagine_phases"].keys()
    assert "generate" not in step["lucir_phases"]
    assert set(results["fitting"]) == {
        f"{mode}_{k}_classes"
        for mode in ("one_by_one", "together", "compact")
        for k in (2, 10)
    }
    assert results["generation"]["compact_per_second"] > 0
    # per-class bytes grow with the classes; the compact trunk is paid once,
    # then each class adds its code: 2 blocks x 4 x 8 channels of float32
    sizes = results["bytes"]
    assert sizes["100"]["per_class"] == 10 * sizes["10"]["per_class"]
    assert sizes["100"]["compact"] - sizes["10"]["compact"] == 90 * 2 * 4 * 8 * 4
    assert set(results["memory_format"]) == {"contiguous", "channels_last"}
    assert "| generator |" in (tmp_path / "profile.md").read_text()
    assert "| generate |" in (tmp_path / "profile.md").read_text()
    assert json.loads((tmp_path / "profile.json").read_text()) == results
