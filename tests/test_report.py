"""README tables from result files: paired gains, the variants table, filling."""

from __future__ import annotations

import json

import pytest

from benchmarks.report import fill, paired_gain, sections, variants_table


def _record(method, seed, acc, *, classified=None):
    record = {
        "method": method,
        "seed": seed,
        "steps": 2,
        "avg_inc_acc": acc,
        "final_acc": acc - 0.1,
        "forgetting": 0.05,
        "diagnostics": [],
    }
    if classified is not None:
        record["diagnostics"] = [
            # fitted in experience 0, measured after the last (experience 1)
            {
                "experience": 1,
                "fitted_in": 0,
                "classified": classified,
                "std_ratio": 0.5,
                "cosine_to_class_mean": 0.9,
                "drift": 0.1,
            }
        ]
    return record


def test_paired_gain_is_the_mean_of_per_seed_differences():
    records = [
        _record("imagine", 0, 0.80),
        _record("imagine", 1, 0.70),
        _record("imagine", 2, 0.90),  # seed 2 has no baseline: left out
        _record("lucir", 0, 0.75),
        _record("lucir", 1, 0.60),
    ]
    mean, std, n = paired_gain(records, "imagine", "lucir")
    # differences 5 and 10 points
    assert n == 2
    assert mean == pytest.approx(7.5)
    assert std == pytest.approx(12.5**0.5)  # sample std of 5 and 10


def test_paired_gain_without_a_common_seed_is_an_error():
    with pytest.raises(ValueError, match="no seed ran both"):
        paired_gain([_record("imagine", 0, 0.8)], "imagine", "lucir")


def test_variants_table_gains_over_own_or_first_no_generator_run():
    default = [
        _record("imagine_no_generator", 0, 0.60),
        _record("imagine_no_generator", 1, 0.62),
        _record("imagine", 0, 0.64, classified=0.75),
        _record("imagine", 1, 0.64, classified=0.25),
    ]
    only_generators = [
        _record("imagine", 0, 0.63, classified=1.0),
        _record("imagine", 1, 0.63, classified=1.0),
    ]
    table = variants_table({"default": default, "bn_train": only_generators})
    rows = table.splitlines()[2:]
    assert len(rows) == 3
    # default: +4 and +2 points -> +3.00; half the maps classified right
    assert "| default | imagine | 2 |" in rows[1]
    assert "+3.00 ± 1.41 |" in rows[1] and "| 50.0 ± 35.4 |" in rows[1]
    # a variant without its own no-generator run is compared with the first's
    assert "+2.00 ± 1.41* |" in rows[2]  # +3 and +1
    assert "| — | — | — |" in rows[0]  # no gain, no diagnostics for no-generator


def test_fill_replaces_only_the_marked_blocks():
    text = "a\n<!-- X -->\nold\n<!-- /X -->\nb\n<!-- Y -->\nkeep\n<!-- /Y -->\n"
    out = fill(text, {"X": "new | table", "Z": "nowhere"})
    assert (
        out
        == "a\n<!-- X -->\nnew | table\n<!-- /X -->\nb\n<!-- Y -->\nkeep\n<!-- /Y -->\n"
    )
    # idempotent
    assert fill(out, {"X": "new | table"}) == out


def test_sections_read_the_result_folders(tmp_path):
    digits = tmp_path / "digits"
    digits.mkdir()
    (digits / "results.md").write_text("| digits table |\n")
    records = [_record("imagine_no_generator", 0, 0.5), _record("imagine", 0, 0.6)]
    (digits / "results.json").write_text(json.dumps(records))
    parts = sections(tmp_path)
    assert parts["DIGITS"] == "| digits table |"
    assert "CIFAR_PATCHES" not in parts
    assert "ABLATIONS" not in parts  # no variant folder: nothing to compare
    variant = tmp_path / "digits_ablations" / "bn_train"
    variant.mkdir(parents=True)
    (variant / "results.json").write_text(json.dumps([_record("imagine", 0, 0.55)]))
    parts = sections(tmp_path)
    assert "| default | imagine | 1 |" in parts["ABLATIONS"]
    assert "| bn_train | imagine | 1 |" in parts["ABLATIONS"]
    assert "+5.00 ± 0.00* |" in parts["ABLATIONS"]
    assert "| digits | +10.00 ± 0.00 (1 seeds) | — |" in parts["GAINS"]


def test_gains_of_a_run_against_the_baselines_of_another_folder(tmp_path):
    for name, records in {
        "cifar10_cpu_patches": [
            _record("lucir", 0, 0.50),
            _record("imagine_no_generator", 0, 0.52),
            _record("imagine", 0, 0.40),  # not this row's Imagine
        ],
        "cifar10_cpu_heldout": [_record("imagine", 0, 0.56)],
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(records))
    rows = sections(tmp_path)["GAINS"].splitlines()
    assert (
        "| cifar10_cpu_patches | -12.00 ± 0.00 (1 seeds) | -10.00 ± 0.00 (1 seeds) |"
        in rows
    )
    assert (
        "| cifar10_cpu_heldout | +4.00 ± 0.00 (1 seeds) | +6.00 ± 0.00 (1 seeds) |"
        in rows
    )
