"""CIFAR-10 on disk and in memory: a safe batch reader, a Dataset, loaders, an offline stand-in."""

from __future__ import annotations

import codecs
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from transforms import seed_transform

CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
BATCH_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
IMAGE_BYTES = 32 * 32 * 3

# Everything a CIFAR-10 python batch is built from. numpy 2 renamed numpy.core to numpy._core;
# batches pickled under either name are read. Python 3 writes bytes in protocol 2 through
# _codecs.encode, a pure function.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): codecs.encode,
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class CIFAR10FormatError(ValueError):
    """A CIFAR-10 batch file that is unsafe, corrupt, or not in the expected format."""


class _ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle asked for a global that a CIFAR-10 batch never contains."""


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and builtins only, so a file can never run code."""

    def find_class(self, module: str, name: str) -> object:
        """Resolve only the globals a CIFAR-10 batch needs; refuse everything else."""
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays, "
                "lists, strings and numbers"
            ) from None


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one python batch file into (uint8 N x 32 x 32 x 3 images, int64 N labels)."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="latin1").load()
    except _ForbiddenGlobal as err:
        raise CIFAR10FormatError(
            f"{path}: not a safe CIFAR-10 batch ({err}). Delete the folder and download again."
        ) from err
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError) as err:
        raise CIFAR10FormatError(
            f"{path}: truncated or corrupt batch ({type(err).__name__}: {err}). "
            "Delete the folder and download again."
        ) from err
    return _images_and_labels(batch, path)


def _images_and_labels(batch: object, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Validate a decoded batch dict and reshape its rows into HWC images."""
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise CIFAR10FormatError(
            f"{path}: expected a dict with 'data' and 'labels' (the CIFAR-10 python format). "
            "Point the loader at a cifar-10-batches-py folder, or download it again."
        )
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.ndim != 2 or data.shape[1] != IMAGE_BYTES or data.dtype != np.uint8:
        raise CIFAR10FormatError(
            f"{path}: data has shape {data.shape} and dtype {data.dtype}; expected uint8 rows of "
            f"{IMAGE_BYTES} bytes (N x 3072). Download the batches again."
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise CIFAR10FormatError(
            f"{path}: {labels.shape} labels for {len(data)} images; expected one integer each. "
            "Download the batches again."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise CIFAR10FormatError(
            f"{path}: labels span {labels.min()}..{labels.max()}; CIFAR-10 labels are 0..9. "
            "Is this CIFAR-100? Download CIFAR-10 again."
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def load_cifar10(
    root: str | os.PathLike, train: bool = True, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Load CIFAR-10 from `root/cifar-10-batches-py` as (uint8 N x 32 x 32 x 3, int64 N).

    Args:
        root: the folder that holds (or will hold) `cifar-10-batches-py/`.
        train: the training batches (data_batch_1..5) if True, else test_batch.
        download: fetch the official archive with torchvision when the batches are missing.

    Any folder in the python-batch format works, including one with fewer batches or fewer
    images per batch. Every present batch of the split is read.
    """
    folder = Path(root) / BATCH_FOLDER
    names = TRAIN_BATCHES if train else TEST_BATCHES
    if not any((folder / name).is_file() for name in names):
        if not download:
            raise FileNotFoundError(
                f"No CIFAR-10 {'training' if train else 'test'} batches in {folder}. "
                "Pass download=True to fetch them, or point root at the folder that "
                f"contains {BATCH_FOLDER}/."
            )
        _download(Path(root))
    paths = [folder / name for name in names if (folder / name).is_file()]
    parts = [read_batch(path) for path in paths]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    return images, labels


@dataclass
class Splits:
    """Train, validation and test arrays, and where they came from (for the reader).

    The validation arrays are empty unless `load_splits` was asked to hold images out.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str
    val_images: np.ndarray = field(default_factory=lambda: np.empty((0, 32, 32, 3), np.uint8))
    val_labels: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))


def load_splits(
    root: str | os.PathLike | None,
    download: bool = False,
    limit: tuple[int, int] | None = None,
    synthetic_fallback: bool = False,
    validation: int = 0,
    split_seed: int = 0,
) -> Splits:
    """Both CIFAR-10 splits from `root`, optionally cut to (train, test) sizes.

    Args:
        root: the folder holding `cifar-10-batches-py/` (None: nothing on disk).
        download: fetch CIFAR-10 when the batches are missing.
        limit: keep only the first (train, test) images: a smoke run's slice.
        synthetic_fallback: use `synthetic_cifar10` when no batches are on disk
            (offline smoke runs and benchmarks) instead of raising.
        validation: hold this many training images out as a validation split (stratified by
            class), so recipes are tuned without looking at the test set.
        split_seed: picks which images are held out.
    """
    on_disk = root is not None and (Path(root) / BATCH_FOLDER / TEST_BATCHES[0]).is_file()
    if synthetic_fallback and not on_disk and not download:
        images, labels = synthetic_cifar10(6000, seed=0)
        train, test = (images[:5000], labels[:5000]), (images[5000:], labels[5000:])
        source = "synthetic_cifar10 (no CIFAR-10 batches on disk)"
    elif root is None:
        raise FileNotFoundError("no CIFAR-10 folder given: pass root (the notebook reads S9_DATA)")
    else:
        train, test = load_cifar10(root, True, download), load_cifar10(root, False, download)
        source = f"CIFAR-10 python batches in {Path(root) / BATCH_FOLDER}"
    n_train, n_test = limit if limit is not None else (None, None)
    train = (train[0][:n_train], train[1][:n_train])
    splits = Splits(*train, test[0][:n_test], test[1][:n_test], source)
    if validation:
        held_out = stratified_indices(splits.train_labels, validation, split_seed)
        kept = np.setdiff1d(np.arange(len(splits.train_labels)), held_out)
        splits.val_images, splits.val_labels = train[0][held_out], train[1][held_out]
        splits.train_images, splits.train_labels = train[0][kept], train[1][kept]
    return splits


def stratified_indices(labels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """`count` random indices into `labels` with each class in its share of the whole, sorted.

    Shares are rounded by largest remainder, so the total is exactly `count`.
    """
    if not 0 < count < len(labels):
        raise ValueError(
            f"cannot hold out {count} of {len(labels)} training images: "
            "choose a validation size between 1 and the training-set size minus 1"
        )
    rng = np.random.default_rng(seed)
    classes, sizes = np.unique(labels, return_counts=True)
    exact = sizes * count / len(labels)
    quota = np.floor(exact).astype(int)
    quota[np.argsort(quota - exact)[: count - quota.sum()]] += 1
    picked = [
        rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, quota)
    ]
    return np.sort(np.concatenate(picked))


@dataclass
class ClassCount:
    """How many images of one class a split holds."""

    label: int
    name: str
    images: int


def class_counts(labels: np.ndarray) -> list[ClassCount]:
    """Images per class, in label order."""
    counts = np.bincount(labels, minlength=len(CLASSES))
    return [ClassCount(i, name, int(counts[i])) for i, name in enumerate(CLASSES)]


def _download(root: Path) -> None:
    """Fetch and unpack the official CIFAR-10 python archive (md5-checked) into `root`."""
    from torchvision.datasets import CIFAR10

    CIFAR10(root=str(root), train=True, download=True)


class CIFAR10Dataset(Dataset):
    """In-memory CIFAR-10 images (HWC uint8) with an albumentations-style transform.

    Args:
        images: uint8 array N x 32 x 32 x 3.
        labels: integer array of N class indices.
        transform: callable taking `image=` (HWC uint8) and returning {"image": CHW tensor}.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        transform: Callable[..., dict] | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels; they must match")
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            tensor = self.transform(image=image)["image"]
        else:
            tensor = torch.from_numpy(image).permute(2, 0, 1).float().div(255.0)
        return tensor, int(self.labels[index])


def synthetic_cifar10(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A learnable offline stand-in for CIFAR-10: per class a fixed colour pattern plus noise.

    Returns (uint8 n x 32 x 32 x 3, int64 n) with classes in turn (balanced).
    """
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(12345).uniform(40, 215, size=(len(CLASSES), 8, 8, 3))
    patterns = patterns.repeat(4, axis=1).repeat(4, axis=2)  # 8x8 blocks -> 32x32
    labels = np.arange(n, dtype=np.int64) % len(CLASSES)
    noise = rng.normal(0.0, 40.0, size=(n, 32, 32, 3))
    images = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels


def make_loaders(
    train_set: Dataset,
    test_set: Dataset,
    batch_size: int,
    workers: int | None = None,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """A shuffled, seeded train loader and an ordered test loader.

    Args:
        train_set, test_set: the datasets.
        batch_size: images per batch (the test loader uses twice as many: no gradients).
        workers: loader processes; None picks one per CPU core, up to 8.
        seed: seeds the shuffle and the workers' augmentation, for a repeatable order.
    """
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    pin = torch.cuda.is_available()
    # Workers restart every epoch (not persistent) so each epoch's augmentation streams are
    # seeded from that epoch's seed: a resumed run then repeats an uninterrupted one exactly.
    persistent = False
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(train_set) > batch_size,  # a tiny last batch would upset BatchNorm
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=persistent,
        generator=generator,
        worker_init_fn=_seed_worker,
    )
    test_loader = DataLoader(
        test_set,
        batch_size=2 * batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=persistent,
    )
    seed_epoch(train_loader, seed)
    return train_loader, test_loader


def _seed_worker(worker_id: int) -> None:
    """Give each loader worker its own augmentation stream, derived from the loader's seed."""
    info = get_worker_info()
    seed_transform(getattr(info.dataset, "transform", None), info.seed % 2**32)


def seed_epoch(loader: DataLoader, seed: int) -> None:
    """Make the next epoch's shuffle and augmentation a function of `seed` alone.

    Loader workers start afresh each epoch and seed their augmentation from a number the
    loader draws from its generator (see `_seed_worker`); without workers it is seeded here.
    """
    if loader.generator is not None:
        loader.generator.manual_seed(seed)
    if loader.num_workers == 0:
        seed_transform(getattr(loader.dataset, "transform", None), seed)
