"""Datasets and class-incremental streams for the benchmarks.

Every source is loaded into memory as tensors (``(N, C, H, W)`` float inputs,
normalised per channel) and turned into an Avalanche stream with
``nc_benchmark``. Nothing is downloaded unless ``download=True`` is asked.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from avalanche.benchmarks import nc_benchmark
from torch import Tensor
from torch.utils.data import TensorDataset

logger = logging.getLogger(__name__)

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "fashion_mnist")
UNLABELED_SOURCES = ("photos", "patches", "heldout", "path")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


@dataclass
class ArrayData:
    """Inputs ``(N, C, H, W)`` in ``[0, 1]`` and integer labels ``(N,)``."""

    x: Tensor
    y: Tensor


def load_digits() -> tuple[ArrayData, ArrayData]:
    """scikit-learn's bundled 8x8 digits, split 1,400 / 397 with a fixed seed."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    return ArrayData(x[train], y[train]), ArrayData(x[test], y[test])


def load_torchvision_cifar(
    name: str, root: str | Path, *, download: bool = False
) -> tuple[ArrayData, ArrayData]:
    """CIFAR-10/100 in torchvision's on-disk layout under ``root``."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"{name} not found under {root!r} in torchvision's layout; pass the "
            "folder that holds it, or download it with --download"
        ) from err

    def to_arrays(ds) -> ArrayData:
        x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).float() / 255
        return ArrayData(x, torch.tensor(ds.targets, dtype=torch.long))

    return to_arrays(train), to_arrays(test)


def load_image_folder(
    root: str | Path, *, size: int | None = None, cache_dir: str | Path | None = None
) -> tuple[ArrayData, ArrayData, list[str]]:
    """An ImageFolder directory with ``train/`` and ``test/`` subfolders.

    Images are resized to ``size`` x ``size`` when given. The decoded tensors
    are cached as ``.npz`` in ``cache_dir`` (keyed by the path and size).
    """
    root = Path(root)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"{root} must hold train/ and test/ folders of one folder per class"
            )
    cache = None
    if cache_dir is not None:
        key = hashlib.sha1(f"{root.resolve()}:{size}".encode()).hexdigest()[:12]
        cache = Path(cache_dir) / f"imagefolder-{key}.npz"
        if cache.exists():
            z = np.load(cache, allow_pickle=False)
            classes = [str(c) for c in z["classes"]]
            return (
                ArrayData(
                    torch.from_numpy(z["xtr"]).float() / 255, torch.from_numpy(z["ytr"])
                ),
                ArrayData(
                    torch.from_numpy(z["xte"]).float() / 255, torch.from_numpy(z["yte"])
                ),
                classes,
            )
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    arrays = {}
    for split in ("train", "test"):
        xs, ys = [], []
        for label, name in enumerate(classes):
            for path in sorted((root / split / name).iterdir()):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    xs.append(_read_image(path, size))
                    ys.append(label)
        arrays[split] = (np.stack(xs), np.asarray(ys, dtype=np.int64))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            cache,
            xtr=arrays["train"][0],
            ytr=arrays["train"][1],
            xte=arrays["test"][0],
            yte=arrays["test"][1],
            classes=np.asarray(classes),
        )
    return (
        ArrayData(
            torch.from_numpy(arrays["train"][0]).float() / 255,
            torch.from_numpy(arrays["train"][1]),
        ),
        ArrayData(
            torch.from_numpy(arrays["test"][0]).float() / 255,
            torch.from_numpy(arrays["test"][1]),
        ),
        classes,
    )


def _read_image(path: Path, size: int | None, mode: str = "RGB") -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert(mode)
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)


def load_fashion_mnist(root: str | Path) -> tuple[ArrayData, ArrayData]:
    """Fashion-MNIST from its IDX files (e.g. Debian's dataset-fashion-mnist)."""
    root = Path(root)

    def read(stem: str) -> np.ndarray:
        for name in (stem, stem + ".gz"):
            path = root / name
            if path.exists():
                import gzip

                opener = gzip.open if name.endswith(".gz") else open
                with opener(path, "rb") as f:
                    data = f.read()
                dims = data[3]
                shape = [
                    int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big")
                    for i in range(dims)
                ]
                return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(
                    shape
                )
        raise FileNotFoundError(f"{stem}[.gz] not found in {root}")

    def arrays(prefix: str) -> ArrayData:
        x = torch.from_numpy(read(f"{prefix}-images-idx3-ubyte").copy()).float() / 255
        y = torch.from_numpy(read(f"{prefix}-labels-idx1-ubyte").astype(np.int64))
        return ArrayData(x.unsqueeze(1), y)

    return arrays("train"), arrays("t10k")


def random_crops(
    images: list[np.ndarray], n: int, size: int, channels: int, seed: int
) -> Tensor:
    """``n`` random square crops (at random scales) resized to ``size``, in [0, 1].

    :param images: ``(H, W, 3)`` uint8 images.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((n, channels, size, size), dtype=np.float32)
    for i in range(n):
        img = images[rng.integers(len(images))]
        h, w = img.shape[:2]
        side = int(rng.integers(min(size, h, w), min(h, w) + 1))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(img[top : top + side, left : left + side])
        crop = crop.convert("L" if channels == 1 else "RGB").resize(
            (size, size), Image.BILINEAR
        )
        arr = np.asarray(crop, dtype=np.float32) / 255
        out[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(out)


def folder_images(path: str | Path) -> list[np.ndarray]:
    """All images below ``path`` (a folder, or a .tar / .tar.gz of images)."""
    from PIL import Image

    path = Path(path)
    images = []
    if path.is_file() and ".tar" in path.name:
        import io
        import tarfile

        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if (
                    member.isfile()
                    and Path(member.name).suffix.lower() in IMAGE_SUFFIXES
                ):
                    data = tar.extractfile(member).read()
                    with Image.open(io.BytesIO(data)) as img:
                        images.append(np.asarray(img.convert("RGB")))
    elif path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(file) as img:
                    images.append(np.asarray(img.convert("RGB")))
    else:
        raise FileNotFoundError(f"no image folder or tar archive at {path}")
    if not images:
        raise ValueError(f"no image found in {path}")
    return images


def sample_photos() -> list[np.ndarray]:
    """scikit-learn's two bundled photos (427 x 640)."""
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


@dataclass
class Stream:
    """A class-incremental benchmark and the unlabeled data that goes with it."""

    benchmark: object
    unlabeled: TensorDataset
    input_shape: tuple[int, int, int]
    n_classes: int
    description: str


def _subset_per_class(data: ArrayData, per_class: int | None, seed: int) -> ArrayData:
    if per_class is None:
        return data
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in data.y.unique():
        rows = torch.nonzero(data.y == c).flatten()
        keep.append(rows[torch.randperm(len(rows), generator=gen)[:per_class]])
    keep = torch.cat(keep).sort().values
    return ArrayData(data.x[keep], data.y[keep])


def build_stream(cfg) -> Stream:
    """The stream and unlabeled data that a benchmark config asks for."""
    classes = None
    if cfg.dataset == "digits":
        train, test = load_digits()
    elif cfg.dataset in ("cifar10", "cifar100"):
        train, test = load_torchvision_cifar(
            cfg.dataset, cfg.data_root, download=cfg.download
        )
    elif cfg.dataset == "imagefolder":
        train, test, classes = load_image_folder(
            cfg.data_root, size=cfg.image_size, cache_dir=cfg.cache_dir
        )
    elif cfg.dataset == "fashion_mnist":
        train, test = load_fashion_mnist(cfg.data_root)
    else:  # guarded by the config's validation
        raise ValueError(f"unknown dataset {cfg.dataset!r}")
    train = _subset_per_class(train, cfg.train_per_class, seed=0)
    test = _subset_per_class(test, cfg.test_per_class, seed=1)

    all_classes = sorted(train.y.unique().tolist())
    heldout = list(cfg.heldout_classes)
    unknown = sorted(set(heldout) - set(all_classes))
    if unknown:
        raise ValueError(f"heldout_classes {unknown} are not classes of {cfg.dataset}")
    stream_classes = [c for c in all_classes if c not in heldout]

    # Per-channel normalisation from the stream's training inputs.
    in_stream = torch.isin(train.y, torch.tensor(stream_classes))
    mean = train.x[in_stream].mean(dim=(0, 2, 3), keepdim=True)
    std = train.x[in_stream].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3)

    def norm(x: Tensor) -> Tensor:
        return ((x - mean) / std).contiguous()

    unlabeled = _unlabeled(cfg, train, heldout, stream_classes, norm)

    def keep(data: ArrayData) -> ArrayData:
        rows = torch.isin(data.y, torch.tensor(stream_classes))
        return ArrayData(norm(data.x[rows]), data.y[rows])

    train_s, test_s = keep(train), keep(test)
    n_classes = len(stream_classes)
    if cfg.first_exp_classes is not None:
        rest = n_classes - cfg.first_exp_classes
        if rest % cfg.steps:
            raise ValueError(
                f"{rest} classes after the first experience do not split into "
                f"steps={cfg.steps} experiences"
            )
        n_exp, per_exp = cfg.steps + 1, {0: cfg.first_exp_classes}
    else:
        if n_classes % cfg.steps:
            raise ValueError(f"{n_classes} classes do not split into steps={cfg.steps}")
        n_exp, per_exp = cfg.steps, None
    train_transform = _augmentation(train_s.x.shape[-1]) if cfg.augment else None
    benchmark = nc_benchmark(
        TensorDataset(train_s.x, train_s.y),
        TensorDataset(test_s.x, test_s.y),
        n_exp,
        task_labels=False,
        seed=cfg.class_order_seed,
        per_exp_classes=per_exp,
        class_ids_from_zero_from_first_exp=True,
        train_transform=train_transform,
    )
    desc = (
        f"{cfg.dataset}: {n_classes} classes in {n_exp} experiences, "
        f"{len(train_s.y)} train / {len(test_s.y)} test inputs, "
        f"{len(unlabeled)} unlabeled ({cfg.unlabeled})"
    )
    if classes:
        desc += f"; classes {[classes[c] for c in stream_classes]}"
    logger.info(desc)
    return Stream(benchmark, unlabeled, tuple(train_s.x.shape[1:]), n_classes, desc)


def _augmentation(size: int):
    from torchvision.transforms import v2

    return v2.Compose(
        [v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip()]
    )


def _unlabeled(cfg, train: ArrayData, heldout, stream_classes, norm) -> TensorDataset:
    channels, size = train.x.shape[1], train.x.shape[-1]
    if cfg.unlabeled == "heldout":
        if not heldout:
            raise ValueError("unlabeled='heldout' needs heldout_classes")
        rows = torch.isin(train.y, torch.tensor(heldout))
        x = train.x[rows]
        if cfg.unlabeled_size is not None:
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(2))
            x = x[perm[: cfg.unlabeled_size]]
        return TensorDataset(norm(x))
    if cfg.unlabeled == "photos":
        images = sample_photos()
    elif cfg.unlabeled == "patches":
        images = folder_images(cfg.unlabeled_path)
    elif cfg.unlabeled == "path":
        return TensorDataset(norm(_dataset_at(cfg.unlabeled_path, size, channels)))
    else:
        raise ValueError(f"unknown unlabeled source {cfg.unlabeled!r}")
    n = cfg.unlabeled_size or 5000
    return TensorDataset(norm(random_crops(images, n, size, channels, seed=3)))


def _dataset_at(path: str | Path, size: int, channels: int) -> Tensor:
    """Inputs of a dataset given by path: a .npy/.pt tensor or a folder of images."""
    path = Path(path)
    if path.suffix == ".npy":
        x = torch.from_numpy(np.load(path)).float()
    elif path.suffix == ".pt":
        x = torch.load(path).float()
    else:
        images = folder_images(path)
        mode = "L" if channels == 1 else "RGB"
        from PIL import Image

        x = torch.from_numpy(
            np.stack(
                [
                    np.asarray(
                        Image.fromarray(im).convert(mode).resize((size, size)),
                        dtype=np.float32,
                    )
                    for im in images
                ]
            )
        )
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if x.max() > 1.5:
        x = x / 255
    if x.dim() != 4 or x.shape[1] != channels or x.shape[-1] != size:
        raise ValueError(
            f"unlabeled data at {path} has shape {tuple(x.shape)}; expected "
            f"(N, {channels}, {size}, {size})"
        )
    return x
