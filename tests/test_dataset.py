"""Reading CIFAR-10 batches safely, with clear errors; the Dataset and loaders."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset import (
    BATCH_FOLDER,
    CLASSES,
    CIFAR10Dataset,
    CIFAR10FormatError,
    load_cifar10,
    make_loaders,
    synthetic_cifar10,
)
from transforms import test_transforms as eval_transforms
from transforms import train_transforms

SAMPLE = os.environ.get("S9_DATA")


def write_batch(path: Path, images: np.ndarray, labels, **overrides) -> None:
    """Write one batch the way CIFAR-10's python batches are written (a pickled dict)."""
    batch = {
        "batch_label": "test batch",
        "labels": list(labels),
        "data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
        "filenames": [f"{i}.png" for i in range(len(images))],
    }
    batch.update(overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(batch, protocol=2))


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    """A CIFAR-10 folder with two small training batches and a test batch."""
    images, labels = synthetic_cifar10(30, seed=1)
    folder = tmp_path / BATCH_FOLDER
    write_batch(folder / "data_batch_1", images[:12], labels[:12])
    write_batch(folder / "data_batch_2", images[12:20], labels[12:20])
    write_batch(folder / "test_batch", images[20:], labels[20:])
    return tmp_path


def test_reads_every_present_batch_as_hwc_uint8(cifar_root: Path) -> None:
    images, labels = load_cifar10(cifar_root, train=True)
    expected_images, expected_labels = synthetic_cifar10(30, seed=1)
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (20,) and labels.dtype == np.int64
    np.testing.assert_array_equal(images, expected_images[:20])
    np.testing.assert_array_equal(labels, expected_labels[:20])
    test_images, _ = load_cifar10(cifar_root, train=False)
    np.testing.assert_array_equal(test_images, expected_images[20:])


def test_a_pickle_that_would_run_code_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / BATCH_FOLDER
    folder.mkdir()
    payload = {"data": Exploit(), "labels": [0]}
    (folder / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CIFAR10FormatError, match=r"refusing to load (posix|os|nt)\.system"):
        load_cifar10(tmp_path)
    assert not marker.exists()


def test_missing_folder_without_download_names_path_and_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download=True") as err:
        load_cifar10(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / BATCH_FOLDER) in str(err.value)


def test_truncated_batch_is_reported_with_its_path(cifar_root: Path) -> None:
    path = cifar_root / BATCH_FOLDER / "data_batch_2"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CIFAR10FormatError, match="truncated or corrupt") as err:
        load_cifar10(cifar_root)
    assert str(path) in str(err.value)


def test_data_of_the_wrong_shape_is_reported(tmp_path: Path) -> None:
    images, labels = synthetic_cifar10(4)
    write_batch(tmp_path / BATCH_FOLDER / "data_batch_1", images, labels, data=np.zeros((4, 1024), np.uint8))
    with pytest.raises(CIFAR10FormatError, match="3072"):
        load_cifar10(tmp_path)


def test_labels_outside_0_to_9_are_reported(tmp_path: Path) -> None:
    images, _ = synthetic_cifar10(4)
    write_batch(tmp_path / BATCH_FOLDER / "data_batch_1", images, [0, 1, 2, 57])
    with pytest.raises(CIFAR10FormatError, match="0..9"):
        load_cifar10(tmp_path)


def test_a_batch_that_is_not_a_dict_is_reported(tmp_path: Path) -> None:
    folder = tmp_path / BATCH_FOLDER
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(CIFAR10FormatError, match="'data' and 'labels'"):
        load_cifar10(tmp_path)


def test_dataset_applies_the_transform_and_returns_tensor_and_int(cifar_root: Path) -> None:
    images, labels = load_cifar10(cifar_root)
    dataset = CIFAR10Dataset(images, labels, eval_transforms())
    image, label = dataset[3]
    assert len(dataset) == 20
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int) and label == labels[3]


def test_dataset_rejects_mismatched_lengths() -> None:
    images, labels = synthetic_cifar10(10)
    with pytest.raises(ValueError, match="10 images but 9 labels"):
        CIFAR10Dataset(images, labels[:9])


def test_synthetic_data_is_balanced_repeatable_and_class_dependent() -> None:
    images, labels = synthetic_cifar10(200, seed=3)
    again, _ = synthetic_cifar10(200, seed=3)
    np.testing.assert_array_equal(images, again)
    assert np.bincount(labels).tolist() == [20] * len(CLASSES)
    means = np.stack([images[labels == c].mean(0) for c in range(len(CLASSES))])
    assert np.abs(means[0] - means[1]).mean() > 20  # classes differ far beyond the noise


def test_loaders_shuffle_repeatably_and_keep_test_order() -> None:
    images, labels = synthetic_cifar10(64)
    train = CIFAR10Dataset(images, labels, train_transforms())
    test = CIFAR10Dataset(images, labels, eval_transforms())

    def first_epoch(seed: int) -> list[torch.Tensor]:
        train_loader, _ = make_loaders(train, test, batch_size=16, workers=0, seed=seed)
        return [x for x, _ in train_loader]

    a, b, c = first_epoch(0), first_epoch(0), first_epoch(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    _, test_loader = make_loaders(train, test, batch_size=16, workers=0)
    assert torch.cat([y for _, y in test_loader]).tolist() == labels.tolist()


def test_loader_workers_get_different_augmentation_streams() -> None:
    images = np.repeat(synthetic_cifar10(1)[0], 32, axis=0)
    labels = np.zeros(32, dtype=np.int64)
    train = CIFAR10Dataset(images, labels, train_transforms())
    loader, _ = make_loaders(train, train, batch_size=8, workers=2, seed=0)
    batches = [x for x, _ in loader]
    # Batches 0 and 1 come from different workers; the same image must not get the same
    # augmentations in both (identical streams were a classic DataLoader + albumentations bug).
    assert not torch.equal(batches[0], batches[1])


@pytest.mark.skipif(not SAMPLE, reason="S9_DATA not set: the real CIFAR-10 sample is absent")
def test_reads_the_real_cifar10_sample() -> None:
    images, labels = load_cifar10(SAMPLE, train=True)
    test_images, test_labels = load_cifar10(SAMPLE, train=False)
    assert images.shape[1:] == (32, 32, 3) and len(images) == len(labels) > 1000
    assert set(labels.tolist()) == set(range(10)) and set(test_labels.tolist()) == set(range(10))
    assert 100 < images.mean() < 140  # real photos, not noise or zeros
