"""Where the time of a training step goes, and what generators cost to fit and run.

``python -m benchmarks.profile_step --out DIR`` times, on CIFAR-shaped inputs
(32 x 32 RGB, ResNet-20 of width 16 split before its last block, maps
64 x 8 x 8, all in channels-last memory format as the CIFAR configs run) and
the shapes of the CIFAR-10 CPU protocol:

- one training step of Imagine, phase by phase (batch of 64 holding 9
  exemplars with 2 counterparts each), beside the same step without
  generators (LUCIR's forward passes and losses);
- generator fitting per class, one by one and together (grouped convolutions),
  per-class and compact designs;
- generation throughput (counterparts per second);
- the bytes of per-class and compact generators for 10, 50 and 100 classes;
- a training step and a generator step in contiguous and channels-last memory.

It writes ``DIR/profile.json`` and ``DIR/profile.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from avalanche.models.dynamic_modules import avalanche_model_adaptation

from avalanche_imaginer import (
    CompactGeneratorBank,
    ConditionalGenerator,
    FeatureGenerator,
    GeneratorBank,
    GeneratorConfig,
    resnet32,
)
from avalanche_imaginer.fitting import (
    ClassMaps,
    fit_compact,
    fit_generator,
    fit_generators,
)
from avalanche_imaginer.generator import parameter_bytes
from avalanche_imaginer.losses import less_forget_loss, margin_ranking_loss

BATCH, EXEMPLARS, N_GENERATED = 64, 9, 2


def _timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def profile_step(repeats: int, hidden: int) -> dict:
    """Seconds of each phase of one training step, with and without generators."""
    torch.manual_seed(0)
    model = resnet32(blocks_per_stage=3).to(memory_format=torch.channels_last)
    avalanche_model_adaptation(
        model, SimpleNamespace(classes_in_this_experience=list(range(8)))
    )
    old_model = copy.deepcopy(model).eval()
    bank = GeneratorBank()
    for c in range(6):
        generator = FeatureGenerator(64, hidden=hidden)
        bank.add(c, generator.to(memory_format=torch.channels_last))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(BATCH, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.cat([torch.randint(0, 6, (EXEMPLARS,)), torch.randint(6, 8, (55,))])
    unlabeled = torch.randn(EXEMPLARS * N_GENERATED, 3, 32, 32)
    old, new = torch.arange(6), torch.arange(6, 8)
    state: dict = {}

    def lower():
        state["maps"] = model.lower(x)

    def upper():
        state["features"] = model.upper(state["maps"])
        state["loss"] = F.cross_entropy(model.classifier(state["features"]), y)

    def distillation():
        with torch.no_grad():
            old_features = old_model.features(x)
        state["loss"] = state["loss"] + less_forget_loss(
            state["features"], old_features
        )

    def margin():
        cosines = model.classifier.cosine(state["features"])
        state["loss"] = state["loss"] + margin_ranking_loss(cosines, y, old, new)

    def style_maps():
        with torch.no_grad():
            state["style"] = model.lower(unlabeled)

    def generate():
        rows = torch.arange(EXEMPLARS)
        state["labels"] = y[rows].repeat_interleave(N_GENERATED)
        content = state["maps"][rows].detach().repeat_interleave(N_GENERATED, 0)
        state["generated"] = bank.generate(content, state["style"], state["labels"])

    def generated_loss():
        logits = model.logits_of_map(state["generated"])
        state["loss"] = state["loss"] + F.cross_entropy(logits, state["labels"])

    def backward_step():
        optimizer.zero_grad(set_to_none=True)
        state["loss"].backward()
        optimizer.step()

    imagine = [lower, upper, distillation, style_maps, generate, generated_loss]
    lucir = [lower, upper, distillation, margin]

    def run(phases):
        def step():
            for phase in phases:
                phase()
            backward_step()

        return step

    # phase times: the whole step's time split by timing each phase in place
    def phase_times(phases) -> dict[str, float]:
        totals = {p.__name__: 0.0 for p in [*phases, backward_step]}
        run(phases)()  # warm-up
        for _ in range(repeats):
            for phase in [*phases, backward_step]:
                start = time.perf_counter()
                phase()
                totals[phase.__name__] += time.perf_counter() - start
        return {k: v / repeats for k, v in totals.items()}

    return {
        "imagine_step_seconds": _timed(run(imagine), repeats),
        "lucir_step_seconds": _timed(run(lucir), repeats),
        "imagine_phases": phase_times(imagine),
        "lucir_phases": phase_times(lucir),
    }


def profile_fitting(epochs: int, samples: int, hidden: int) -> dict:
    """Seconds per class of fitting, one by one vs together, and compact."""
    torch.manual_seed(0)
    model = resnet32(blocks_per_stage=3).to(memory_format=torch.channels_last)
    avalanche_model_adaptation(
        model, SimpleNamespace(classes_in_this_experience=list(range(10)))
    )
    model.eval()

    def maps(c):
        return ClassMaps(
            *(
                torch.randn(n, 64, 8, 8).contiguous(memory_format=torch.channels_last)
                for n in (samples, 20, 1024)
            )
        )

    config = GeneratorConfig(epochs=epochs, hidden=hidden)
    out = {}
    for k in (2, 10):
        classes = {c: maps(c) for c in range(k)}
        start = time.perf_counter()
        for c, m in classes.items():
            fit_generator(model, c, m.real, m.exemplars, m.unlabeled, config)
        out[f"one_by_one_{k}_classes"] = (time.perf_counter() - start) / k
        start = time.perf_counter()
        fit_generators(model, classes, config)
        out[f"together_{k}_classes"] = (time.perf_counter() - start) / k
        shared = ConditionalGenerator(64, hidden=hidden).to(
            memory_format=torch.channels_last
        )
        for c in classes:
            shared.add_class(c)
        start = time.perf_counter()
        fit_compact(model, shared, classes, config, train_trunk=True)
        out[f"compact_{k}_classes"] = (time.perf_counter() - start) / k
    return out


def profile_memory_format(repeats: int, hidden: int) -> dict:
    """Seconds of a training step of the network and of a generator fitting
    step (mix, cycle, backward), contiguous against channels-last."""
    out = {}
    for name, fmt in (
        ("contiguous", torch.contiguous_format),
        ("channels_last", torch.channels_last),
    ):
        torch.manual_seed(0)
        model = resnet32(blocks_per_stage=3).to(memory_format=fmt)
        avalanche_model_adaptation(
            model, SimpleNamespace(classes_in_this_experience=list(range(8)))
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        x = torch.randn(BATCH, 3, 32, 32).contiguous(memory_format=fmt)
        y = torch.randint(0, 8, (BATCH,))

        def train_step(model=model, optimizer=optimizer, x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        generator = FeatureGenerator(64, hidden=hidden).to(memory_format=fmt)
        content, style = (
            torch.randn(BATCH, 64, 8, 8).contiguous(memory_format=fmt) for _ in range(2)
        )

        def generator_step(g=generator, a=content, b=style):
            mix = g(a, b)
            (mix.square().mean() + g(mix, a).square().mean()).backward()

        out[name] = {
            "train_step_seconds": _timed(train_step, repeats),
            "generator_step_seconds": _timed(generator_step, repeats),
        }
    return out


def generator_bytes(hidden: int, classes=(10, 50, 100)) -> dict:
    """Bytes of the generators of ``k`` classes of 64-channel maps, per design.

    Per-class: ``k`` generators of the paper's design; compact: one trunk and
    ``k`` class codes, whose share falls as classes are added.
    """
    one = parameter_bytes(FeatureGenerator(64, hidden=hidden))
    out = {}
    for k in classes:
        shared = ConditionalGenerator(64, hidden=hidden)
        for c in range(k):
            shared.add_class(c)
        out[str(k)] = {"per_class": k * one, "compact": parameter_bytes(shared)}
    return out


def profile_generation(repeats: int, hidden: int) -> dict:
    """Counterparts per second, per-class bank vs compact bank, 6 classes."""
    torch.manual_seed(0)
    per_class, compact = GeneratorBank(), CompactGeneratorBank()
    last = torch.channels_last
    shared = ConditionalGenerator(64, hidden=hidden).to(memory_format=last)
    for c in range(6):
        per_class.add(c, FeatureGenerator(64, hidden=hidden).to(memory_format=last))
        shared.add_class(c)
    compact.set_shared(shared)
    n = 64
    content, style = (
        torch.randn(n, 64, 8, 8).contiguous(memory_format=last) for _ in range(2)
    )
    labels = torch.randint(0, 6, (n,))
    return {
        f"{name}_per_second": n
        / _timed(lambda b=bank: b.generate(content, style, labels), repeats)
        for name, bank in (("per_class", per_class), ("compact", compact))
    }


def _markdown(results: dict) -> str:
    step = results["step"]
    lines = [
        f"Threads: {results['threads']}; generators of {results['hidden']} channels."
        f" One training step, batch {BATCH} with "
        f"{EXEMPLARS} exemplars x {N_GENERATED} counterparts (median of "
        f"{results['repeats']}):",
        "",
        f"- Imagine {step['imagine_step_seconds'] * 1000:.1f} ms, LUCIR's passes "
        f"{step['lucir_step_seconds'] * 1000:.1f} ms "
        f"(x{step['imagine_step_seconds'] / step['lucir_step_seconds']:.2f})",
        "",
        "| phase | Imagine ms | share | LUCIR ms |",
        "| --- | --- | --- | --- |",
    ]
    total = sum(step["imagine_phases"].values())
    for phase, seconds in step["imagine_phases"].items():
        lucir = step["lucir_phases"].get(phase)
        lucir_cell = f"{lucir * 1000:.1f}" if lucir is not None else "-"
        lines.append(
            f"| {phase} | {seconds * 1000:.1f} | {100 * seconds / total:.0f} % "
            f"| {lucir_cell} |"
        )
    if "margin" in step["lucir_phases"]:
        lines.append(
            f"| margin | - | - | {step['lucir_phases']['margin'] * 1000:.1f} |"
        )
    fit = results["fitting"]
    lines += [
        "",
        f"Generator fitting, seconds per class ({results['generator_epochs']} epochs "
        f"of {results['fit_samples']} maps, batch 64):",
        "",
        "| classes in the experience | one by one | together | compact |",
        "| --- | --- | --- | --- |",
    ]
    for k in (2, 10):
        lines.append(
            f"| {k} | {fit[f'one_by_one_{k}_classes']:.2f} "
            f"| {fit[f'together_{k}_classes']:.2f} "
            f"| {fit[f'compact_{k}_classes']:.2f} |"
        )
    gen = results["generation"]
    lines += [
        "",
        f"Generation: {gen['per_class_per_second']:.0f} counterparts/s with per-class "
        f"generators, {gen['compact_per_second']:.0f}/s compact (6 classes in a batch "
        "of 64).",
        "",
        "Generator bytes for 64-channel maps (float32):",
        "",
        "| classes | per-class MiB | compact MiB | per-class / compact |",
        "| --- | --- | --- | --- |",
    ]
    for k, b in results["bytes"].items():
        lines.append(
            f"| {k} | {b['per_class'] / 2**20:.1f} | {b['compact'] / 2**20:.2f} "
            f"| {b['per_class'] / b['compact']:.1f} |"
        )
    fmt = results["memory_format"]
    lines += [
        "",
        "Memory format, ms per step (network: a training step of batch 64; "
        "generator: mix, cycle and backward on 64 maps):",
        "",
        "| step | contiguous | channels-last | saved |",
        "| --- | --- | --- | --- |",
    ]
    for key, label in (
        ("train_step_seconds", "network"),
        ("generator_step_seconds", "generator"),
    ):
        a, b = fmt["contiguous"][key], fmt["channels_last"][key]
        lines.append(
            f"| {label} | {1000 * a:.1f} | {1000 * b:.1f} | {100 * (1 - b / a):.0f} % |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step")
    p.add_argument("--out", type=Path, help="write profile.json and profile.md here")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--generator-epochs", type=int, default=2)
    p.add_argument("--fit-samples", type=int, default=500, help="maps per class")
    p.add_argument("--hidden", type=int, default=128, help="generator channels")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "generator_epochs": args.generator_epochs,
        "fit_samples": args.fit_samples,
        "hidden": args.hidden,
        "step": profile_step(args.repeats, args.hidden),
        "fitting": profile_fitting(
            args.generator_epochs, args.fit_samples, args.hidden
        ),
        "generation": profile_generation(args.repeats, args.hidden),
        "bytes": generator_bytes(args.hidden),
        "memory_format": profile_memory_format(args.repeats, args.hidden),
    }
    text = _markdown(results)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile.json").write_text(json.dumps(results, indent=1))
        (args.out / "profile.md").write_text(text)
    print(text)  # noqa: T201
    return results


if __name__ == "__main__":
    main()
