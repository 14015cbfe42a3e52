"""Reading CIFAR-10 batches safely, with clear errors; the Dataset and loaders."""

import codecs
import functools
import hashlib
import http.server
import itertools
import os
import pickle
import pickletools
import re
import struct
import subprocess
import sys
import tarfile
import threading
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import dataset
from dataset import (
    BATCH_FOLDER,
    CLASSES,
    CIFAR10Dataset,
    CIFAR10FormatError,
    eval_loader,
    load_cifar10,
    load_splits,
    make_loaders,
    stratified_indices,
    read_batch,
    synthetic_cifar10,
)
from transforms import eval_transforms
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


UNREADABLE: dict[str, tuple[Callable[[Path], object], str]] = {
    "directory": (lambda path: path.mkdir(), "it is a directory, not a regular file"),
    "fifo": (os.mkfifo, r"it is a FIFO \(named pipe\), not a regular file"),
    "link-to-dev-zero": (lambda path: path.symlink_to("/dev/zero"), "it is a character device"),
    "dangling-link": (lambda path: path.symlink_to(path.parent / "gone"), "No such file"),
    "over-the-size-limit": (lambda path: path.write_bytes(b"\0" * (dataset.MAX_BATCH_BYTES + 1)),
                            "more than the 67,108,864 allowed"),
}


@pytest.mark.parametrize("kind", UNREADABLE)
def test_a_batch_that_is_no_readable_file_is_named_not_skipped(cifar_root: Path, kind: str) -> None:
    # Skipped before (is_file() was False): training then silently used fewer images.
    make, reason = UNREADABLE[kind]
    path = cifar_root / BATCH_FOLDER / "data_batch_2"
    path.unlink()
    make(path)
    with pytest.raises(CIFAR10FormatError, match=reason) as err:
        load_cifar10(cifar_root)
    assert str(path) in str(err.value) and "download CIFAR-10 again" in str(err.value)


def test_read_regular_file_signals_a_refusal_by_its_own_type(tmp_path: Path) -> None:
    # A plain ValueError, which checkpoint and lock readers could not tell from a bug's.
    with pytest.raises(dataset.RefusedFileError, match="it is a directory, not a regular file"):
        dataset.read_regular_file(tmp_path, 10)
    (tmp_path / "two-bytes").write_bytes(b"ab")
    with pytest.raises(dataset.RefusedFileError, match="it holds 2 bytes, more than the 1 allowed"):
        dataset.read_regular_file(tmp_path / "two-bytes", 1)


def test_a_batch_that_may_not_be_read_is_named_with_the_fix(
    cifar_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = cifar_root / BATCH_FOLDER / "data_batch_2"

    def denied(opener: Callable) -> Callable:
        """`opener`, failing as a file without read permission does (even for root)."""
        def open_(file, *args, **kwargs):
            if str(file) == str(path):
                raise PermissionError(13, "Permission denied", str(file))
            return opener(file, *args, **kwargs)
        return open_

    monkeypatch.setattr(os, "open", denied(os.open))
    monkeypatch.setattr("builtins.open", denied(open))
    with pytest.raises(CIFAR10FormatError, match=r"cannot read this batch \(Permission denied\)"
                       r"\. Check that it exists and that you may read it") as err:
        load_cifar10(cifar_root)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("fallback", [False, True], ids=["download", "synthetic-fallback"])
def test_a_data_folder_that_is_a_file_is_named_with_the_fix(tmp_path: Path, fallback: bool) -> None:
    # S9_DATA naming a file: a bare NotADirectoryError from the download, or, with the
    # smoke run's synthetic fallback, synthetic images in place of the data asked for.
    data = tmp_path / "cifar.tar.gz"
    data.write_bytes(b"not a folder")
    with pytest.raises(NotADirectoryError, match=re.escape(
            f"{data} is a file, not a folder. Point root (S9_DATA in the notebook) at the folder")):
        load_splits(data, download=not fallback, synthetic_fallback=fallback)


def assert_names_the_batch_and_the_fix(err: pytest.ExceptionInfo, batch: Path) -> None:
    """A refused batch's message names the file and the fix that works: download=True alone
    would read the same bad file again, so the folder must go first."""
    message = str(err.value)
    assert message.startswith(f"{batch}: ")
    assert f"Delete {batch.parent} and download CIFAR-10 again" in message


def test_data_of_the_wrong_shape_is_reported(tmp_path: Path) -> None:
    images, labels = synthetic_cifar10(4)
    batch = tmp_path / BATCH_FOLDER / "data_batch_1"
    write_batch(batch, images, labels, data=np.zeros((4, 1024), np.uint8))
    with pytest.raises(CIFAR10FormatError, match="3072") as err:
        load_cifar10(tmp_path)
    assert_names_the_batch_and_the_fix(err, batch)


def test_labels_outside_0_to_9_are_reported(tmp_path: Path) -> None:
    images, _ = synthetic_cifar10(4)
    batch = tmp_path / BATCH_FOLDER / "data_batch_1"
    write_batch(batch, images, [0, 1, 2, 57])
    with pytest.raises(CIFAR10FormatError, match=r"0\.\.9 \(is this CIFAR-100\?\)") as err:
        load_cifar10(tmp_path)
    assert_names_the_batch_and_the_fix(err, batch)


def test_a_batch_that_is_not_a_dict_is_reported(tmp_path: Path) -> None:
    folder = tmp_path / BATCH_FOLDER
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(CIFAR10FormatError, match="a list, not a dict with 'data' and 'labels'") as err:
        load_cifar10(tmp_path)
    assert_names_the_batch_and_the_fix(err, folder / "data_batch_1")


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
        CIFAR10Dataset(images, labels[:9], eval_transforms())


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


@pytest.mark.skipif(not SAMPLE, reason="S9_DATA not set: the real CIFAR-10 sample is absent")
def test_the_samples_label_names_pickled_by_python_2s_cpickle_pass_the_scan() -> None:
    # batches.meta is as the official archive holds it: Python 2's cPickle numbered its memo
    # from 1, as in the official batches, which the scan refused.
    meta = (Path(SAMPLE) / BATCH_FOLDER / "batches.meta").read_bytes()
    assert meta.startswith(b"\x80\x02}q\x01(")
    dataset._scan_pickle(meta)


# --- Crafted pickles: each is refused with its path, before anything large is built. ---

IMAGE = dataset.IMAGE_BYTES


class Call:
    """Pickles as the call func(*args), then `state` applied by BUILD: what crafted files hold."""

    def __init__(self, func, args: tuple, state=None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def array_call(shape: tuple, raw, dtype=np.uint8) -> Call:
    """An array pickled the way numpy pickles one, but claiming `shape` over the bytes `raw`."""
    func, args, state = np.zeros(1, dtype).__reduce__()
    return Call(func, args, (state[0], shape, state[2], state[3], raw))


def write_pickle(root: Path, data, labels=(0,)) -> Path:
    """Write a batch dict holding `data` as root's data_batch_1."""
    path = root / BATCH_FOLDER / "data_batch_1"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"data": data, "labels": list(labels)}, protocol=2))
    return path


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        # 3 KB stretched over 200,000 images by a zero stride (600 MB once made contiguous)
        (Call(np.ndarray, ((200_000, IMAGE), "u1", b"x" * IMAGE, 0, (0, 1))), "ndarray directly"),
        (Call(np.ndarray, ((2_000_000_000, IMAGE), "u1")), "ndarray directly"),
        (array_call((2_000_000_000, IMAGE), b"x" * IMAGE), "more than a batch of 10000 images"),
        (array_call((10_001, IMAGE), b"x" * IMAGE), "more than a batch of 10000 images"),
        (array_call((200, IMAGE), b"x" * IMAGE), "needs 614400 bytes but the file holds 3072"),
        # numpy reads an object array's bytes as pointers; a short list of them crashes it
        (array_call((1,), [1], dtype=object), "plain numbers"),
    ],
    ids=["broadcast", "huge-ndarray", "huge-state", "10001-images", "short-bytes", "objects"],
)
def test_crafted_arrays_are_refused_before_allocating(tmp_path: Path, data, reason: str) -> None:
    path = write_pickle(tmp_path, data)
    tracemalloc.start()
    try:
        with pytest.raises(CIFAR10FormatError, match=reason) as err:
            load_cifar10(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(err.value)
    assert peak < 1_000_000  # the files are a few KB: nothing of the claimed size was built


@pytest.mark.parametrize(("text", "codec"), [("x", "no-such-codec"), (b"ab", "hex")])
def test_codecs_other_than_latin1_are_refused_with_the_path(
    tmp_path: Path, text, codec: str
) -> None:
    # an unknown codec raised a bare LookupError; hex doubles its input, and nests
    path = write_pickle(tmp_path, Call(codecs.encode, (text, codec)))
    with pytest.raises(CIFAR10FormatError, match=codec) as err:
        load_cifar10(tmp_path)
    assert str(path) in str(err.value)


def test_decoding_more_bytes_than_the_file_holds_is_refused(tmp_path: Path) -> None:
    text = "x" * 100_000  # stored once, decoded 200 times: 20 MB out of a 100 KB file
    write_pickle(tmp_path, [Call(codecs.encode, (text, "latin1")) for _ in range(200)])
    with pytest.raises(CIFAR10FormatError, match="more bytes than the file holds"):
        load_cifar10(tmp_path)


def test_a_batch_claiming_an_impossible_string_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / BATCH_FOLDER / "data_batch_1"
    path.parent.mkdir()
    # protocol 4 BINUNICODE8 of 2**60 bytes: Python 3.11 asks for an exabyte at once (a bare
    # MemoryError); newer Pythons read in chunks and find the file truncated
    path.write_bytes(b"\x80\x04\x8d" + (2**60).to_bytes(8, "little") + b"x")
    with pytest.raises(CIFAR10FormatError, match="ran out of memory|truncated") as err:
        load_cifar10(tmp_path)
    assert str(path) in str(err.value)


# --- A batch file costs no more than its size: attacks refused before anything is unpickled. ---


def refusal_and_peak(root: Path, content: bytes) -> tuple[CIFAR10FormatError, int]:
    """Write `content` as root's data_batch_1; load_cifar10's refusal, and its peak allocation."""
    path = root / BATCH_FOLDER / "data_batch_1"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    tracemalloc.start()
    try:
        with pytest.raises(CIFAR10FormatError) as err:
            load_cifar10(root)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(err.value)
    return err.value, peak


@pytest.mark.parametrize("index", [2**22, 2**27])
def test_a_memo_index_beyond_the_memo_is_refused_without_allocating(
    tmp_path: Path, index: int
) -> None:
    # 12 bytes: None, stored at memo index `index` (LONG_BINPUT). The unpickler sized and
    # zero-filled a memo table of twice that many pointers first: 2**27 took 2 GiB.
    error, peak = refusal_and_peak(tmp_path, b"\x80\x02Nr" + struct.pack("<I", index) + b".")
    assert f"LONG_BINPUT {index} skips memo entries (it is memo write 1)" in str(error)
    assert peak < 1_000_000
    error, _ = refusal_and_peak(tmp_path, b"\x80\x02Nq\x00j" + struct.pack("<I", 5) + b".")
    assert "missing" in str(error)  # LONG_BINGET of an entry never stored
    # The first write may use index 0 (pickle) or 1 (Python 2's cPickle), no later one.
    error, _ = refusal_and_peak(tmp_path, b"\x80\x02Nq\x02.")
    assert "BINPUT 2 skips memo entries (it is memo write 1)" in str(error)


def nested_codec_argument(depth: int) -> bytes:
    """_codecs.encode("x", lists x[i+1] = [x[i], x[i]], i < depth): 2**depth lists in ~10 bytes each."""
    levels = b"".join(
        b"](h" + bytes([i]) + b"h" + bytes([i]) + b"eq" + bytes([i + 1]) for i in range(depth)
    )
    return (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00x(]q\x00" + levels
            + b"t\x86R.")  # the lists as one tuple: the encoding


def test_containers_shared_through_the_memo_are_refused_before_they_nest(tmp_path: Path) -> None:
    # 2**20 lists from 262 bytes; the refusal used to render the encoding whole before
    # cutting its text to 40 characters (40 levels: MemoryError at 1.5 GB).
    error, peak = refusal_and_peak(tmp_path, nested_codec_argument(20))
    assert "holds a list, dict or tuple" in str(error)
    assert peak < 1_000_000


def test_a_refused_codec_argument_is_named_by_its_type_not_its_content(tmp_path: Path) -> None:
    write_pickle(tmp_path, Call(codecs.encode, ("x", list(range(1000, 3000)))))
    with pytest.raises(CIFAR10FormatError, match=r"_codecs\.encode\(str, a list\)") as err:
        load_cifar10(tmp_path)
    assert "1000" not in str(err.value)


@pytest.mark.parametrize(
    ("shape", "multiplied", "reason"),
    [
        ((2**62,) * 1_000 + (0,), [], "1001 dimensions"),
        ((2**62,) * 64, [64], "more than a batch of 10000 images"),  # 3,968 bits: still quick
    ],
    ids=["too-many-sides", "64-huge-sides"],
)
def test_a_shape_of_many_huge_sides_is_refused_before_it_is_multiplied_out(
    monkeypatch: pytest.MonkeyPatch, shape: tuple, multiplied: list[int], reason: str
) -> None:
    # The product of N sides of 2**62 grows to 62 N bits: quadratic time (2 MB of file: 40 min).
    # A file cannot hold a side over 64 bits (the scan refuses such integers): checked directly.
    products = []
    monkeypatch.setattr(dataset.math, "prod", lambda sides: products.append(len(sides)) or 2**60)
    with pytest.raises(dataset._NotABatch, match=reason):
        dataset._byte_count(shape, np.dtype(np.uint8))
    assert products == multiplied


def test_a_side_of_more_than_64_bits_is_refused_before_any_shape_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The scan's integer limit is what keeps _byte_count's product quick: it checks no sides.
    monkeypatch.setattr(dataset, "_byte_count", lambda *args: pytest.fail("shape read"))
    write_pickle(tmp_path, array_call((2**100,) * 64, b""))
    with pytest.raises(CIFAR10FormatError, match="an integer of 101 bits"):
        load_cifar10(tmp_path)


def test_a_huge_shape_in_a_file_is_refused_with_its_path(tmp_path: Path) -> None:
    path = write_pickle(tmp_path, array_call((2**62,) * 64, b""))
    with pytest.raises(CIFAR10FormatError, match="more than a batch of 10000 images") as err:
        load_cifar10(tmp_path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("keys", "int_bits", "reason"),
    [
        # All hash to 0; beyond 64 bits (k >= 8) they are refused as integers no batch holds...
        ([k * (2**61 - 1) for k in range(1, 5_000)], 64, "an integer of 65 bits"),
        # ... and without that limit, by the count of dict entries before the dict is built.
        ([k * (2**61 - 1) for k in range(1, 5_000)], 10**6, "1000 dict entries"),
        (list(range(1_000)), 64, "1000 dict entries"),
    ],
    ids=["keys-that-hash-alike", "keys-that-hash-alike-past-the-int-limit", "small-int-keys"],
)
def test_a_dict_beyond_a_batchs_is_refused_before_it_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keys: list[int], int_bits: int, reason: str
) -> None:
    # Keys k * (2**61 - 1) all hash to 0: building the dict took quadratic time (519 KB: 8.6 s).
    monkeypatch.setattr(dataset._BatchUnpickler, "load", lambda self: pytest.fail("unpickled"))
    monkeypatch.setattr(dataset, "_MAX_INT_BITS", int_bits)
    path = write_pickle(tmp_path, dict.fromkeys(keys))
    with pytest.raises(CIFAR10FormatError, match=reason) as err:
        load_cifar10(tmp_path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "content",
    [
        b"\x80\x04(" + b"\x8f" * 200_000 + b"l.",  # empty sets: 216 bytes each from 1
        b"\x80\x02]" + b"]a" * 300_000 + b".",  # empty lists, each appended to the first
        b"\x80\x02(" + b"K\x00" * 300_000 + b"l.",  # small ints, in one list
    ],
    ids=["empty-sets", "empty-lists", "ints"],
)
def test_many_small_objects_are_refused_in_memory_bounded_by_the_file(
    tmp_path: Path, content: bytes
) -> None:
    _, peak = refusal_and_peak(tmp_path, content)
    assert peak < len(content) + 1_000_000  # the file, read once, and a little more


@pytest.mark.parametrize(
    ("objects", "passes_scan"),
    [(b"]a", True), (b"}a", True), (b"N\x85a", True), (b"\x8fa", False)],
    ids=["empty-lists", "empty-dicts", "1-tuples", "empty-sets"],
)
def test_a_file_under_the_opcode_cap_costs_a_bounded_multiple_of_its_size(
    tmp_path: Path, objects: bytes, passes_scan: bool
) -> None:
    # The costliest objects a few bytes build (an empty dict: ~80 bytes from 2), appended to one
    # list up to the opcode cap, so memory stays bounded by the file's size and by the cap. An
    # empty set costs 216 bytes from 1: the scan refuses it.
    content = b"\x80\x04]" + objects * ((dataset._MAX_OPCODES - 3) // len(objects)) + b"."
    if passes_scan:
        dataset._scan_pickle(content)
    else:
        with pytest.raises(dataset._NotABatch):
            dataset._scan_pickle(content)
    _, peak = refusal_and_peak(tmp_path, content)  # not a batch: no dict
    assert peak < 50 * len(content)


def batch_with(field: str, opcodes: bytes) -> bytes:
    """A valid pickled one-image batch whose `field` is replaced by raw pickle opcodes."""
    images, labels = synthetic_cifar10(1)
    batch = {"data": images.reshape(1, -1), "labels": list(labels), field: "REPLACED"}
    return pickle.dumps(batch, protocol=2).replace(b"X\x08\x00\x00\x00REPLACED", opcodes)


@pytest.mark.parametrize("field", ["data", "labels", "whole batch"])
def test_deeply_nested_lists_are_reported_with_the_path(tmp_path: Path, field: str) -> None:
    depth = 100_000
    nested = b"]" * depth + b"a" * (depth - 1)  # EMPTY_LIST x depth, APPEND x depth - 1
    path = tmp_path / BATCH_FOLDER / "data_batch_1"
    path.parent.mkdir()
    whole = b"\x80\x02" + nested + b"."
    path.write_bytes(whole if field == "whole batch" else batch_with(field, nested))
    with pytest.raises(CIFAR10FormatError) as err:
        load_cifar10(tmp_path)
    assert str(path) in str(err.value)


def test_a_tuple_nested_deeper_than_a_batch_is_refused_before_it_is_unpickled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 190 KB: a dict key nested 190,000 tuples deep. Unpickled, hashing it recursed in C and
    # killed the process (a segfault), though no mark nests.
    monkeypatch.setattr(dataset._BatchUnpickler, "load", lambda self: pytest.fail("unpickled"))
    error, _ = refusal_and_peak(tmp_path, b"\x80\x02})" + b"\x85" * 190_000 + b"Ns.")
    assert "objects nested 9 deep, more than the 8 allowed (a batch nests 6)" in str(error)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        # A dtype stored in the memo, held by a tuple, then changed: set to state holding that
        # tuple, it would hold itself, nesting without end behind the depth the scan recorded.
        (b"\x80\x02cnumpy\ndtype\nq\x00X\x02\x00\x00\x00u1\x85Rq\x01h\x01\x85b.",
         "BUILD changes an object another holds"),
        # BUILD on a global set attributes of the reader's own methods, for the next file to find.
        (b"\x80\x02cnumpy\ndtype\n}X\x01\x00\x00\x00aK\x01sb.",
         "BUILD changes a string, number or global"),
    ],
    ids=["changed-after-being-held", "build-on-a-global"],
)
def test_an_object_is_refused_changed_once_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, reason: str
) -> None:
    monkeypatch.setattr(dataset._BatchUnpickler, "load", lambda self: pytest.fail("unpickled"))
    error, _ = refusal_and_peak(tmp_path, content)
    assert reason in str(error)


def with_memo_from_1(pickled: bytes) -> bytes:
    """A protocol-2 pickle with its memo numbered from 1, as Python 2's cPickle numbers it."""
    ops = list(pickletools.genops(pickled))
    ends = [position for _, _, position in ops[1:]] + [len(pickled)]
    parts = []
    for (opcode, arg, position), end in zip(ops, ends):
        if opcode.name in ("BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET"):
            short, long = (b"q", b"r") if "PUT" in opcode.name else (b"h", b"j")
            index = arg + 1
            parts.append(short + bytes([index]) if index < 256 else long + struct.pack("<I", index))
        else:
            parts.append(pickled[position:end])
    return b"".join(parts)


def test_a_batch_with_cpickles_memo_numbered_from_1_reads(tmp_path: Path) -> None:
    # Python 2's cPickle, which wrote the official batches, numbers its memo from 1: such a
    # batch was refused as skipping a memo entry. Labels as numpy ints share their dtype
    # through the memo, so the batch reads it back (BINGET) too.
    images, labels = synthetic_cifar10(300)
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    pickled = with_memo_from_1(pickle.dumps({"data": rows, "labels": list(labels)}, protocol=2))
    memo_ops = [(op.name, arg) for op, arg, _ in pickletools.genops(pickled) if "PUT" in op.name
                or "GET" in op.name]
    assert memo_ops[0] == ("BINPUT", 1) and ("LONG_BINPUT", 256) in memo_ops
    assert any(name == "BINGET" for name, _ in memo_ops)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickled)
    read_images, read_labels = read_batch(path)
    np.testing.assert_array_equal(read_images, images)
    np.testing.assert_array_equal(read_labels, labels)


def as_numpy_1(pickled: bytes) -> bytes:
    """A pickle by numpy 2 as numpy 1.26 writes it, numpy.core for numpy._core.

    Checked against numpy 1.26.4: for protocols 2 to 5 the result equals its own pickle of the
    same batch, once both are put through pickletools.optimize (which drops unused memo PUTs).
    """
    for module in (b"multiarray", b"numeric"):
        old, new = b"numpy._core." + module, b"numpy.core." + module
        pickled = pickled.replace(old + b"\n", new + b"\n")  # GLOBAL: protocols 2 and 3
        pickled = pickled.replace(  # SHORT_BINUNICODE for STACK_GLOBAL: protocols 4 and 5
            b"\x8c" + bytes([len(old)]) + old, b"\x8c" + bytes([len(new)]) + new
        )
    return pickletools.optimize(pickled)  # re-frames protocols 4 and 5 around the shorter names


@pytest.mark.parametrize("numpy_version", ["numpy 2", "numpy 1.26"])
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_batches_of_every_protocol_by_numpy_1_or_2_read_alike(
    tmp_path: Path, protocol: int, numpy_version: str
) -> None:
    # Protocol 5 pickles arrays as numpy's _frombuffer(bytearray, ...); protocol 2 pickles an
    # empty array's b"" as bytes(). Both were refused as corrupt.
    images, labels = synthetic_cifar10(3)
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    path = tmp_path / "data_batch_1"
    saved_labels = (labels.tolist(), list(labels), labels, np.zeros(0, np.int64))
    for saved in saved_labels:  # ints, numpy ints, an int64 array, an empty array
        batch_rows = rows[: len(saved)]
        pickled = pickle.dumps({"data": batch_rows, "labels": saved}, protocol=protocol)
        if numpy_version == "numpy 1.26":
            pickled = as_numpy_1(pickled)
            assert b"_core" not in pickled
        path.write_bytes(pickled)
        read_images, read_labels = read_batch(path)
        np.testing.assert_array_equal(read_images, images[: len(saved)])
        np.testing.assert_array_equal(read_labels, np.asarray(saved))
        assert read_images.shape == (len(saved), 32, 32, 3) and read_labels.dtype == np.int64


def official_layout(rows: np.ndarray, labels: np.ndarray) -> bytes:
    """A batch pickled as the official files are (Python 2's cPickle, protocol 2): each list in
    one run, and each string, list, dict, global and call result stored in a memo numbered
    from 1."""
    memo = itertools.count(1)

    def put() -> bytes:  # BINPUT, or LONG_BINPUT past 255
        index = next(memo)
        return b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)

    def text(value: bytes) -> bytes:  # SHORT_BINSTRING
        return b"U" + bytes([len(value)]) + value + put()

    return b"".join([
        b"\x80\x02}", put(), b"(", text(b"batch_label"), text(b"training batch 1 of 5"),
        text(b"labels"), b"]", put(), b"(", b"".join(b"K" + bytes([int(v)]) for v in labels), b"e",
        text(b"data"), b"cnumpy.core.multiarray\n_reconstruct\n", put(), b"cnumpy\nndarray\n",
        put(), b"K\x00\x85", text(b"b"), b"\x87R", put(), b"(K\x01M", struct.pack("<H", len(rows)),
        b"M\x00\x0c\x86cnumpy\ndtype\n", put(), text(b"u1"), b"K\x00K\x01\x87R", put(), b"(K\x03",
        text(b"|"), b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T",
        struct.pack("<I", rows.nbytes), rows.tobytes(), put(), b"tb", text(b"filenames"), b"]",
        put(), b"(",
        b"".join(text(b"img_%05d.png" % i) for i in range(len(rows))), b"eu.",
    ])


def test_a_full_batch_in_the_official_layout_reads(tmp_path: Path) -> None:
    # 10,000 labels, then 10,000 filenames, each list appended in one run: 10,000 objects on
    # the pickle stack at once, as in the official files (and shared/cifar10-jpeg/build.py's).
    # Their memo, numbered from 1 by cPickle, was refused as skipping an entry.
    labels = np.arange(dataset.BATCH_IMAGES) % len(CLASSES)
    rows = np.repeat(labels.astype(np.uint8)[:, None], IMAGE, axis=1)
    path = tmp_path / "data_batch_1"
    path.write_bytes(official_layout(rows, labels))
    images, read_labels = read_batch(path)
    np.testing.assert_array_equal(read_labels, labels)
    assert images.shape == (10_000, 32, 32, 3) and (images[:, 0, 0, 0] == labels).all()


def test_dataset_imports_and_reads_without_numpy_2s_core_module(cifar_root: Path) -> None:
    # numpy 1.x has numpy.core but no numpy._core. transforms comes first because torch and
    # OpenCV need numpy._core on numpy 2; dataset.py itself must not.
    code = (
        "import sys, numpy, transforms\n"
        "vars(numpy).pop('_core', None)\n"
        "sys.modules['numpy._core'] = None\n"
        "import dataset\n"
        f"images, labels = dataset.load_cifar10({str(cifar_root)!r})\n"
        "print(images.shape, labels.dtype)\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["(20,", "32,", "32,", "3)", "int64"]


def test_python_2_batches_with_bytes_as_text_load(tmp_path: Path) -> None:
    # the official batches were pickled by Python 2: an array's bytes arrive as latin1 text
    write_pickle(tmp_path, array_call((1, IMAGE), "\xff" * IMAGE))
    images, labels = load_cifar10(tmp_path)
    assert images.shape == (1, 32, 32, 3) and (images == 255).all() and labels.tolist() == [0]


def test_labels_saved_as_numpy_ints_or_as_an_array_load(tmp_path: Path) -> None:
    images, labels = synthetic_cifar10(5)
    path = tmp_path / BATCH_FOLDER / "data_batch_1"
    path.parent.mkdir()
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    for saved in (list(labels), labels):  # a list of numpy int64 scalars; one int64 array
        path.write_bytes(pickle.dumps({"data": rows, "labels": saved}, protocol=2))
        np.testing.assert_array_equal(load_cifar10(tmp_path)[1], labels)


# --- Downloading: md5-checked, unpacked whole, and offline errors that say what to do. ---


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files without logging each request."""

    def log_message(self, format: str, *args: object) -> None:
        """Drop the request's log line."""


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder served over HTTP on localhost (no network needed), with CIFAR10_URL in it."""
    folder = tmp_path / "served"
    folder.mkdir()
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    handler = functools.partial(QuietHandler, directory=str(folder))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        url = f"http://127.0.0.1:{server.server_port}/cifar-10-python.tar.gz"
        monkeypatch.setattr(dataset, "CIFAR10_URL", url)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            yield folder
        finally:  # a server left running would keep pytest from exiting
            server.shutdown()
            thread.join()


def make_archive(folder: Path, images: np.ndarray, labels: np.ndarray) -> str:
    """Write a small CIFAR-10 archive (a training and a test batch) into `folder`; its md5."""
    source = folder.parent / "source" / BATCH_FOLDER
    write_batch(source / "data_batch_1", images[:12], labels[:12])
    write_batch(source / "test_batch", images[12:], labels[12:])
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=BATCH_FOLDER)
    return hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_checks_and_unpacks_the_archive_and_keeps_it(
    served: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels = synthetic_cifar10(20, seed=2)
    monkeypatch.setattr(dataset, "CIFAR10_MD5", make_archive(served, images, labels))
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(b"cut off")  # an interrupted earlier download
    train_images, train_labels = load_cifar10(root, download=True)
    np.testing.assert_array_equal(train_images, images[:12])
    np.testing.assert_array_equal(train_labels, labels[:12])
    assert sorted(p.name for p in root.iterdir()) == [BATCH_FOLDER, "cifar-10-python.tar.gz"]
    # offline now: the kept, checked archive unpacks the test batch without the network
    (served / "cifar-10-python.tar.gz").unlink()
    test_images, _ = load_cifar10(root, train=False, download=True)
    np.testing.assert_array_equal(test_images, images[12:])


def test_a_download_with_the_wrong_md5_is_refused_and_deleted(
    served: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_archive(served, *synthetic_cifar10(20))
    monkeypatch.setattr(dataset, "CIFAR10_MD5", "0" * 32)
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    with pytest.raises(CIFAR10FormatError, match="md5") as err:
        load_cifar10(archive.parent, download=True)
    assert str(archive) in str(err.value)
    assert list(archive.parent.iterdir()) == []  # nothing left to be trusted next time


def test_an_offline_download_names_the_url_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError) as err:
        load_cifar10(tmp_path, download=True)
    message = str(err.value)
    assert dataset.CIFAR10_URL in message and "S9_DATA" in message and BATCH_FOLDER in message
    assert list(tmp_path.iterdir()) == []


# --- CIFAR10Dataset refuses images and labels it would silently mistrain on. ---


@pytest.mark.parametrize(
    ("convert", "given", "fix"),
    [
        (lambda im: im / 255.0, "float64", "(images * 255).round().astype(np.uint8)"),
        (lambda im: im.astype(np.uint16) * 257, "uint16", "(images // 257).astype(np.uint8)"),
        (lambda im: im.astype(np.int64), "int64", "images.astype(np.uint8)"),
        (lambda im: im.transpose(0, 3, 1, 2), "(4, 3, 32, 32)", "images.transpose(0, 2, 3, 1)"),
        (lambda im: im[..., :1], "(4, 32, 32, 1)", "np.repeat(images, 3, axis=-1)"),
        (lambda im: im[..., 0], "(4, 32, 32)", "np.repeat(images[..., None], 3, axis=-1)"),
    ],
    ids=["float-0..1", "uint16", "int64", "channels-first", "one-channel", "greyscale"],
)
def test_dataset_refuses_images_it_would_mistrain_on_and_says_how_to_convert(
    convert, given: str, fix: str
) -> None:
    images, labels = synthetic_cifar10(4)
    wrong = convert(images)
    with pytest.raises(ValueError) as err:
        CIFAR10Dataset(wrong, labels, eval_transforms())
    assert given in str(err.value) and fix in str(err.value)
    fixed = eval(fix, {"np": np, "images": wrong})  # the suggested conversion, run as printed
    expected = np.repeat(images[..., :1], 3, axis=-1) if "repeat" in fix else images
    np.testing.assert_array_equal(CIFAR10Dataset(fixed, labels, eval_transforms()).images, expected)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.arange(4) / 1.0, "labels are float64"),
        (np.array([0, 1, 2, 10]), "labels span 0..10"),
        (np.eye(10, dtype=np.int64)[:4], "argmax"),
    ],
    ids=["float", "out-of-range", "one-hot"],
)
def test_dataset_refuses_labels_that_are_not_class_indices(
    labels: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        CIFAR10Dataset(synthetic_cifar10(4)[0], labels, eval_transforms())


def test_validation_split_is_stratified_disjoint_and_seeded() -> None:
    whole = load_splits(None, synthetic_fallback=True)
    splits = load_splits(None, synthetic_fallback=True, validation=500)
    again = load_splits(None, synthetic_fallback=True, validation=500)
    other = load_splits(None, synthetic_fallback=True, validation=500, split_seed=1)
    assert len(splits.val_labels) == 500 and len(splits.train_labels) == len(whole.train_labels) - 500
    assert np.bincount(splits.val_labels).tolist() == [50] * len(CLASSES)
    rows = {row.tobytes() for row in splits.val_images}
    assert not rows & {row.tobytes() for row in splits.train_images}  # synthetic rows are unique
    np.testing.assert_array_equal(splits.val_images, again.val_images)
    assert not np.array_equal(splits.val_images, other.val_images)
    np.testing.assert_array_equal(splits.test_images, whole.test_images)  # test set untouched


def test_stratified_indices_keep_class_shares_and_refuse_impossible_sizes() -> None:
    labels = np.array([0] * 70 + [1] * 20 + [2] * 10)
    picked = stratified_indices(labels, 10, seed=3)
    assert len(set(picked.tolist())) == 10
    assert np.bincount(labels[picked]).tolist() == [7, 2, 1]
    with pytest.raises(ValueError, match="cannot hold out 100 of 100 training images"):
        stratified_indices(labels, 100)


def test_eval_loaders_keep_their_workers_and_train_loaders_restart_theirs() -> None:
    images, labels = synthetic_cifar10(32)
    data = CIFAR10Dataset(images, labels, eval_transforms())
    train_loader, test_loader = make_loaders(data, data, batch_size=8, workers=2)
    assert test_loader.persistent_workers and not train_loader.persistent_workers
    assert eval_loader(data, 8, workers=0).batch_size == 16


def test_a_folder_with_training_batches_but_no_test_batch_is_named_not_replaced(
    tmp_path: Path,
) -> None:
    images, labels = synthetic_cifar10(20, seed=0)
    write_batch(tmp_path / BATCH_FOLDER / "data_batch_1", images, labels)
    with pytest.raises(FileNotFoundError, match="No CIFAR-10 test batches in"):
        load_splits(tmp_path, synthetic_fallback=True)
