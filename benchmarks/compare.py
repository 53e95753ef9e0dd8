"""Compare Imagine, LUCIR, iCaRL and the bounds on one stream, seeds and budget.

``python -m benchmarks.compare`` runs the embedded digits default (no
download, a few minutes on two CPU cores) and prints a table;
``--out DIR`` writes ``results.json``, ``results.md`` and ``accuracy.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path

import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin
from tqdm.auto import tqdm

from .config import METHODS, Config
from .datasets import build_stream
from .methods import build_method
from .metrics import (
    average_forgetting,
    average_incremental_accuracy,
    format_mean_std,
    mean_std,
)

logger = logging.getLogger("benchmarks.compare")

STREAM_KEY = "Top1_Acc_Stream/eval_phase/test_stream/Task000"
EXP_KEY = "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{:03d}"


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or sampled process RSS growth."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import psutil

        self._proc = psutil.Process()
        self._base = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss - self._base)
            self._stop.wait(0.05)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()


def run_one(method: str, seed: int, cfg: Config, stream) -> dict:
    """Train ``method`` on the stream with ``seed``; its result record."""
    RNGManager.set_random_seeds(seed)
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True), loggers=[]
    )
    built = build_method(method, cfg, stream, evaluator)
    strategy = built.strategy
    device = torch.device(cfg.device)
    accuracy_per_step, matrix = [], []
    train_seconds = 0.0
    test_stream = stream.benchmark.test_stream
    with PeakMemory(device) as peak:
        for t, experience in enumerate(
            tqdm(
                stream.benchmark.train_stream, desc=f"{method} seed {seed}", leave=False
            )
        ):
            start = time.perf_counter()
            strategy.train(experience)
            train_seconds += time.perf_counter() - start
            results = strategy.eval(test_stream[: t + 1])
            accuracy_per_step.append(float(results[STREAM_KEY]))
            matrix.append([float(results[EXP_KEY.format(j)]) for j in range(t + 1)])
    generator_seconds = float(built.generator_seconds())
    diagnostics_seconds = float(built.diagnostics_seconds())
    generated, generation_seconds = built.generated()
    return {
        "method": method,
        "seed": seed,
        "dataset": cfg.dataset,
        "unlabeled": cfg.unlabeled,
        "steps": len(accuracy_per_step),
        "accuracy_per_step": accuracy_per_step,
        "accuracy_matrix": matrix,
        "avg_inc_acc": average_incremental_accuracy(accuracy_per_step),
        "final_acc": accuracy_per_step[-1],
        "forgetting": average_forgetting(matrix),
        # the method's training, apart from fitting generators and from the
        # diagnostics, which measure the method and are not part of it
        "train_seconds": train_seconds - generator_seconds - diagnostics_seconds,
        "generator_seconds": generator_seconds,
        "diagnostics_seconds": diagnostics_seconds,
        "generator_classes": int(built.generator_classes()),
        "peak_memory_bytes": int(peak.peak),
        "exemplar_bytes": int(built.exemplar_bytes()),
        "generator_bytes": int(built.generator_bytes()),
        "generated_samples": int(generated),
        "generated_per_second": generated / generation_seconds
        if generation_seconds > 0
        else 0.0,
        "diagnostics": built.diagnostics(),
    }


def summarize(records: list[dict], methods: list[str]) -> str:
    """A markdown table of mean ± std over seeds, one row per method."""
    lines = [
        "| method | seeds | avg. inc. acc. (%) | final acc. (%) | forgetting (%) "
        "| train s | generator s | exemplar KiB | generator KiB | peak MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method in methods:
        rows = [r for r in records if r["method"] == method]
        if not rows:
            continue

        def cell(key, scale=100.0, digits=2, rows=rows):
            return format_mean_std([r[key] * scale for r in rows], digits)

        lines.append(
            f"| {method} | {len(rows)} | {cell('avg_inc_acc')} | {cell('final_acc')} "
            f"| {cell('forgetting')} | {cell('train_seconds', 1, 1)} "
            f"| {cell('generator_seconds', 1, 1)} "
            f"| {cell('exemplar_bytes', 1 / 1024, 0)} "
            f"| {cell('generator_bytes', 1 / 1024, 0)} "
            f"| {cell('peak_memory_bytes', 1 / 2**20, 0)} |"
        )
    return "\n".join(lines)


DIAGNOSTICS = (
    ("classified", "classified as their class (%)", 100.0),
    ("std_ratio", "std generated / std real", 1.0),
    ("cosine_to_class_mean", "cosine to the real class mean", 1.0),
    ("drift", "exemplar map drift (1 - cos)", 1.0),
)


def when_fitted(diagnostic: dict, record: dict) -> bool:
    """A diagnostic measured right after its generator was fitted."""
    return diagnostic["experience"] == diagnostic["fitted_in"]


def after_last_experience(diagnostic: dict, record: dict) -> bool:
    """A diagnostic of an earlier experience's generator, after the last one."""
    return (
        diagnostic["experience"] == record["steps"] - 1
        and diagnostic["fitted_in"] < diagnostic["experience"]
    )


def diagnostics_by(records: list[dict], method: str, pick) -> list[dict]:
    """Per seed, the mean over classes of each statistic of the picked rows."""
    out = []
    for r in records:
        if r["method"] != method:
            continue
        rows = [d for d in r.get("diagnostics", []) if pick(d, r)]
        if rows:
            out.append(
                {k: sum(d[k] for d in rows) / len(rows) for k, _, _ in DIAGNOSTICS}
            )
    return out


def summarize_diagnostics(records: list[dict], methods: list[str]) -> str:
    """Generator diagnostics at fitting and after the last experience."""
    header = " | ".join(label for _, label, _ in DIAGNOSTICS)
    lines = [
        f"| method | measured | {header} |",
        "| --- | --- |" + " --- |" * len(DIAGNOSTICS),
    ]
    picks = {
        "when fitted": when_fitted,
        "after the last experience": after_last_experience,
    }
    for method in methods:
        for when, pick in picks.items():
            per_seed = diagnostics_by(records, method, pick)
            if not per_seed:
                continue
            cells = []
            for key, _, scale in DIAGNOSTICS:
                m, sd = mean_std([p[key] * scale for p in per_seed])
                cells.append(f"{m:.3g} ± {sd:.2g}")
            lines.append(f"| {method} | {when} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def plot_diagnostics(records: list[dict], methods: list[str], path: Path) -> None:
    """Each statistic against the experiences since fitting, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(8, 6))
    for method in methods:
        steps = max((r["steps"] for r in records if r["method"] == method), default=0)
        ages = []
        stats = {k: [] for k, _, _ in DIAGNOSTICS}
        for age in range(steps):
            per_seed = diagnostics_by(
                records,
                method,
                lambda d, r, age=age: d["experience"] - d["fitted_in"] == age,
            )
            if not per_seed:
                continue
            ages.append(age)
            for key, _, scale in DIAGNOSTICS:
                stats[key].append(mean_std([p[key] * scale for p in per_seed]))
        if not ages:
            continue
        for ax, (key, label, _) in zip(axes.flat, DIAGNOSTICS):
            means = [m for m, _ in stats[key]]
            stds = [sd for _, sd in stats[key]]
            ax.errorbar(ages, means, yerr=stds, marker="o", capsize=3, label=method)
            ax.set_xlabel("experiences since the generator was fitted")
            ax.set_ylabel(label, fontsize=8)
            ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("generator diagnostics: mean over classes, ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(records: list[dict], methods: list[str], path: Path, title: str) -> None:
    """Accuracy on the classes seen so far after each experience, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in methods:
        rows = [r for r in records if r["method"] == method]
        if not rows:
            continue
        steps = range(1, rows[0]["steps"] + 1)
        stats = [
            mean_std([r["accuracy_per_step"][t] * 100 for r in rows])
            for t in range(len(steps))
        ]
        means = [m for m, _ in stats]
        stds = [s for _, s in stats]
        ax.errorbar(steps, means, yerr=stds, marker="o", capsize=3, label=method)
    ax.set_xlabel("experience")
    ax.set_ylabel("accuracy on classes seen so far (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _key_value(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def parse_args(argv=None) -> tuple[Config, Path | None]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="Compare continual-learning methods on one stream.",
    )
    p.add_argument("--config", type=Path, help="JSON config (unknown keys are errors)")
    p.add_argument(
        "--out", type=Path, help="write results.json/.md and accuracy.png here"
    )
    p.add_argument("--log-level", default="WARNING")
    kinds = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        annotation = str(f.type).replace(" | None", "")
        if annotation == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif annotation == "dict":
            p.add_argument(
                "--imagine-option",
                dest=f.name,
                action="append",
                type=_key_value,
                metavar="NAME=VALUE",
                help="an ImagineStrategy argument for every Imagine method "
                "(VALUE read as JSON, else as a string); repeatable",
            )
        elif annotation.startswith("list["):
            kind = kinds[annotation[5:-1]]
            p.add_argument(flag, nargs="+", type=kind, default=None)
        else:
            p.add_argument(flag, type=kinds[annotation], default=None)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Config)
        if getattr(args, f.name) is not None
    }
    if "imagine_options" in overrides:
        overrides["imagine_options"] = dict(overrides["imagine_options"])
    try:
        cfg = (
            Config.from_file(args.config, **overrides)
            if args.config
            else Config(**overrides)
        )
    except ValueError as err:
        p.error(str(err))
    return cfg, args.out


def main(argv=None) -> list[dict]:
    cfg, out = parse_args(argv)
    # The code that runs is the code imported now: its commit and changes are
    # recorded before the runs, which edits made during a long run cannot alter.
    environment = _environment()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    stream = build_stream(cfg)
    methods = [m for m in METHODS if m in cfg.methods]
    records = []
    runs = [(seed, m) for seed in cfg.seeds for m in methods]
    for seed, method in tqdm(runs, desc="runs"):
        record = run_one(method, seed, cfg, stream)
        records.append(record)
        logger.info(
            "%s seed %d: avg inc acc %.2f, final %.2f",
            method,
            seed,
            100 * record["avg_inc_acc"],
            100 * record["final_acc"],
        )
        if out is not None:  # keep what is done if a later run fails
            _write(out, cfg, environment, stream, records, methods, final=False)
    table = summarize(records, methods)
    if out is not None:
        _write(out, cfg, environment, stream, records, methods, final=True)
    # The table is the command's output, for the user to read.
    print(f"{stream.description}\n\n{table}")  # noqa: T201
    return records


def _write(
    out: Path, cfg: Config, environment: dict, stream, records, methods, *, final: bool
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(records, indent=1))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    (out / "environment.json").write_text(json.dumps(environment, indent=1))
    if final:
        header = (
            f"{stream.description}\n\nSeeds {cfg.seeds}; mean ± std over seeds.\n\n"
        )
        text = header + summarize(records, methods) + "\n"
        diagnostics = summarize_diagnostics(records, methods)
        if diagnostics:
            text += "\nGenerator diagnostics (mean over classes; ± std over seeds):\n\n"
            text += diagnostics + "\n"
            plot_diagnostics(records, methods, out / "diagnostics.png")
        (out / "results.md").write_text(text)
        plot(records, methods, out / "accuracy.png", stream.description)


def _environment() -> dict:
    """What produced the results: code version, libraries, machine."""
    import platform
    import subprocess
    import sys

    import avalanche

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        # Result files the runs themselves rewrite do not count as changes.
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no", "--", "."]
                + [":(exclude)benchmarks/results"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent.parent,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        "command": " ".join(["python -m benchmarks.compare", *sys.argv[1:]]),
        "commit": commit,
        "uncommitted_changes": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "avalanche": getattr(avalanche, "__version__", None),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
