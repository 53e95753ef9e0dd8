"""README tables from committed benchmark results.

``python -m benchmarks.report --readme README.md`` rewrites the parts of
README.md between ``<!-- NAME -->`` and ``<!-- /NAME -->`` markers from the
result folders under ``benchmarks/results/``, so that every figure there is
copied from a committed file, never typed. ``--print`` shows the tables
instead. A marker whose result folder is missing is left as it is, with a
warning.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from pathlib import Path

from .compare import after_last_experience, diagnostics_by
from .metrics import format_mean_std, mean_std

logger = logging.getLogger("benchmarks.report")

RESULTS = Path(__file__).parent / "results"

#: README marker -> result folder whose ``results.md`` fills it.
RESULT_TABLES = {
    "DIGITS": "digits",
    "CIFAR_PATCHES": "cifar10_cpu_patches",
    "CIFAR_HELDOUT": "cifar10_cpu_heldout",
}

#: Rows of the gains table: folder of an Imagine run -> folder of its baselines
#: (the held-out run has only Imagine; its stream and seeds are the patches run's).
GAIN_ROWS = {
    "digits": "digits",
    "cifar10_cpu_patches": "cifar10_cpu_patches",
    "cifar10_cpu_heldout": "cifar10_cpu_patches",
}

#: Columns of the gains table: what Imagine is compared with, by method. The
#: copies control has the same extra weight on old classes as Imagine's
#: counterparts, without a generator.
GAIN_BASELINES = {
    "no generator": "imagine_no_generator",
    "copies": "imagine_copies",
    "LUCIR": "lucir",
}

#: README marker -> (folder of the default run, folder of its variants: runs
#: that each change one choice of the default Imagine).
ABLATION_TABLES = {
    "ABLATIONS": ("digits", "digits_ablations"),
    "CIFAR_ABLATIONS": ("cifar10_cpu_patches", "cifar10_cpu_patches_ablations"),
    "HELDOUT_ABLATIONS": ("cifar10_cpu_heldout", "cifar10_cpu_heldout_ablations"),
}


#: Rows of the cost table: result folders where LUCIR and Imagine ran side by
#: side, in the same process and on the same machine.
COST_ROWS = ("digits", "cifar10_cpu_patches")

#: Imagine designs compared in the generator-design table, when they ran.
DESIGN_METHODS = ("imagine", "imagine_compact")

#: Variant folders (of a cost row's ``<name>_ablations`` folder) whose Imagine
#: runs join the generator-design table, under the name given.
DESIGN_VARIANTS = {
    "hidden_32": "imagine, 32 channels",
    "hidden_32_epochs_4": "imagine, 32 channels, 4 epochs",
}


def _records(folder: Path) -> list[dict]:
    return json.loads((folder / "results.json").read_text())


def paired_gain(
    records: list[dict], method: str, baseline: str, key: str = "avg_inc_acc"
) -> tuple[float, float, int]:
    """Mean and std over seeds of ``method - baseline`` on the same seed.

    Only seeds both methods ran count; the third value is their number.
    A paired difference removes what the seed does to both (its class order
    and initialisation), so it is the fair measure of what one change adds.
    """
    by_seed = {
        m: {r["seed"]: r[key] for r in records if r["method"] == m}
        for m in (method, baseline)
    }
    seeds = sorted(set(by_seed[method]) & set(by_seed[baseline]))
    if not seeds:
        raise ValueError(f"no seed ran both {method!r} and {baseline!r}")
    diffs = [100 * (by_seed[method][s] - by_seed[baseline][s]) for s in seeds]
    mean, std = mean_std(diffs)
    return mean, std, len(seeds)


def _gain(mean: float, std: float) -> str:
    """A paired gain as the tables show it: signed mean ± std, in points."""
    return f"{mean:+.2f} ± {std:.2f}"


def variants_table(variants: dict[str, list[dict]]) -> str:
    """One row per (variant, method): accuracy, the paired gain over the
    variant's no-generator run, and the generators' diagnostics after the last
    experience.

    A variant that changes only the generators has no no-generator run of its
    own (it would be the same run): its gain is over the first variant's,
    marked ``*``. The gain over the copies control is shown only where the
    variant ran that control itself (its copies differ with the weight, the
    BatchNorm mode or the pipeline).
    """
    first = next(iter(variants.values()), [])
    fallback = [r for r in first if r["method"] == "imagine_no_generator"]
    lines = [
        "| variant | method | seeds | avg. inc. acc. (%) | final acc. (%) "
        "| forgetting (%) | gain over no generator (points, paired) "
        "| gain over copies (points, paired) "
        "| classified as their class, end (%) | std generated / real, end |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant, records in variants.items():
        methods = list(dict.fromkeys(r["method"] for r in records))
        for method in methods:
            rows = [r for r in records if r["method"] == method]
            gain = "—"
            own = any(r["method"] == "imagine_no_generator" for r in records)
            if method != "imagine_no_generator" and (own or fallback):
                pool = records if own else [*rows, *fallback]
                g, s, _ = paired_gain(pool, method, "imagine_no_generator")
                gain = _gain(g, s) + ("" if own else "*")
            over_copies = "—"
            if method not in ("imagine_no_generator", "imagine_copies") and any(
                r["method"] == "imagine_copies" for r in records
            ):
                g, s, _ = paired_gain(records, method, "imagine_copies")
                over_copies = _gain(g, s)
            end = diagnostics_by(records, method, after_last_experience)
            classified = (
                format_mean_std([100 * e["classified"] for e in end], 1) if end else "—"
            )
            ratio = format_mean_std([e["std_ratio"] for e in end]) if end else "—"
            lines.append(
                f"| {variant} | {method} | {len(rows)} "
                f"| {format_mean_std([100 * r['avg_inc_acc'] for r in rows])} "
                f"| {format_mean_std([100 * r['final_acc'] for r in rows])} "
                f"| {format_mean_std([100 * r['forgetting'] for r in rows])} "
                f"| {gain} | {over_copies} | {classified} | {ratio} |"
            )
    return "\n".join(lines)


def ablation_variants(
    default: Path, folder: Path, baselines: Path | None = None
) -> dict[str, list[dict]]:
    """The default run's Imagine rows, then those of each variant folder.

    ``baselines``: a run of the same stream and seeds whose no-generator and
    copies rows stand in for those the default run lacks (the held-out run
    has only Imagine).
    """
    variants = {}
    if (default / "results.json").exists():
        keep = ("imagine_no_generator", "imagine_copies", "imagine")
        rows = [r for r in _records(default) if r["method"] in keep]
        if baselines not in (None, default) and (baselines / "results.json").exists():
            have = {r["method"] for r in rows}
            rows = [
                r
                for r in _records(baselines)
                if r["method"] in keep and r["method"] not in have
            ] + rows
        variants["default"] = rows
    if folder.is_dir():
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            if (sub / "results.json").exists():
                variants[sub.name] = _records(sub)
    return variants


def gains_table(rows: dict[str, tuple[Path, Path]]) -> str:
    """Paired gains of Imagine over its no-generator ablation and over LUCIR.

    ``rows`` maps a row name to the folder of the Imagine run and that of the
    baselines (the same folder, or one of the same stream and seeds).
    """
    lines = [
        "| results | "
        + " | ".join(f"Imagine − {b} (points)" for b in GAIN_BASELINES)
        + " |",
        "| --- |" + " --- |" * len(GAIN_BASELINES),
    ]
    for name, (imagine_folder, baseline_folder) in rows.items():
        imagine = [r for r in _records(imagine_folder) if r["method"] == "imagine"]
        baselines = [r for r in _records(baseline_folder) if r["method"] != "imagine"]
        cells = []
        for baseline in GAIN_BASELINES.values():
            try:
                g, s, n = paired_gain([*imagine, *baselines], "imagine", baseline)
                cells.append(f"{_gain(g, s)} ({n} seeds)")
            except ValueError:
                cells.append("—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(a: float, b: float) -> float:
    """``a / b``, NaN (shown as such in a table) when ``b`` is 0."""
    return a / b if b else math.nan


def _by_seed(records: list[dict], method: str) -> dict[int, dict]:
    return {r["seed"]: r for r in records if r["method"] == method}


def _total_seconds(record: dict) -> float:
    return record["train_seconds"] + record["generator_seconds"]


#: Columns of the cost table after the first: header, decimals, and the value
#: from the (LUCIR, Imagine) records of one seed.
COST_COLUMNS = (
    ("LUCIR train s", 1, lambda b, i: b["train_seconds"]),
    ("Imagine train s", 1, lambda b, i: i["train_seconds"]),
    (
        "Imagine train / LUCIR",
        2,
        lambda b, i: _ratio(i["train_seconds"], b["train_seconds"]),
    ),
    (
        "fitting s per class",
        2,
        lambda b, i: _ratio(i["generator_seconds"], i["generator_classes"]),
    ),
    (
        "Imagine in all / LUCIR",
        2,
        lambda b, i: _ratio(_total_seconds(i), b["train_seconds"]),
    ),
    (
        "fitting share of Imagine (%)",
        1,
        lambda b, i: 100 * _ratio(i["generator_seconds"], _total_seconds(i)),
    ),
    ("counterparts per s", 0, lambda b, i: i["generated_per_second"]),
    (
        "generator bytes / exemplar bytes",
        1,
        lambda b, i: _ratio(i["generator_bytes"], i["exemplar_bytes"]),
    ),
    ("LUCIR peak MiB", 0, lambda b, i: b["peak_memory_bytes"] / 2**20),
    ("Imagine peak MiB", 0, lambda b, i: i["peak_memory_bytes"] / 2**20),
)


def cost_table(rows: dict[str, list[dict]]) -> str:
    """What Imagine costs over LUCIR, seed by seed in the same run.

    Training seconds leave out generator fitting and the diagnostics (which
    measure the method, and are not part of it); "in all" is training plus
    fitting. Ratios are taken per seed, then averaged.
    """
    lines = [
        "| results | " + " | ".join(h for h, _, _ in COST_COLUMNS) + " |",
        "| --- |" + " --- |" * len(COST_COLUMNS),
    ]
    for name, records in rows.items():
        lucir, imagine = _by_seed(records, "lucir"), _by_seed(records, "imagine")
        seeds = sorted(set(lucir) & set(imagine))
        if not seeds:
            continue
        cells = [
            format_mean_std([fn(lucir[s], imagine[s]) for s in seeds], digits)
            for _, digits, fn in COST_COLUMNS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def design_table(
    rows: dict[str, list[dict]], methods: tuple[str, ...] = DESIGN_METHODS
) -> str:
    """Generator designs against the paper's: accuracy, bytes, fitting time.

    ``methods`` are the designs to show, ``"imagine"`` (per-class generators
    of the paper's size) first; the accuracy difference is paired by seed
    with it.
    """
    lines = [
        "| results | design | seeds | avg. inc. acc. (%) | − per-class (points) "
        "| generator KiB | per-class bytes / these | fitting s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, records in rows.items():
        per_class = _by_seed(records, "imagine")
        for method in methods:
            mine = _by_seed(records, method)
            seeds = sorted(set(mine) & set(per_class))
            if not seeds:
                continue
            runs = [mine[s] for s in seeds]
            diff = "—"
            if method != "imagine":
                g, sd, _ = paired_gain(records, method, "imagine")
                diff = _gain(g, sd)
            ratio = format_mean_std(
                [
                    _ratio(per_class[s]["generator_bytes"], mine[s]["generator_bytes"])
                    for s in seeds
                ],
                1,
            )
            lines.append(
                f"| {name} | {method} | {len(runs)} "
                f"| {format_mean_std([100 * r['avg_inc_acc'] for r in runs])} "
                f"| {diff} "
                f"| {format_mean_std([r['generator_bytes'] / 1024 for r in runs], 0)} "
                f"| {ratio} "
                f"| {format_mean_std([r['generator_seconds'] for r in runs], 1)} |"
            )
    # the per-class row alone compares nothing
    return "\n".join(lines) if len(lines) > 3 else ""


def _design_variants(folder: Path) -> list[dict]:
    """Imagine runs of the design variants in ``folder``, renamed after them."""
    out = []
    for variant, label in DESIGN_VARIANTS.items():
        path = folder / variant / "results.json"
        if path.exists():
            out += [
                {**r, "method": label}
                for r in _records(path.parent)
                if r["method"] == "imagine"
            ]
    return out


def sections(results: Path = RESULTS) -> dict[str, str]:
    """Marker name -> markdown, for every result folder that exists."""
    out = {}
    for marker, name in RESULT_TABLES.items():
        path = results / name / "results.md"
        if path.exists():
            out[marker] = path.read_text().strip()
    for marker, (default, folder) in ABLATION_TABLES.items():
        baselines = results / GAIN_ROWS.get(default, default)
        variants = ablation_variants(
            results / default, results / folder, baselines=baselines
        )
        if len(variants) > 1:  # the default alone is in the results table
            out[marker] = variants_table(variants)
    gain_rows = {
        name: (results / name, results / baselines)
        for name, baselines in GAIN_ROWS.items()
        if (results / name / "results.json").exists()
        and (results / baselines / "results.json").exists()
    }
    if gain_rows:
        out["GAINS"] = gains_table(gain_rows)
    cost_rows = {
        name: _records(results / name)
        for name in COST_ROWS
        if (results / name / "results.json").exists()
    }
    if cost_rows:
        with_variants = {
            name: records + _design_variants(results / f"{name}_ablations")
            for name, records in cost_rows.items()
        }
        # each design variant's cost against the LUCIR of its default run
        costed = dict(cost_rows)
        for name, records in with_variants.items():
            lucir = [r for r in records if r["method"] == "lucir"]
            for label in DESIGN_VARIANTS.values():
                mine = [
                    {**r, "method": "imagine"} for r in records if r["method"] == label
                ]
                if mine:
                    costed[f"{name}, {label.removeprefix('imagine, ')}"] = lucir + mine
        out["COST"] = cost_table(costed)
        designs = design_table(
            with_variants, DESIGN_METHODS + tuple(DESIGN_VARIANTS.values())
        )
        if designs:
            out["DESIGNS"] = designs
    profile = results / "profile" / "profile.md"
    if profile.exists():
        out["PROFILE"] = profile.read_text().strip()
    return out


def fill(text: str, parts: dict[str, str]) -> str:
    """``text`` with the body of each ``<!-- NAME -->`` block set to ``parts``."""
    for name, body in parts.items():
        pattern = re.compile(
            rf"(<!-- {name} -->\n).*?(<!-- /{name} -->)", flags=re.DOTALL
        )
        if not pattern.search(text):
            logger.warning("README has no <!-- %s --> block; left out", name)
            continue
        text = pattern.sub(lambda m, b=body: m.group(1) + b + "\n" + m.group(2), text)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--readme", type=Path, help="rewrite this file's blocks")
    group.add_argument("--print", action="store_true", help="print the tables")
    args = p.parse_args(argv)
    parts = sections(args.results)
    for marker in (*RESULT_TABLES, *ABLATION_TABLES, "GAINS", "COST", "PROFILE"):
        if marker not in parts:
            logger.warning("no results for <!-- %s -->", marker)
    if args.print:
        for name, body in parts.items():
            print(f"## {name}\n\n{body}\n")  # noqa: T201
        return
    args.readme.write_text(fill(args.readme.read_text(), parts))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
