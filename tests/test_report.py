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
        # what every result record holds; the cost tests set their own
        "train_seconds": 10.0,
        "generator_seconds": 0.0,
        "generator_classes": 0,
        "generated_per_second": 0.0,
        "generator_bytes": 0,
        "exemplar_bytes": 100,
        "peak_memory_bytes": 2**20,
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
    assert "+3.00 ± 1.41 | — |" in rows[1] and "| 50.0 ± 35.4 |" in rows[1]
    # a variant without its own no-generator run is compared with the first's
    assert "+2.00 ± 1.41* | — |" in rows[2]  # +3 and +1
    assert "| — | — | — | — |" in rows[0]  # no gain, no diagnostics for no-generator


def test_variants_table_gain_over_the_variants_own_copies_run():
    default = [
        _record("imagine_no_generator", 0, 0.60),
        _record("imagine_copies", 0, 0.62),
        _record("imagine", 0, 0.61),
    ]
    heavier = [_record("imagine_copies", 0, 0.66), _record("imagine", 0, 0.63)]
    rows = variants_table({"default": default, "weight_1": heavier}).splitlines()[2:]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert [c[:2] for c in cells] == [
        ["default", "imagine_no_generator"],
        ["default", "imagine_copies"],
        ["default", "imagine"],
        ["weight_1", "imagine_copies"],
        ["weight_1", "imagine"],
    ]
    assert cells[2][6:8] == ["+1.00 ± 0.00", "-1.00 ± 0.00"]
    assert cells[4][6:8] == ["+3.00 ± 0.00*", "-3.00 ± 0.00"]
    assert cells[3][7] == "—"  # the control is not compared with itself


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
    assert "| digits | +10.00 ± 0.00 (1 seeds) | — | — |" in parts["GAINS"]


def test_gains_of_a_run_against_the_baselines_of_another_folder(tmp_path):
    for name, records in {
        "cifar10_cpu_patches": [
            _record("lucir", 0, 0.50),
            _record("imagine_no_generator", 0, 0.52),
            _record("imagine_copies", 0, 0.55),
            _record("imagine", 0, 0.40),  # not this row's Imagine
        ],
        "cifar10_cpu_heldout": [_record("imagine", 0, 0.56)],
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(records))
    rows = sections(tmp_path)["GAINS"].splitlines()
    assert rows[0] == (
        "| results | Imagine − no generator (points) | Imagine − copies (points) "
        "| Imagine − LUCIR (points) |"
    )
    assert (
        "| cifar10_cpu_patches | -12.00 ± 0.00 (1 seeds) | -15.00 ± 0.00 (1 seeds) "
        "| -10.00 ± 0.00 (1 seeds) |" in rows
    )
    assert (
        "| cifar10_cpu_heldout | +4.00 ± 0.00 (1 seeds) | +1.00 ± 0.00 (1 seeds) "
        "| +6.00 ± 0.00 (1 seeds) |" in rows
    )


def test_heldout_variants_are_compared_with_the_baselines_of_its_stream(tmp_path):
    runs = {
        "cifar10_cpu_patches": [
            _record("imagine_no_generator", 0, 0.52),
            _record("imagine_copies", 0, 0.55),
            _record("imagine", 0, 0.40),  # the other unlabeled source's
        ],
        "cifar10_cpu_heldout": [_record("imagine", 0, 0.56)],
        "cifar10_cpu_heldout_ablations/sc": [_record("imagine_sc", 0, 0.53)],
    }
    for name, records in runs.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "results.json").write_text(json.dumps(records))
    rows = sections(tmp_path)["HELDOUT_ABLATIONS"].splitlines()[2:]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert [c[:3] for c in cells] == [
        ["default", "imagine_no_generator", "1"],
        ["default", "imagine_copies", "1"],
        ["default", "imagine", "1"],  # the held-out run's, not the patches run's
        ["sc", "imagine_sc", "1"],
    ]
    assert cells[2][3] == "56.00 ± 0.00"
    assert cells[2][6:8] == ["+4.00 ± 0.00", "+1.00 ± 0.00"]
    assert cells[3][6] == "+1.00 ± 0.00*"


def _costed(method, seed, *, train, fitting=0.0, classes=0, gen_bytes=0, acc=0.5):
    record = _record(method, seed, acc)
    record.update(
        train_seconds=train,
        generator_seconds=fitting,
        generator_classes=classes,
        generated_per_second=1000.0 if fitting else 0.0,
        generator_bytes=gen_bytes,
        peak_memory_bytes=2**20 * (50 if fitting else 40),
    )
    return record


def test_cost_table_ratios_by_seed():
    from benchmarks.report import cost_table

    records = [
        _costed("lucir", 0, train=100.0),
        _costed("lucir", 1, train=50.0),
        _costed("imagine", 0, train=120.0, fitting=30.0, classes=10, gen_bytes=1000),
        _costed("imagine", 1, train=60.0, fitting=15.0, classes=5, gen_bytes=1000),
    ]
    row = cost_table({"digits": records}).splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "digits"
    assert cells[1] == "75.0 ± 35.4"  # LUCIR's seconds
    assert cells[3] == "1.20 ± 0.00"  # 120 / 100 and 60 / 50
    assert cells[4] == "3.00 ± 0.00"  # 30 s / 10 classes, 15 s / 5 classes
    assert cells[5] == "1.50 ± 0.00"  # (120 + 30) / 100
    assert cells[6] == "20.0 ± 0.0"  # 30 of 150 s
    assert cells[8] == "10.0 ± 0.0"  # 1000 / 100 bytes
    assert cells[9:] == ["40 ± 0", "50 ± 0"]


def test_design_table_pairs_compact_with_per_class():
    from benchmarks.report import design_table

    records = [
        _costed("imagine", 0, train=1.0, fitting=8.0, gen_bytes=10240, acc=0.80),
        _costed("imagine", 1, train=1.0, fitting=8.0, gen_bytes=10240, acc=0.70),
        _costed("imagine_compact", 0, train=1.0, fitting=4, gen_bytes=1024, acc=0.79),
        _costed("imagine_compact", 1, train=1.0, fitting=4, gen_bytes=1024, acc=0.68),
    ]
    rows = design_table({"digits": records}).splitlines()[2:]
    assert rows[0].startswith("| digits | imagine | 2 | 75.00 ± 7.07 | — | 10 ± 0 |")
    compact = [c.strip() for c in rows[1].strip("|").split("|")]
    assert compact[4] == "-1.50 ± 0.71"  # -1 and -2 points
    assert compact[5:] == ["1 ± 0", "10.0 ± 0.0", "4.0 ± 0.0"]
    assert design_table({"digits": records[:2]}) == ""  # nothing to compare


def test_design_variants_join_the_design_table(tmp_path):
    digits = tmp_path / "digits"
    narrow = tmp_path / "digits_ablations" / "hidden_32"
    narrow.mkdir(parents=True)
    digits.mkdir()
    paper = [
        _costed("lucir", 0, train=1.0),
        _costed("imagine", 0, train=1.0, fitting=8.0, gen_bytes=8192, acc=0.8),
    ]
    (digits / "results.json").write_text(json.dumps(paper))
    small = [_costed("imagine", 0, train=1.0, fitting=2.0, gen_bytes=1024, acc=0.77)]
    (narrow / "results.json").write_text(json.dumps(small))
    parts = sections(tmp_path)
    rows = parts["DESIGNS"].splitlines()[2:]
    assert [r.split(" | ")[1] for r in rows] == ["imagine", "imagine, 32 channels"]
    assert "| -3.00 ± 0.00 | 1 ± 0 | 8.0 ± 0.0 | 2.0 ± 0.0 |" in rows[1]
    # its cost against the default run's LUCIR: (1 + 2) / 1 in all
    cost = parts["COST"].splitlines()[2:]
    assert [r.split(" | ")[0] for r in cost] == ["| digits", "| digits, 32 channels"]
    assert cost[1].split(" | ")[5] == "3.00 ± 0.00"
