"""Shared fixtures: a seeded digits stream, unlabeled photo patches, small models.

Everything is in memory and built from data bundled with scikit-learn, so the
suite needs no download.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from sklearn.datasets import load_digits, load_sample_images
from torch.utils.data import TensorDataset

from avalanche_imaginer import resnet32

SEED = 0
N_EXPERIENCES = 5
N_CLASSES = 10


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread in every test: on tensors this small, OpenMP threads
    on a busy 2-core machine cost far more than they save (x30 measured), and
    one thread gives the same numbers run after run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seed_everything(seed: int = SEED) -> None:
    """Seed torch and numpy; called by every test that trains."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def _digits_tensors() -> tuple[TensorDataset, TensorDataset]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SEED))
    x, y = x[order], y[order]
    n_train = int(0.75 * len(y))
    # Pixel values are 0..16; standardise with the training statistics.
    mean, std = x[:n_train].mean(), x[:n_train].std()
    x = (x - mean) / std
    return (
        TensorDataset(x[:n_train], y[:n_train]),
        TensorDataset(x[n_train:], y[n_train:]),
    )


def make_digits_stream(n_experiences: int = N_EXPERIENCES):
    """Class-incremental digits benchmark, ``10 / n_experiences`` classes each."""
    train, test = _digits_tensors()
    return nc_benchmark(
        train,
        test,
        n_experiences=n_experiences,
        task_labels=False,
        seed=SEED,
        fixed_class_order=list(range(N_CLASSES)),
    )


@pytest.fixture(scope="session")
def digits_benchmark():
    """The 5 experiences x 2 classes digits benchmark (read-only: shared)."""
    return make_digits_stream()


@pytest.fixture
def digits_stream():
    """A fresh 5 x 2 digits benchmark for tests that train on it."""
    return make_digits_stream()


def make_unlabeled_patches(n: int = 256, size: int = 8) -> TensorDataset:
    """Grayscale ``size x size`` patches cut at seeded random places of the
    photos bundled with scikit-learn, standardised like the digits."""
    gen = np.random.default_rng(SEED)
    patches = []
    for image in load_sample_images().images:
        gray = image.astype(np.float32).mean(axis=2)  # (H, W)
        h, w = gray.shape
        for _ in range(n // 2):
            i = gen.integers(0, h - 4 * size)
            j = gen.integers(0, w - 4 * size)
            # Downsample a 4x larger crop so that patches hold some structure.
            crop = gray[i : i + 4 * size, j : j + 4 * size]
            patches.append(crop.reshape(size, 4, size, 4).mean(axis=(1, 3)))
    x = torch.tensor(np.stack(patches)).unsqueeze(1)  # (n, 1, size, size)
    x = (x - x.mean()) / x.std()
    return TensorDataset(x)


@pytest.fixture(scope="session")
def unlabeled_patches() -> TensorDataset:
    return make_unlabeled_patches()


def small_resnet(width: int = 8, blocks_per_stage: int = 2, **kwargs):
    """A tiny split ResNet for 1-channel 8x8 inputs (maps ``4*width x 2 x 2``)."""
    return resnet32(
        in_channels=1, width=width, blocks_per_stage=blocks_per_stage, **kwargs
    )


@pytest.fixture
def model_builder():
    """``build(width=8, blocks_per_stage=2, seed=0)``: a seeded tiny SplitModel."""

    def build(width: int = 8, blocks_per_stage: int = 2, seed: int = SEED, **kwargs):
        torch.manual_seed(seed)
        return small_resnet(width, blocks_per_stage, **kwargs)

    return build
