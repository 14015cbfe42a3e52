"""fit trains, repeats, resumes exactly (and only the same run), stops on divergence, never
overwrites or corrupts a run; History, scoring and plots work."""

import contextlib
import copy
import dataclasses
import errno
import functools
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest
import torch
from torch import nn

from dataset import CIFAR10Dataset, eval_loader, make_loaders, synthetic_cifar10
from model import Net
from transforms import eval_transforms
from transforms import train_transforms
import utils
from utils import (
    CheckpointError,
    History,
    NonFiniteLossError,
    TrainConfig,
    _cudnn_autotuning,
    _load_checkpoint,
    _make_optimizer,
    _make_scheduler,
    _save_checkpoint,
    _train_epoch,
    _TrainState,
    autocast,
    confusion_matrix,
    evaluate,
    fit,
    format_table,
    get_device,
    half_dtype,
    load_weights,
    misclassified,
    per_class_accuracy,
    plot_confusion_matrix,
    plot_history,
    plot_lr_schedule,
    plot_misclassified,
    WeightAverage,
    seed_everything,
    show_samples,
)

CONFIG = TrainConfig(batch_size=32, max_lr=0.05, ema_decay=0.0, log_every=2)


def loaders(n_train: int = 320, n_test: int = 100, batch_size: int = CONFIG.batch_size,
            workers: int = 0, augment: dict | None = None):
    images, labels = synthetic_cifar10(n_train + n_test, seed=0)
    train = CIFAR10Dataset(images[:n_train], labels[:n_train], train_transforms(**augment or {}))
    test = CIFAR10Dataset(images[n_train:], labels[n_train:], eval_transforms())
    return make_loaders(train, test, batch_size=batch_size, workers=workers, seed=CONFIG.seed)


def recipe(epochs: int) -> TrainConfig:
    return dataclasses.replace(CONFIG, epochs=epochs)


def train(epochs: int, **kwargs) -> History:
    seed_everything(0)
    return fit(Net(), *loaders(), device="cpu", config=recipe(epochs), progress=False, **kwargs)


def tiny_fit(folder: Path | None, model: nn.Module | None = None, n_train: int = 64,
             test: bool = True, resume: bool = False, augment: dict | None = None,
             allow_other_setup: bool = False, **changes) -> History:
    """A fast run: 64 training images (2 steps of 32 per epoch), 20 test images, 1 epoch."""
    seed_everything(0)
    config = dataclasses.replace(CONFIG, **{"epochs": 1, **changes})
    train_loader, test_loader = loaders(n_train, 20, config.batch_size, augment=augment)
    return fit(model or Net(), train_loader, test_loader if test else None, config=config,
               device="cpu", checkpoint_dir=folder, resume=resume, progress=False,
               allow_other_setup=allow_other_setup)


def test_training_learns_the_synthetic_classes() -> None:
    history = train(epochs=4)
    assert history.epochs == 4
    assert history.train_loss[-1] < history.train_loss[0]
    assert history.test_acc[-1] >= 60.0  # chance is 10%
    assert len(history.batch_lr) == 4 * 10
    assert all(len(values) == 4 for values in (history.lr, history.seconds, history.test_loss))


def test_one_cycle_schedule_rises_to_max_lr_and_completes() -> None:
    history = train(epochs=2)
    lrs = history.batch_lr
    peak = max(lrs)
    assert peak == pytest.approx(CONFIG.max_lr, rel=0.06)
    assert lrs[0] == pytest.approx(CONFIG.max_lr / CONFIG.div_factor)
    assert lrs[-1] < CONFIG.max_lr / CONFIG.div_factor / 10  # annealed far below the start


def test_the_same_seed_gives_the_same_history() -> None:
    a, b = train(epochs=2), train(epochs=2)
    assert a.train_loss == b.train_loss and a.test_acc == b.test_acc


def test_each_epoch_iterates_the_train_loader_once_with_progress_bars(monkeypatch) -> None:
    # tqdm.auto calls iter() on what it is given: an extra iterator per epoch would start
    # idle workers and draw from the shuffle generator.
    train_loader, test_loader = loaders()
    calls = []
    original = type(train_loader).__iter__
    monkeypatch.setattr(type(train_loader), "__iter__",
                        lambda self: calls.append(self is train_loader) or original(self))
    fit(Net(), train_loader, test_loader, device="cpu", config=recipe(2), progress=True)
    assert calls.count(True) == 2


class InterruptAt(nn.Module):
    """Wraps Net; the n-th training forward pass raises KeyboardInterrupt, like Ctrl-C."""

    def __init__(self, n: int | None = None) -> None:
        super().__init__()
        self.net, self.n, self.calls = Net(), n, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.n:
                raise KeyboardInterrupt
        return self.net(x)


@pytest.mark.parametrize(
    "changes",
    [{"ema_decay": 0.0, "ema_warmup": False}, {"ema_decay": 0.9, "ema_warmup": False},
     {"ema_decay": 0.99, "ema_warmup": True},
     {"ema_decay": 0.0, "optimizer": "adamw", "anneal": "cos", "max_lr": 0.005}],
    ids=["no-average", "average", "warmed-up-average", "adamw-cosine"],
)
def test_resume_ends_with_the_same_history_as_an_uninterrupted_run(
    tmp_path: Path, changes: dict
) -> None:
    config = dataclasses.replace(recipe(3), **changes)
    ema_decay = config.ema_decay
    folder, full_folder = tmp_path / "resumed", tmp_path / "full"
    seed_everything(0)
    full = fit(InterruptAt(), *loaders(), device="cpu", config=config, progress=False,
               checkpoint_dir=full_folder)
    seed_everything(0)
    with pytest.raises(KeyboardInterrupt):
        fit(InterruptAt(n=10 + 5), *loaders(), device="cpu", config=config,
            checkpoint_dir=folder, progress=False)
    assert History.load(folder / "history.json").epochs == 1
    seed_everything(123)  # a new session does not share the interrupted one's RNG state
    resumed = fit(InterruptAt(), *loaders(), device="cpu", config=config,
                  checkpoint_dir=folder, resume=True, progress=False)
    assert resumed.epochs == 3
    assert resumed.train_loss == full.train_loss
    assert resumed.test_acc == full.test_acc
    assert resumed.ema_test_acc == full.ema_test_acc
    assert len(resumed.ema_test_acc) == (3 if ema_decay else 0)
    assert History.load(folder / "history.json") == resumed
    assert resumed.batch_lr == full.batch_lr
    # On the CPU the resumed run repeats the uninterrupted one bit for bit (the README's claim).
    saved = [torch.load(f / "last.pt", weights_only=True) for f in (folder, full_folder)]
    for part in ("model", "ema"):
        assert saved[0][part].keys() == saved[1][part].keys()
        for key, tensor in saved[0][part].items():
            assert torch.equal(tensor, saved[1][part][key]), f"{part}.{key}"


def test_resume_with_loader_workers_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    def run(model: nn.Module, **kwargs) -> History:
        return fit(model, *loaders(128, 40, workers=2), device="cpu", config=recipe(2),
                   progress=False, **kwargs)

    seed_everything(0)
    full = run(InterruptAt())
    seed_everything(0)
    with pytest.raises(KeyboardInterrupt):
        run(InterruptAt(n=4 + 2), checkpoint_dir=tmp_path)  # 4 batches per epoch: mid-epoch 2
    assert History.load(tmp_path / "history.json").epochs == 1
    seed_everything(123)
    resumed = run(InterruptAt(), checkpoint_dir=tmp_path, resume=True)
    assert resumed.train_loss == full.train_loss
    assert resumed.test_acc == full.test_acc
    assert resumed.batch_lr == full.batch_lr


@pytest.fixture(scope="module")
def last_pt(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The last.pt of a finished `tiny_fit` run (CPU: its GradScaler state is empty)."""
    folder = tmp_path_factory.mktemp("run")
    tiny_fit(folder)
    return (folder / "last.pt").read_bytes()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy(model.state_dict())


def assert_same_weights(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_resume_refuses_a_checkpoint_from_a_different_recipe(tmp_path: Path, last_pt: bytes) -> None:
    (tmp_path / "last.pt").write_bytes(last_pt)
    with pytest.raises(CheckpointError, match=r"last.pt holds a different run: epochs \(1 in the "
                       r"checkpoint, 2 now\)\. Resume with the same config.*resume=False"):
        tiny_fit(tmp_path, epochs=2, resume=True)


def test_resume_refuses_other_training_data_or_batch_size(tmp_path: Path, last_pt: bytes) -> None:
    (tmp_path / "last.pt").write_bytes(last_pt)
    model = Net()
    before = weights(model)
    with pytest.raises(ValueError, match=r"train_images \(64 in the checkpoint, 80 now\)\. ") as error:
        tiny_fit(tmp_path, model=model, n_train=80, resume=True)  # still 2 steps per epoch
    assert "steps_per_epoch" not in str(error.value)
    with pytest.raises(ValueError, match=r"batch_size \(32 in the checkpoint, 16 now\); "
                       r"steps_per_epoch \(2 in the checkpoint, 4 now\)"):
        tiny_fit(tmp_path, model=model, batch_size=16, resume=True)
    assert_same_weights(model, before)


def truncated(keep: int) -> Callable[[Path], object]:
    """Writes a torch file cut after `keep` bytes, as a kill mid-copy leaves it."""
    def write(path: Path) -> None:
        torch.save({"model": Net().state_dict()}, path)
        path.write_bytes(path.read_bytes()[:keep])
    return write


def flip_a_bit(content: bytes, record: str = "data/0", offset: int | None = None) -> bytes:
    """A torch.save zip with one bit flipped in `record`, at `offset` (None: halfway through)."""
    archive = zipfile.ZipFile(io.BytesIO(content))
    info = next(i for i in archive.infolist() if i.filename.endswith(f"/{record}"))
    name_length, extra_length = struct.unpack("<HH", content[info.header_offset + 26:][:4])
    start = info.header_offset + 30 + name_length + extra_length
    flipped = bytearray(content)
    flipped[start + (info.file_size // 2 if offset is None else offset)] ^= 0x10
    return bytes(flipped)


def flipped_checkpoint(record: str, offset: int | None = None) -> Callable[[Path], object]:
    """Writes a checkpoint of Net's weights, then flips one bit in `record` (see flip_a_bit)."""
    def write(path: Path) -> None:
        torch.save({"model": Net().state_dict()}, path)
        path.write_bytes(flip_a_bit(path.read_bytes(), record, offset))
    return write


def compressed_checkpoint(path: Path) -> None:
    """Writes a checkpoint of Net's weights with its records compressed, as no torch.save does."""
    torch.save({"model": Net().state_dict()}, path)
    packed = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as source, \
            zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    path.write_bytes(packed.getvalue())


BAD_FILES: dict[str, tuple[Callable[[Path], object], str]] = {
    "zero bytes": (lambda path: path.write_bytes(b""),
                   r"is not a readable checkpoint \(BadZipFile: File is not a zip file\)"),
    "truncated": (truncated(100_000), r"is not a readable checkpoint \(\w+"),
    "cut near the start": (truncated(5_000), r"is not a readable checkpoint \(\w+"),
    "not a torch file": (lambda path: path.write_text("epoch 3\n"), "is not a readable checkpoint"),
    "bare state_dict": (lambda path: torch.save(Net().state_dict(), path),
                        r"is not a checkpoint written by this version of fit: it has no 'model'"
                        r"[^.]* entr(y|ies)\. It looks like a bare state_dict, which loads with model.load_state_dict"),
    "one flipped bit": (flipped_checkpoint("data/0"), r"is corrupt: its record \S+/data/0 no longer "
                        r"matches the CRC-32 checksum it was saved with \(a bit changed on disk or "
                        r"in a copy\)\."),
    # Its first opcode changed: unpickled before its checksum was checked, it was "not a
    # readable checkpoint".
    "one flipped bit in the pickle": (flipped_checkpoint("data.pkl", offset=0),
                                      r"is corrupt: its record \S+/data\.pkl no longer matches"),
    # Reported as failing its checksum.
    "compressed": (compressed_checkpoint, r"is not a checkpoint written by fit: its record \S+ is "
                   "compressed, which torch.save never does"),
    "a directory": (lambda path: path.mkdir(), "cannot be a checkpoint: it is a directory, not a regular file"),
    "a FIFO": (os.mkfifo, r"cannot be a checkpoint: it is a FIFO \(named pipe\), not a regular file"),
    "a link to /dev/zero": (lambda path: path.symlink_to("/dev/zero"),
                            "cannot be a checkpoint: it is a character device, not a regular file"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_resume_refuses_a_bad_last_pt_naming_it_and_the_fix(tmp_path: Path, kind: str) -> None:
    write, reason = BAD_FILES[kind]
    write(tmp_path / "last.pt")
    model = Net()
    before = weights(model)
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "last.pt")) + f" {reason}"
                       r".* Delete it, or pass resume=False to start a new run"):
        tiny_fit(tmp_path, model=model, resume=True)
    assert_same_weights(model, before)


@pytest.mark.parametrize("kind", BAD_FILES)
def test_load_weights_refuses_a_bad_file_naming_it_and_the_fix(tmp_path: Path, kind: str) -> None:
    write, reason = BAD_FILES[kind]
    write(tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "best.pt")) + f" {reason}"
                       r".* Pass a last.pt or best.pt written by fit\."):
        load_weights(Net(), tmp_path / "best.pt")


def test_load_weights_refuses_non_finite_weights(tmp_path: Path, last_pt: bytes) -> None:
    checkpoint = torch.load(io.BytesIO(last_pt), weights_only=True)
    checkpoint["model"]["c1.0.0.weight"][0, 0, 0, 0] = float("inf")
    torch.save(checkpoint, tmp_path / "best.pt")
    model = Net()
    before = weights(model)
    with pytest.raises(CheckpointError, match=r"best\.pt holds NaN or infinite values in "
                       r"c1\.0\.0\.weight, which fit never saves\. Pass a last\.pt "
                       r"or best\.pt written by fit"):
        load_weights(model, tmp_path / "best.pt")
    assert_same_weights(model, before)


def test_load_weights_refuses_another_network_before_copying_any_weight(
    tmp_path: Path, last_pt: bytes
) -> None:
    (tmp_path / "best.pt").write_bytes(last_pt)
    other = nn.Sequential(nn.Conv2d(3, 8, 3))
    before = weights(other)
    with pytest.raises(CheckpointError, match=r"best.pt holds the weights of a different network "
                       r"\(missing: 0.weight, 0.bias; extra: "):
        load_weights(other, tmp_path / "best.pt")
    assert_same_weights(other, before)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: c.pop("scaler"), "it has no 'scaler' entry"),
        (lambda c: c.update(scaler={"scale": 1024.0}), "incomplete GradScaler state"),
        (lambda c: c["model"].pop("c1.0.0.weight"), r"different network \(missing: c1.0.0.weight\)"),
        (lambda c: c.update(history=[]), "it has no 'history' entry"),
        (lambda c: c["config"].update(max_lr=float("nan")),
         r"last\.pt holds a recipe that TrainConfig refuses \(max_lr=nan must be finite\), which "
         r"fit never saves\. Delete it, or pass resume=False"),
        (lambda c: c["config"].update(weight_decay=1e39, div_factor=0.0),
         r"TrainConfig refuses \(div_factor=0\.0 must be in \[1, 3\.4e\+38\]; "
         r"weight_decay=1e\+39 must be in \[0, 3\.4e\+38\]\)"),
        # Resumed before: a field a resume may change went unchecked, and 1.0 == 1.
        (lambda c: c["config"].update(log_every=-5),
         r"TrainConfig refuses \(log_every=-5 must be >= 1"),
        (lambda c: c["config"].update(epochs=1.0),
         r"TrainConfig refuses \(epochs=1\.0 must be an int, not float\)"),
        (lambda c: c.update(history={"accuracy": [1.0]}), "a history this run cannot use"),
        (lambda c: c["optimizer"].update(param_groups=[]),
         r"optimizer or scheduler state other than this run's after 1 epochs: param_groups of "
         r"\[\] parameters, not this network's \[\d+, \d+\] numbered in order"),
        (lambda c: c["optimizer"]["param_groups"][0].update(
            params=list(reversed(c["optimizer"]["param_groups"][0]["params"]))),
         r"not this network's \[\d+, \d+\] numbered in order"),
        (lambda c: c["optimizer"].update(state=[]), "no 'state' dict"),
        # Checkpoints edited and saved again (so their checksums hold): each was resumed, or
        # failed only after the caller's weights were overwritten.
        (lambda c: c["scheduler"].update(last_epoch=10**6),
         r"scheduler\.last_epoch \(1000000 in the checkpoint, 2 after 1 epochs\)"),
        (lambda c: c["optimizer"]["state"][0].update(momentum_buffer=torch.zeros(3)),
         r"momentum_buffer of parameter 0 is no torch\.float32 tensor of shape \(32, 3, 3, 3\)"),
        # Resumed before, as were the two below: a scalar passed for any per-parameter tensor.
        (lambda c: c["optimizer"]["state"][0].update(momentum_buffer=torch.tensor(0.0)),
         r"momentum_buffer of parameter 0 is no torch\.float32 tensor of shape \(32, 3, 3, 3\)"),
        (lambda c: c["optimizer"]["state"].pop(2),
         r"after 1 epochs: no SGD state for parameter\(s\) 2\. "),
        (lambda c: c["optimizer"].update(state={}),
         r"no SGD state for parameter\(s\) 0, 1, 2, \.\.\."),
        (lambda c: c["optimizer"]["state"][0].update(step=torch.tensor(2.0)),
         r"state of parameter 0 holds \['momentum_buffer', 'step'\], not \['momentum_buffer'\] "
         r"\(what this optimizer writes\)"),
        (lambda c: c["optimizer"]["state"][1].update(momentum_buffer=torch.full((32,), float("nan"))),
         r"NaN or infinite values in optimizer\.state\.1\.momentum_buffer, which fit never saves"),
        (lambda c: [g.update(lr=100.0) for g in c["optimizer"]["param_groups"]],
         r"param_groups\.0\.lr \(100\.0 in the checkpoint, -?0\.\d+ now\)"),
        (lambda c: [g.update(momentum=0) for g in c["optimizer"]["param_groups"]],
         r"param_groups\.0\.momentum \(0 in the checkpoint, 0\.9 now\)"),
        (lambda c: c["history"].update(seconds=[1.0] * 99),
         r"history this run cannot have \(.*99 epochs, more than config\.epochs=1\)"),
        (lambda c: c["history"].update(test_acc=[]), r"test_acc has 0 entries, not 1"),
        (lambda c: c["model"].update({"c1.0.0.weight": c["model"]["c1.0.0.weight"].long()}),
         r"different network \(other dtype: c1\.0\.0\.weight\)"),
        (lambda c: c["model"].update({"head.1.bias": c["model"]["head.1.bias"].to(torch.complex64)}),
         r"different network \(other dtype: head\.1\.bias\)"),
        (lambda c: c["model"]["head.1.bias"].fill_(float("nan")),
         r"NaN or infinite values in model\.head\.1\.bias"),
        (lambda c: c.update(scaler={"scale": float("inf"), "growth_factor": 2.0,
                                    "backoff_factor": 0.5, "growth_interval": 2000,
                                    "_growth_tracker": 0}),
         r"GradScaler state with a bad scale \(each must be a finite number"),
    ],
)
def test_a_refused_resume_loads_nothing(
    tmp_path: Path, last_pt: bytes, damage: Callable[[dict], object], message: str
) -> None:
    checkpoint = torch.load(io.BytesIO(last_pt), weights_only=True)
    damage(checkpoint)
    torch.save(checkpoint, tmp_path / "last.pt")
    model = Net()
    before = weights(model)
    with pytest.raises(CheckpointError, match=message):
        tiny_fit(tmp_path, model=model, resume=True)
    assert_same_weights(model, before)


ADAMW = {"optimizer": "adamw", "max_lr": 0.001}


@pytest.fixture(scope="module")
def adamw_last_pt(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The last.pt of a finished `tiny_fit` run with AdamW (2 optimizer steps)."""
    folder = tmp_path_factory.mktemp("adamw")
    tiny_fit(folder, **ADAMW)
    return (folder / "last.pt").read_bytes()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: s[0].update(exp_avg=torch.tensor(0.0)),
         r"exp_avg of parameter 0 is no torch\.float32 tensor of shape \(32, 3, 3, 3\)"),
        (lambda s: s[0].update(exp_avg_sq=torch.zeros(32, 3, 3)),
         r"exp_avg_sq of parameter 0 is no torch\.float32 tensor of shape \(32, 3, 3, 3\)"),
        (lambda s: s[0].pop("exp_avg_sq"),
         r"state of parameter 0 holds \['step', 'exp_avg'\], not "
         r"\['step', 'exp_avg', 'exp_avg_sq'\]"),
        (lambda s: s[0].update(momentum_buffer=torch.zeros(32, 3, 3, 3)),
         r"state of parameter 0 holds"),
        (lambda s: s[0].update(step=torch.ones(32, 3, 3, 3)),
         r"step of parameter 0 is no scalar float tensor counting 1 to 2 optimizer steps"),
        (lambda s: s[0].update(step=torch.tensor(3.0)), r"step of parameter 0 is no scalar"),
        (lambda s: s[0].update(step=torch.tensor(1.5)), r"step of parameter 0 is no scalar"),
        (lambda s: s.pop(5),
         r"no AdamW state for parameter\(s\) 5\. Delete it, or pass resume=False"),
    ],
)
def test_a_resume_refuses_adamw_state_unlike_what_adamw_writes(
    tmp_path: Path, adamw_last_pt: bytes, damage: Callable[[dict], object], message: str
) -> None:
    checkpoint = torch.load(io.BytesIO(adamw_last_pt), weights_only=True)
    damage(checkpoint["optimizer"]["state"])
    torch.save(checkpoint, tmp_path / "last.pt")
    model = Net()
    before = weights(model)
    with pytest.raises(CheckpointError, match=r"optimizer or scheduler state other than this "
                       r"run's after 1 epochs: .*" + message):
        tiny_fit(tmp_path, model=model, resume=True, **ADAMW)
    assert_same_weights(model, before)


def test_the_optimizer_state_each_recipe_writes_resumes(
    tmp_path: Path, adamw_last_pt: bytes
) -> None:
    (tmp_path / "last.pt").write_bytes(adamw_last_pt)
    assert tiny_fit(tmp_path, resume=True, **ADAMW).epochs == 1
    plain_sgd = {"nesterov": False, "momentum": 0.0}  # keeps no per-parameter state
    tiny_fit(tmp_path / "sgd", **plain_sgd)
    assert torch.load(tmp_path / "sgd" / "last.pt", weights_only=True)["optimizer"]["state"] == {}
    assert tiny_fit(tmp_path / "sgd", resume=True, **plain_sgd).epochs == 1
    # As older torch versions saved it: a None buffer for each parameter.
    checkpoint = torch.load(tmp_path / "sgd" / "last.pt", weights_only=True)
    params = [i for group in checkpoint["optimizer"]["param_groups"] for i in group["params"]]
    checkpoint["optimizer"]["state"] = {i: {"momentum_buffer": None} for i in params}
    torch.save(checkpoint, tmp_path / "sgd" / "last.pt")
    assert tiny_fit(tmp_path / "sgd", resume=True, **plain_sgd).epochs == 1


def test_a_resume_copies_no_optimizer_or_scheduler(
    tmp_path: Path, last_pt: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each resume deep-copied the optimizer twice to check the checkpoint: every parameter,
    # on the GPU.
    (tmp_path / "last.pt").write_bytes(last_pt)
    copied = []
    deepcopy = copy.deepcopy

    def recording_deepcopy(value: object, *args: object) -> object:
        if isinstance(value, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)):
            copied.append(type(value).__name__)
        return deepcopy(value, *args)

    monkeypatch.setattr(copy, "deepcopy", recording_deepcopy)
    assert tiny_fit(tmp_path, resume=True).epochs == 1
    assert copied == []


@contextlib.contextmanager
def torch_threads(count: int):
    """torch computing with `count` threads, then as many as before."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_a_resume_in_another_setup_is_refused_naming_each_difference(
    tmp_path: Path, last_pt: bytes
) -> None:
    # Both were resumed silently, though each trains other weights than the run being resumed.
    (tmp_path / "last.pt").write_bytes(last_pt)
    model = Net()
    before = weights(model)
    threads = torch.get_num_threads()
    with torch_threads(threads + 1), pytest.raises(CheckpointError) as error:
        tiny_fit(tmp_path, model=model, resume=True, augment={"flip_p": 0.0, "cutout_p": 0.25})
    assert (
        "last.pt was trained in another setup: augmentation.transforms.0.p (0.5 in the "
        "checkpoint, 0.0 now); augmentation.transforms.2.p (0.5 in the checkpoint, 0.25 now); "
        f"torch_threads ({threads} in the checkpoint, {threads + 1} now). Resumed so, the run "
        "would not repeat an uninterrupted one. To repeat it: give the training set the "
        "augmentation that run had (the same train_transforms arguments); call "
        f"torch.set_num_threads({threads}) before fit. Or pass allow_other_setup=True to fit to "
        "continue anyway"
    ) in str(error.value)
    assert_same_weights(model, before)


def test_a_resume_in_another_setup_goes_on_when_allowed_and_says_so(
    tmp_path: Path, last_pt: bytes, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "last.pt").write_bytes(last_pt)
    history = tiny_fit(tmp_path, resume=True, epochs=1, augment={"flip_p": 0.0},
                       allow_other_setup=True)
    assert history.epochs == 1
    assert capsys.readouterr().out == (
        f"Resuming {tmp_path / 'last.pt'} in another setup (augmentation.transforms.0.p (0.5 in "
        "the checkpoint, 0.0 now)): the run goes on, but no longer repeats an uninterrupted one. "
        "Its checkpoints record each setup.\n"
    )


def test_a_checkpoint_older_than_the_setup_record_resumes_with_a_note(
    tmp_path: Path, last_pt: bytes, capsys: pytest.CaptureFixture
) -> None:
    payload = torch.load(io.BytesIO(last_pt), weights_only=True)
    del payload["setups"]  # as written before fit recorded it
    torch.save(payload, tmp_path / "last.pt")
    with torch_threads(torch.get_num_threads() + 1):
        assert tiny_fit(tmp_path, resume=True, augment={"flip_p": 0.0}).epochs == 1
    assert capsys.readouterr().out == (
        f"{tmp_path / 'last.pt'} predates records of the setup (augmentation, threads, loader "
        "workers, device, precision): resuming without checking that they are the same\n"
    )


def test_a_refused_setup_says_how_to_match_each_difference(tmp_path: Path) -> None:
    saved = {"augmentation": None, "device": "cuda", "autocast": "torch.float16",
             "loader_workers": 2}
    now = {"augmentation": "Compose", "device": "cpu", "autocast": "torch.float32",
           "loader_workers": 8, "torch_threads": 4}
    payload = {"setups": [{"from_epoch": 1, "setup": saved}]}
    with pytest.raises(CheckpointError) as error:
        utils._resumed_setups(tmp_path / "last.pt", payload, now, epochs=3, allow_other_setup=False)
    assert (
        "To repeat it: give the training set the augmentation that run had (the same "
        "train_transforms arguments); pass device='cuda' to fit; autocast to torch.float16 as "
        "that run did (TrainConfig.mixed_precision: float16 on CUDA, bfloat16 on a CPU with "
        "native bf16, else float32); build the loaders with make_loaders(..., workers=2). Or "
        "pass allow_other_setup=True to fit"
    ) in str(error.value)
    assert "torch_threads" not in str(error.value)  # the CUDA run recorded none: nothing to match


@pytest.mark.parametrize(("native_bf16", "saved", "refused"),
                         [(True, "torch.bfloat16", True), (False, "torch.float32", False)])
def test_a_resume_that_turns_mixed_precision_off_is_refused_where_it_changes_the_numbers(
    tmp_path: Path, last_pt: bytes, monkeypatch: pytest.MonkeyPatch, native_bf16: bool,
    saved: str, refused: bool,
) -> None:
    # mixed_precision is no recipe field a resume must keep: the setup records the autocast
    # dtype it gives, which is what changes the numbers (on a CPU without bf16, nothing).
    monkeypatch.setattr("utils._cpu_has_native_bf16", lambda: native_bf16)
    payload = torch.load(io.BytesIO(last_pt), weights_only=True)
    payload["setups"][-1]["setup"]["autocast"] = saved  # as a run with mixed_precision=True
    torch.save(payload, tmp_path / "last.pt")
    if not refused:
        assert tiny_fit(tmp_path, resume=True, mixed_precision=False).epochs == 1
        return
    with pytest.raises(CheckpointError, match=re.escape(
            "autocast ('torch.bfloat16' in the checkpoint, 'torch.float32' now). Resumed so, the "
            "run would not repeat an uninterrupted one. To repeat it: autocast to torch.bfloat16")):
        tiny_fit(tmp_path, resume=True, mixed_precision=False)


def test_a_gpu_run_resumes_on_a_machine_with_another_cpu_count(tmp_path: Path) -> None:
    # A Colab GPU run was refused on a VM with other cores: it recorded torch's thread count,
    # which changes no result on a GPU.
    config = dataclasses.replace(CONFIG, epochs=2)
    train_loader, _ = loaders(64, 20, config.batch_size)
    setup = utils._run_setup(train_loader, torch.device("cuda"), config)  # names it: no GPU needed
    assert "torch_threads" not in setup and setup["device"] == "cuda"
    assert "torch_threads" in utils._run_setup(train_loader, torch.device("cpu"), config)
    recorded = [{"from_epoch": 1, "setup": {**setup, "torch_threads": 96}}]  # as recorded before
    assert utils._resumed_setups(tmp_path / "last.pt", {"setups": recorded}, setup, epochs=1,
                                 allow_other_setup=False) == recorded


def test_a_resume_in_another_setup_keeps_each_setup_in_the_checkpoints(tmp_path: Path) -> None:
    # Checkpoints after such a resume held only the new setup: a mixed run looked like one.
    with pytest.raises(KeyboardInterrupt):
        tiny_fit(tmp_path, model=InterruptAt(n=2 + 1), epochs=2)  # in epoch 2
    resume = functools.partial(tiny_fit, tmp_path, model=InterruptAt(), resume=True, epochs=2)
    resume(augment={"flip_p": 0.0}, allow_other_setup=True)
    setups = torch.load(tmp_path / "last.pt", weights_only=True)["setups"]
    assert [(entry["from_epoch"], entry["setup"]["augmentation"]["transforms"][0]["p"])
            for entry in setups] == [(1, 0.5), (2, 0.0)]
    # Resumed in the latest setup, the run goes on as that stretch would have.
    assert resume(augment={"flip_p": 0.0}).epochs == 2
    with pytest.raises(CheckpointError, match=r"augmentation\.transforms\.0\.p \(0\.0 in the "
                       r"checkpoint, 0\.5 now\)"):
        resume()


def test_a_checkpoint_with_a_single_setup_record_resumes(tmp_path: Path, last_pt: bytes) -> None:
    payload = torch.load(io.BytesIO(last_pt), weights_only=True)
    payload["setup"] = payload.pop("setups")[0]["setup"]  # as written before each was kept
    torch.save(payload, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"augmentation\.transforms\.0\.p"):
        tiny_fit(tmp_path, resume=True, augment={"flip_p": 0.0})
    assert tiny_fit(tmp_path, resume=True).epochs == 1


def test_a_cpu_checkpoint_resumes_into_an_enabled_grad_scaler(tmp_path: Path, last_pt: bytes) -> None:
    """A CPU run resumed on CUDA with AMP: the empty scaler state is skipped, the rest loads."""
    (tmp_path / "last.pt").write_bytes(last_pt)
    checkpoint = torch.load(io.BytesIO(last_pt), weights_only=True)
    assert checkpoint["scaler"] == {}
    config = dataclasses.replace(CONFIG, epochs=1)
    model = Net()
    optimizer = _make_optimizer(model, config)
    state = _TrainState(model, optimizer, _make_scheduler(optimizer, config, 1, 2),
                        torch.amp.GradScaler("cpu", enabled=True), History(),
                        {"train_images": 64, "steps_per_epoch": 2, "scored": "test"},
                        setups=checkpoint["setups"])
    _load_checkpoint(tmp_path / "last.pt", state, config)
    assert_same_weights(model, checkpoint["model"])
    assert state.history.epochs == 1 and state.scaler.is_enabled()


def test_a_new_run_moves_the_earlier_run_aside_instead_of_overwriting_it(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("utils.time.strftime", lambda _: "20261127-153000")  # both moves collide
    runs = []
    for seed in (0, 1, 2):
        tiny_fit(tmp_path, seed=seed)
        runs.append({name: (tmp_path / name).read_bytes() for name in ("last.pt", "history.json")})
    first, second = tmp_path / "previous-20261127-153000", tmp_path / "previous-20261127-153000-2"
    assert {name: (first / name).read_bytes() for name in runs[0]} == runs[0]
    assert {name: (second / name).read_bytes() for name in runs[1]} == runs[1]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["config"]["seed"] == 2
    assert capsys.readouterr().out.splitlines() == [
        f"Starting a new run: moved the earlier run's last.pt, history.json to {folder}"
        for folder in (first, second)
    ]


def test_fit_removes_the_temp_files_of_a_killed_write(tmp_path: Path) -> None:
    orphans = [tmp_path / name for name in
               (".last.pt.k2x9a", ".best.pt.3fz", ".history.json.q", ".run.lock.x7")]
    for path in (*orphans, tmp_path / ".notes"):
        path.write_bytes(b"half a file")
    with pytest.raises(KeyboardInterrupt):  # the first training step: the folder is ready by then
        tiny_fit(tmp_path, model=InterruptAt(n=1))
    assert [path.name for path in tmp_path.iterdir()] == [".notes"]


class RunsAt(InterruptAt):
    """Wraps Net; the n-th training forward pass first calls `action`: what happens meanwhile."""

    def __init__(self, n: int, action: Callable[[], object]) -> None:
        super().__init__(n)
        self.action = action

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.n:
                self.action()
        return self.net(x)


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file in `folder` (not its subfolders) and its bytes."""
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def test_a_second_run_in_a_busy_folder_is_refused_and_leaves_the_first_alone(
    tmp_path: Path,
) -> None:
    # Two runs in one folder (two Colab tabs on one Drive folder): the second moved the first's
    # files aside and deleted its half-written checkpoint; the first then crashed or went on
    # writing over the second.
    in_flight = tmp_path / ".last.pt.k2x9a"  # the first run's next last.pt, being written
    refusals = []

    def second_run() -> None:
        in_flight.write_bytes(b"half a file")
        before = folder_files(tmp_path)
        with pytest.raises(utils.FolderInUseError) as error:
            tiny_fit(tmp_path)
        refusals.append(str(error.value))
        assert folder_files(tmp_path) == before
        in_flight.unlink()

    history = tiny_fit(tmp_path, model=RunsAt(2 + 1, second_run), epochs=2)  # in epoch 2
    lock = tmp_path / "run.lock"
    assert len(refusals) == 1 and re.fullmatch(
        re.escape(f"{tmp_path} is in use by another run (pid {os.getpid()} on "
                  f"{socket.gethostname()}, started ") + r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
        + r", last heartbeat \d+ min ago"
        + re.escape(f", per {lock}): two runs in one folder overwrite each other's checkpoints. "
                    f"Pass another checkpoint_dir; or, if that run has ended, delete {lock} and "
                    "run again."),
        refusals[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json", "last.pt"]  # no lock
    assert History.load(tmp_path / "history.json") == history and history.epochs == 2


def test_a_lock_whose_process_has_ended_is_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    holder = {"pid": int(ended.stdout), "host": socket.gethostname(), "started": "yesterday"}
    (tmp_path / "run.lock").write_text(json.dumps(holder))
    assert tiny_fit(tmp_path).epochs == 1
    assert capsys.readouterr().out == (
        f"Taking over {tmp_path / 'run.lock'}: its run (pid {holder['pid']} on "
        f"{holder['host']}, started yesterday, last heartbeat unknown) has ended\n"
    )
    assert not (tmp_path / "run.lock").exists()


def lock_record(**fields: object) -> dict:
    """A run.lock as another run writes it: by default on another machine, renewed just now."""
    return {"run": "0" * 32, "pid": 1, "host": "colab-vm-7f3a", "started": "2026-01-02 03:04:05",
            "heartbeat": time.time(), "epoch_seconds": 20.0, **fields}


@pytest.mark.parametrize(
    ("silent_minutes", "epoch_seconds", "taken_over"),
    [(60, 20.0, True), (5, 20.0, False), (20, 600.0, False), (40, 600.0, True)],
    ids=["cut-off-an-hour-ago", "renewed-5-min-ago", "3-long-epochs-not-yet", "3-long-epochs-past"],
)
def test_a_lock_from_another_machine_is_taken_over_once_unrenewed_for_long(
    tmp_path: Path, capsys: pytest.CaptureFixture, silent_minutes: int, epoch_seconds: float,
    taken_over: bool,
) -> None:
    # Never taken over before: after a Colab disconnect, every resume on a new VM (USE_DRIVE,
    # RESUME) stopped on the old VM's lock until the student deleted it.
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps(lock_record(heartbeat=time.time() - 60 * silent_minutes,
                                           epoch_seconds=epoch_seconds)))
    described = ("pid 1 on colab-vm-7f3a, started 2026-01-02 03:04:05, last heartbeat "
                 r"\d+ min ago")  # about silent_minutes: the test's own time passes too
    if taken_over:
        assert tiny_fit(tmp_path).epochs == 1
        assert re.fullmatch(re.escape(f"Taking over {lock}: its run (") + described
                            + r"\) has ended\n", capsys.readouterr().out)
        assert not lock.exists()
        return
    with pytest.raises(utils.FolderInUseError, match=described + re.escape(f", per {lock})")
                       + r".* not renewed for " + f"{max(10, 3 * epoch_seconds / 60):.0f} min"):
        tiny_fit(tmp_path)


def test_a_refusal_names_the_lock_s_run_its_heartbeat_and_when_it_is_taken_over(
    tmp_path: Path,
) -> None:
    now, lock = 1_000_000.0, tmp_path / "run.lock"
    holder = lock_record(heartbeat=now - 20 * 60, epoch_seconds=600.0)  # 3 epochs: 30 minutes
    assert utils._in_use_message(lock, holder, now) == (
        f"{tmp_path} is in use by another run (pid 1 on colab-vm-7f3a, started 2026-01-02 "
        f"03:04:05, last heartbeat 20 min ago, per {lock}): two runs in one folder overwrite "
        f"each other's checkpoints. Pass another checkpoint_dir; or, if that run has ended, "
        f"delete {lock} and run again; or wait: a run on another machine renews its lock every "
        "epoch, and a lock not renewed for 30 min (its Colab VM disconnected, say) is taken "
        "over, this one in 10 min."
    )


def test_a_lock_is_stale_by_its_process_here_and_by_its_heartbeat_elsewhere() -> None:
    now = 1_000_000.0

    def elsewhere(silence: float, epoch_seconds: float | None = None) -> dict:
        return lock_record(heartbeat=now - silence, epoch_seconds=epoch_seconds)

    assert not utils._is_stale(elsewhere(599), now) and utils._is_stale(elsewhere(601), now)
    assert not utils._is_stale(elsewhere(899, 300), now)  # 3 epochs of 300 s: 900 s
    assert utils._is_stale(elsewhere(901, 300), now)
    assert not utils._is_stale({"pid": 1, "host": "colab-vm-7f3a"}, now)  # no heartbeat to judge
    assert not utils._is_stale({}, now)
    here = lock_record(host=socket.gethostname(), heartbeat=now - 10**6)
    assert not utils._is_stale({**here, "pid": os.getppid()}, now)  # its process lives
    assert not utils._is_stale({**here, "pid": os.getpid()}, now)  # no identity: taken as live


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux's /proc")
def test_a_lock_naming_a_live_pid_is_stale_once_another_process_has_that_pid() -> None:
    # A restarted container reuses pids: a lock left by the earlier process that had this
    # process's pid is stale. The recorded identity tells them apart, no module state.
    here = lock_record(host=socket.gethostname(), pid=os.getpid())
    identity = utils._process_identity(os.getpid())
    boot, ticks = identity.rsplit(":", 1)
    assert ticks.isdigit()
    assert not utils._is_stale({**here, "process": identity}, time.time())
    for other in (f"{boot}:{int(ticks) + 1}", f"another boot:{ticks}"):  # a pid reused
        assert utils._is_stale({**here, "process": other}, time.time())


def test_a_lock_held_by_a_live_process_is_refused_until_that_process_ends(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    take_and_wait = (
        "import sys, time; from pathlib import Path; import utils; "
        "utils._RunLock(Path(sys.argv[1])).take(); print('taken', flush=True); time.sleep(600)"
    )
    root = Path(__file__).resolve().parent.parent
    with subprocess.Popen([sys.executable, "-c", take_and_wait, str(tmp_path)], cwd=root,
                          stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline() == "taken\n"
            record = json.loads((tmp_path / "run.lock").read_text())
            assert record["pid"] == holder.pid
            assert record["process"] == utils._process_identity(holder.pid)
            with pytest.raises(utils.FolderInUseError, match=re.escape(
                    f"is in use by another run (pid {holder.pid} on {socket.gethostname()}")):
                utils._RunLock(tmp_path).take()
        finally:
            holder.kill()  # no release: as a crash leaves its lock
    assert json.loads((tmp_path / "run.lock").read_text()) == record
    lock = utils._RunLock(tmp_path)
    lock.take()
    try:
        assert json.loads((tmp_path / "run.lock").read_text())["run"] == lock.record["run"]
        assert capsys.readouterr().out.startswith(
            f"Taking over {tmp_path / 'run.lock'}: its run (pid {holder.pid} on ")
    finally:
        lock.release()
    assert not (tmp_path / "run.lock").exists()


def test_the_lock_is_renewed_before_each_epochs_checkpoint_with_the_epochs_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = []
    refresh = utils._RunLock.refresh

    def recording_refresh(lock: utils._RunLock) -> None:
        before = json.loads(lock.path.read_text())
        refresh(lock)
        records.append((before, json.loads(lock.path.read_text())))

    monkeypatch.setattr(utils._RunLock, "refresh", recording_refresh)
    tiny_fit(tmp_path, epochs=3)
    assert len(records) == 3 and records[0][0]["epoch_seconds"] is None
    for before, after in records:
        assert after["heartbeat"] >= before["heartbeat"]
        assert after["epoch_seconds"] == after["heartbeat"] - before["heartbeat"]
        assert {k: after[k] for k in ("run", "pid", "host", "started")} == {
            k: records[0][0][k] for k in ("run", "pid", "host", "started")}


def test_a_run_whose_lock_was_taken_over_stops_before_writing(tmp_path: Path) -> None:
    # A run judged abandoned (no heartbeat for long) went on writing over the run that took
    # its folder over.
    other = lock_record()
    lock = tmp_path / "run.lock"
    with pytest.raises(utils.FolderInUseError, match=re.escape(
            f"{lock} no longer names this run (pid 1 on colab-vm-7f3a, started 2026-01-02 "
            "03:04:05, last heartbeat ") + r"\d+ min ago\): .* This run stops before writing "
            "its checkpoint"):
        tiny_fit(tmp_path, model=RunsAt(2 + 1, lambda: lock.write_text(json.dumps(other))),
                 epochs=2)  # taken over in epoch 2
    assert History.load(tmp_path / "history.json").epochs == 1
    assert len(torch.load(tmp_path / "last.pt", weights_only=True)["history"]["seconds"]) == 1
    assert json.loads(lock.read_text()) == other


def test_two_runs_taking_over_one_stale_lock_do_not_both_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # B and C both found A's lock stale; B replaced it with its own, then C deleted B's and
    # made its own: two runs in one folder.
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps(lock_record(heartbeat=time.time() - 3600)))  # A: cut off
    is_stale = utils._is_stale
    b = utils._RunLock(tmp_path)

    def b_takes_over_meanwhile(holder: dict, now: float) -> bool:
        monkeypatch.setattr(utils, "_is_stale", is_stale)
        b.take()  # between C's look at A's lock and C's takeover
        return is_stale(holder, now)

    monkeypatch.setattr(utils, "_is_stale", b_takes_over_meanwhile)
    c = utils._RunLock(tmp_path)
    try:
        with pytest.raises(utils.FolderInUseError, match=re.escape(
                f"{tmp_path} is in use by another run (pid {os.getpid()} on "
                f"{socket.gethostname()}")):
            c.take()
        assert json.loads(lock.read_text()) == b.record
        assert not (tmp_path / "run.lock.takeover").exists()
    finally:
        b.release()


def test_a_takeover_under_way_is_not_joined(tmp_path: Path) -> None:
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps(lock_record(heartbeat=time.time() - 3600)))
    takeover = tmp_path / "run.lock.takeover"
    takeover.write_text(json.dumps(lock_record()))
    with pytest.raises(utils.FolderInUseError, match=re.escape(
            f"another run is taking over {lock} just now (it holds {takeover}). Run again in a "
            f"moment; if no other run is starting there, delete {takeover} first.")):
        tiny_fit(tmp_path)
    assert takeover.exists()


def test_a_lock_removed_before_its_release_leaves_the_error_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The release read the lock, then deleted it: removed in between (by hand, say), its
    # FileNotFoundError replaced the run's own error.
    lock_holder = utils._lock_holder

    def read_then_removed(path: Path) -> dict:
        holder = lock_holder(path)
        path.unlink()
        return holder

    monkeypatch.setattr(utils, "_lock_holder", read_then_removed)  # read only by the release here
    with pytest.raises(KeyboardInterrupt):
        tiny_fit(tmp_path, model=InterruptAt(n=1))


@pytest.mark.parametrize("holder", [
    {"pid": 1, "host": "colab-vm-7f3a", "started": "2026-01-02 03:04:05"},  # cannot be checked
    {},  # a lock being written, or left empty by a crash
])
def test_a_lock_that_may_be_live_is_refused_naming_its_run(tmp_path: Path, holder: dict) -> None:
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps(holder) if holder else "")
    with pytest.raises(utils.FolderInUseError, match=re.escape(
            "pid 1 on colab-vm-7f3a, started 2026-01-02 03:04:05" if holder
            else "its lock file is empty, unreadable or garbled")):
        tiny_fit(tmp_path)
    assert folder_files(tmp_path) == {"run.lock": lock.read_bytes()}


@pytest.mark.parametrize(("content", "described"), [
    # Crashed before with a bare OverflowError (os.kill), as did the 3rd (math.ceil of inf) and
    # the last (RecursionError); the others were refused naming "pid -1", "started []".
    pytest.param('{"pid": 1180591620717411303424, "host": "HOST"}', "pid unknown on HOST",
                 id="pid-beyond-any-process-id"),
    pytest.param('{"run": 7, "pid": -1, "host": "HOST", "started": []}',
                 "pid unknown on HOST, started unknown", id="pid-negative"),
    pytest.param('{"pid": 1, "host": "colab-vm-7f3a", "heartbeat": NOW, "epoch_seconds": 1e308}',
                 "not renewed for 10 min", id="epoch-seconds-overflowing"),
    pytest.param('{"pid": 1, "host": "colab-vm-7f3a", "heartbeat": NaN, "epoch_seconds": Infinity}',
                 "pid 1 on colab-vm-7f3a, started unknown, last heartbeat unknown",
                 id="not-finite"),
    pytest.param("[" * 4000, "its lock file is empty, unreadable or garbled",
                 id="json-nested-too-deep"),
])
def test_a_garbled_lock_is_refused_with_the_fix_never_a_crash(
    tmp_path: Path, content: str, described: str
) -> None:
    host = socket.gethostname()
    lock = tmp_path / "run.lock"
    lock.write_text(content.replace("HOST", host).replace("NOW", str(time.time())))
    before = lock.read_text()
    with pytest.raises(utils.FolderInUseError) as error:
        utils._RunLock(tmp_path).take()
    assert described.replace("HOST", host) in str(error.value)
    assert f"if that run has ended, delete {lock} and run again" in str(error.value)
    assert lock.read_text() == before


def test_a_history_json_left_behind_last_pt_is_rewritten_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save = History.save

    def killed_in_epoch_2(history: History, path: Path) -> None:
        if history.epochs == 2:
            raise KeyboardInterrupt  # after last.pt, before history.json
        save(history, path)

    monkeypatch.setattr(History, "save", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        tiny_fit(tmp_path, epochs=2)
    monkeypatch.undo()
    assert History.load(tmp_path / "history.json").epochs == 1
    resumed = tiny_fit(tmp_path, epochs=2, resume=True)  # nothing left to train
    assert resumed.epochs == 2 and History.load(tmp_path / "history.json") == resumed


def write_to_a_full_disk(monkeypatch: pytest.MonkeyPatch, how: str, failing_call: int) -> None:
    """From its `failing_call`-th checkpoint on, torch.save or tempfile fails as on a full disk."""
    calls = []
    if how == "torch.save":
        real = torch.save

        def save(payload: object, f: object) -> None:
            calls.append(1)
            if len(calls) < failing_call:
                return real(payload, f)
            with open("/dev/full", "wb") as full:  # every write: ENOSPC
                real(payload, full)

        monkeypatch.setattr(torch, "save", save)
    else:
        real_mkstemp = tempfile.mkstemp

        def mkstemp(*args: object, **kwargs: object) -> tuple[int, str]:
            calls.append(1)
            if len(calls) < failing_call:
                return real_mkstemp(*args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
# Each epoch saves last.pt with torch.save, after renewing run.lock; both, and history.json,
# go through a temporary file: the 5th is epoch 2's last.pt.
@pytest.mark.parametrize(("how", "failing_call"), [("torch.save", 2), ("mkstemp", 5)])
def test_a_full_disk_is_one_line_with_the_fix_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, failing_call: int
) -> None:
    # torch.save's own error was "[enforce fail at inline_container.cc:672] . PytorchStreamWriter
    # failed writing file data/0: file write failed", with a C++ stack trace.
    write_to_a_full_disk(monkeypatch, how, failing_call)  # epoch 2's last.pt
    with pytest.raises(OSError) as error:
        tiny_fit(tmp_path, epochs=2)
    assert str(error.value) == (
        f"could not write {tmp_path / 'last.pt'} (the disk is full); the files written before "
        "are untouched. Free some disk space, or pass another checkpoint_dir; then run again "
        "with resume=True."
    )
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json", "last.pt"]
    assert History.load(tmp_path / "history.json").epochs == 1
    assert len(torch.load(tmp_path / "last.pt", weights_only=True)["history"]["seconds"]) == 1


def test_a_write_that_torch_says_failed_names_both_likely_causes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some torch versions raise only this, whatever the cause; it was reported as a full disk.
    def save(payload: object, f: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                           "failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError) as error:
        tiny_fit(tmp_path)
    assert str(error.value) == (
        f"could not write {tmp_path / 'last.pt'} (writing failed (disk full, or the folder "
        "unreachable?)); the files written before are untouched. Free some disk space or check "
        "that the folder is reachable, or pass another checkpoint_dir; then run again with "
        "resume=True."
    )


def test_an_unusable_checkpoint_dir_is_refused_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OSError, match=re.escape(f"cannot write checkpoints to {blocker / 'run'} "
                                                "(Not a directory). Pass a checkpoint_dir")):
        tiny_fit(blocker / "run", model=InterruptAt(n=1))  # a training step would interrupt


def test_a_read_only_checkpoint_dir_is_refused_before_training(tmp_path: Path) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: a 0o500 folder stays writable")
        with pytest.raises(OSError, match=re.escape(f"cannot write checkpoints to {folder} "
                                                    "(Permission denied)")):
            tiny_fit(folder, model=InterruptAt(n=1))
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize(
    "field, value",
    [("log_every", 0), ("log_every", -1), ("epochs", 0), ("batch_size", 0), ("max_lr", 0.0),
     ("max_lr", float("nan")), ("label_smoothing", 1.0), ("label_smoothing", -0.1),
     ("ema_decay", 1.0), ("ema_decay", -0.5), ("warmup_fraction", 1.0), ("warmup_fraction", 1),
     ("warmup_fraction", -0.1), ("div_factor", 0.0), ("final_div_factor", 0.0), ("momentum", 0.0),
     ("momentum", 1.0), ("weight_decay", -1e-4), ("seed", -1), ("seed", 2**64),
     ("max_lr", 1e300), ("weight_decay", float("inf")), ("div_factor", float("inf")),
     pytest.param("max_lr", 10**400, id="max_lr-10**400"), ("max_lr", np.float64("nan")),
     # Accepted before: a cycle starting above max_lr, a float32 overflow in torch's update.
     ("div_factor", 0.5), ("final_div_factor", 0.99), ("div_factor", 1e39),
     ("final_div_factor", 1e39), ("weight_decay", 1e39)],
)
def test_config_refuses_values_that_would_fail_mid_run(field: str, value: float) -> None:
    # 10**400, too large for a float, raised a bare OverflowError.
    with pytest.raises(ValueError, match=re.escape(
            f"invalid TrainConfig: {field}={value!r:.40} must be ")):
        TrainConfig(**{field: value})


@pytest.mark.parametrize(
    "field, value, kind",
    [("epochs", "3", "an int"), ("batch_size", None, "an int"), ("log_every", 1.5, "an int"),
     ("seed", 1.5, "an int"), ("epochs", 2.5, "an int"), ("epochs", float("inf"), "an int"),
     ("epochs", True, "an int"), ("mixed_precision", "no", "a bool"), ("nesterov", 1, "a bool"),
     ("max_lr", True, "a number"), ("max_lr", "0.4", "a number"), ("momentum", None, "a number"),
     ("epochs", np.float64(3.0), "an int"), ("nesterov", np.int64(1), "a bool"),
     ("seed", np.bool_(True), "an int")],
)
def test_config_refuses_values_of_the_wrong_type(field: str, value: object, kind: str) -> None:
    # Each failed mid-run, in torch, or (a truthy "no") silently kept mixed precision on.
    with pytest.raises(TypeError, match=re.escape(
            f"invalid TrainConfig: {field}={value!r} must be {kind}")):
        TrainConfig(**{field: value})


def test_config_takes_numpy_numbers_and_stores_them_as_plain_values(tmp_path: Path) -> None:
    # A sweep over np.linspace or np.arange passes numpy numbers: they were refused.
    config = TrainConfig(epochs=np.int64(3), max_lr=np.float64(0.1), momentum=np.float32(0.5),
                         seed=np.uint32(7), nesterov=np.bool_(False), anneal=np.str_("cos"))
    fields = dataclasses.asdict(config)
    assert {name: (type(fields[name]), fields[name]) for name in
            ("epochs", "max_lr", "momentum", "seed", "nesterov", "anneal")} == {
        "epochs": (int, 3), "max_lr": (float, 0.1), "momentum": (float, 0.5), "seed": (int, 7),
        "nesterov": (bool, False), "anneal": (str, "cos")}
    torch.save(fields, tmp_path / "config.pt")  # as checkpoints hold it
    assert torch.load(tmp_path / "config.pt", weights_only=True) == fields


def test_a_config_cannot_change_after_its_checks() -> None:
    # A field set after __post_init__ skipped its checks: max_lr = -1 reached torch.
    config = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_lr = -1.0
    with pytest.raises(ValueError, match=r"max_lr=-1\.0 must be in \(0, "):
        dataclasses.replace(config, max_lr=-1.0)
    assert config.max_lr == 0.4


@pytest.mark.parametrize("warmup_fraction", [0.0, 0.99])
def test_the_widest_accepted_warm_ups_train_through_the_last_batch(warmup_fraction: float) -> None:
    history = tiny_fit(None, epochs=2, warmup_fraction=warmup_fraction)
    assert history.epochs == 2 and len(history.batch_lr) == 4


def test_without_an_average_the_warm_up_does_nothing() -> None:
    assert TrainConfig().ema_warmup
    runs = {}
    for warmup in (False, True):
        seed_everything(0)
        runs[warmup] = fit(Net(), *loaders(), device="cpu", progress=False,
                           config=dataclasses.replace(recipe(1), ema_decay=0.0, ema_warmup=warmup))
    assert runs[True].ema_test_acc == [] and runs[True].train_loss == runs[False].train_loss


def test_adamw_decays_only_the_conv_weights_with_momentum_as_its_first_beta() -> None:
    optimizer = _make_optimizer(Net(), TrainConfig(optimizer="adamw", max_lr=0.01, momentum=0.8))
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, plain = optimizer.param_groups
    assert all(p.ndim > 1 for p in decayed["params"]) and decayed["weight_decay"] == 5e-4
    assert all(p.ndim <= 1 for p in plain["params"]) and plain["weight_decay"] == 0.0
    assert decayed["betas"] == (0.8, 0.999) and decayed["lr"] == pytest.approx(0.001)


def test_a_cosine_anneal_keeps_the_cycle_s_ends_and_stays_higher_after_the_peak() -> None:
    rates = {}
    for anneal in ("linear", "cos"):
        config = dataclasses.replace(recipe(2), anneal=anneal)
        scheduler = _make_scheduler(_make_optimizer(Net(), config), config, 2, steps_per_epoch=50)
        rates[anneal] = [scheduler.get_last_lr()[0]]
        for _ in range(99):
            scheduler.optimizer.step()
            scheduler.step()
            rates[anneal].append(scheduler.get_last_lr()[0])
    linear, cosine = rates["linear"], rates["cos"]
    assert cosine[0] == pytest.approx(linear[0]) and cosine[-1] == pytest.approx(linear[-1])
    assert max(cosine) == pytest.approx(max(linear))
    assert cosine[40] > linear[40]  # a quarter of the way down from the peak at step 20


def test_resume_needs_a_checkpoint_dir() -> None:
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train(epochs=1, resume=True)


class DivergesAt(InterruptAt):
    """Wraps Net and returns NaN logits from the n-th training forward pass on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.n:
                return out * float("nan")
        return out


def test_a_nan_loss_stops_with_epoch_and_batch_and_keeps_the_last_good_checkpoint(
    tmp_path: Path,
) -> None:
    model = DivergesAt(n=10 + 4)  # 10 batches per epoch: batch 4 of epoch 2
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, batch 4\. .*lower max_lr \(now 0\.05\)"
                       r".* The checkpoints still hold the last good epoch \(1\)"):
        fit(model, *loaders(), device="cpu", config=recipe(3),
            checkpoint_dir=tmp_path, progress=False)
    assert History.load(tmp_path / "history.json").epochs == 1
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())


class PoisonsBatchNormAt(InterruptAt):
    """Wraps Net; the n-th training forward pass leaves NaN in a BatchNorm running_var."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.n:  # before the forward pass: it saves the buffer for backward
                self.net.c1[0][1].running_var.fill_(float("nan"))
        return self.net(x)


class OverflowsOnce(InterruptAt):
    """Wraps Net; its first training forward pass returns logits whose scaled gradients overflow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls == 1:
                return out * 1e35
        return out


def test_cudnn_autotuning_lasts_only_for_a_cuda_run() -> None:
    # fit trains inside this context; the caller's setting must come back, also after an error.
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        with _cudnn_autotuning(torch.device("cpu")):
            assert torch.backends.cudnn.benchmark is False
        with pytest.raises(RuntimeError), _cudnn_autotuning(torch.device("cuda")):
            assert torch.backends.cudnn.benchmark is True
            raise RuntimeError("training stopped")
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before


def test_fit_trains_inside_the_cudnn_autotuning_context(monkeypatch: pytest.MonkeyPatch) -> None:
    entered = []

    @contextlib.contextmanager
    def recording(device: torch.device):
        entered.append(device)
        yield

    monkeypatch.setattr(utils, "_cudnn_autotuning", recording)
    tiny_fit(None)
    assert entered == [torch.device("cpu")]


def test_a_step_skipped_by_the_grad_scaler_raises_no_scheduler_warning() -> None:
    # As on CUDA with float16, where the first steps often overflow (pytorch/pytorch#44511).
    config = dataclasses.replace(CONFIG, epochs=1)
    model = OverflowsOnce()
    optimizer = _make_optimizer(model, config)
    train_loader, _ = loaders(64, 20, config.batch_size)
    state = _TrainState(model, optimizer, _make_scheduler(optimizer, config, 1, len(train_loader)),
                        torch.amp.GradScaler("cpu", enabled=True), History(), {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train_epoch(state, train_loader, torch.device("cpu"), config, epoch=1, progress=False)
    assert state.scaler.get_scale() == 2.0**15  # halved from 2**16: the first step was skipped
    assert state.scheduler.last_epoch == len(train_loader)  # and the schedule still stepped


def finite_checkpoints(folder: Path) -> dict[str, int]:
    """The epochs each checkpoint in `folder` holds, after asserting all its tensors are finite."""
    epochs = {}
    for path in folder.glob("*.pt"):
        checkpoint = torch.load(path, weights_only=True)
        tensors = [*checkpoint["model"].values(),
                   *(t for state in checkpoint["optimizer"]["state"].values() for t in state.values())]
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), path
        epochs[path.name] = len(checkpoint["history"]["seconds"])
    return epochs


def test_a_non_finite_batchnorm_buffer_stops_the_run_before_any_checkpoint_holds_it(
    tmp_path: Path,
) -> None:
    # The training loss stays finite (train mode uses batch statistics) and no loader is scored.
    with pytest.raises(NonFiniteLossError, match=r"training diverged in epoch 2: net\.c1\.0\.1\.running_var "
                       r"holds NaN or infinite values\. .* still hold the last good epoch \(1\)"):
        tiny_fit(tmp_path, model=PoisonsBatchNormAt(n=2 + 1), test=False, epochs=3)
    assert finite_checkpoints(tmp_path) == {"last.pt": 1}
    assert History.load(tmp_path / "history.json").epochs == 1


def test_max_lr_100_stops_with_an_error_and_writes_no_non_finite_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match=r"epoch 1\b.*lower max_lr \(now 100\)") as error:
        tiny_fit(tmp_path, epochs=3, max_lr=100.0)
    assert finite_checkpoints(tmp_path) == {}
    assert f"No checkpoint of this run was written to {tmp_path}" in str(error.value)
    assert "still hold" not in str(error.value)


def test_the_checkpoint_writer_refuses_a_non_finite_tensor(tmp_path: Path) -> None:
    model = Net()
    optimizer = _make_optimizer(model, CONFIG)
    state = _TrainState(model, optimizer, _make_scheduler(optimizer, CONFIG, 1, 1),
                        torch.amp.GradScaler("cpu", enabled=False), History(),
                        {"train_images": 1, "steps_per_epoch": 1})
    with torch.no_grad():
        model.head[1].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"refusing to write .*last\.pt: its model\..*weight "
                       "holds NaN or infinities"):
        _save_checkpoint(tmp_path / "last.pt", state, CONFIG)
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_load_with_weights_only(tmp_path: Path) -> None:
    history = train(epochs=2, checkpoint_dir=tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"last.pt", "history.json"}
    model = load_weights(Net(), tmp_path / "last.pt")
    _, test_loader = loaders()
    matrix = confusion_matrix(model, test_loader, "cpu")
    assert 100.0 * matrix.trace() / matrix.sum() == pytest.approx(history.test_acc[-1])


def test_history_round_trips_through_json(tmp_path: Path) -> None:
    history = History(train_loss=[2.0, 1.5], train_acc=[20.0, 40.0], test_loss=[1.9, 1.4],
                      test_acc=[30.0, 86.0], lr=[0.1, 0.01], seconds=[1.0, 1.1], batch_lr=[0.1])
    history.save(tmp_path / "h.json")
    assert History.load(tmp_path / "h.json") == history
    assert history.first_epoch_reaching(85.0) == 2 and history.first_epoch_reaching(90.0) is None
    assert history.best_test_acc == 86.0


def test_summary_reports_the_moving_average_beside_the_model() -> None:
    history = History(train_loss=[2.0, 1.5, 1.2], train_acc=[20.0, 40.0, 60.0],
                      test_loss=[1.9, 1.4, 1.1], test_acc=[30.0, 80.0, 86.0],
                      ema_test_acc=[10.0, 85.5, 86.5], seconds=[1.0, 1.0, 1.0])
    assert history.first_epoch_reaching(85.0, averaged=True) == 2
    assert history.summary().splitlines() == [
        "final test accuracy 86.00% (epoch 3), best 86.00% (epoch 3); first reached 85% at epoch 3; "
        "training time 3 s",
        "moving average of the weights: final test accuracy 86.50%; first reached 85% at epoch 2",
    ]
    assert history.summary(target=90.0).endswith(
        "moving average of the weights: final test accuracy 86.50%; never reached 90% in 3 epochs")
    labels_drawn = [line.get_label() for line in plot_history(history).axes[1].lines]
    assert labels_drawn == ["train (augmented)", "test", "test, moving average"]


def test_reports_and_plots(tmp_path: Path) -> None:
    history = train(epochs=1)
    model = Net().eval()
    _, test_loader = loaders()
    records = misclassified(model, test_loader, "cpu")
    assert records and all(r.true != r.predicted for r in records)
    assert [r.confidence for r in records] == sorted((r.confidence for r in records), reverse=True)
    assert all(r.image.untyped_storage().nbytes() == r.image.nbytes for r in records)  # not views
    matrix = confusion_matrix(model, test_loader, "cpu")
    assert matrix.sum() == 100 and matrix.shape == (10, 10)
    assert len(records) == matrix.sum() - matrix.trace()
    accuracy = per_class_accuracy(matrix)
    assert len(accuracy) == 10 and all(0 <= v <= 100 for v in accuracy.values())
    figures = {
        "history.png": plot_history(history, tmp_path / "history.png"),
        "lr.png": plot_lr_schedule(history, tmp_path / "lr.png"),
        "samples.png": show_samples([r.image for r in records[:4]], ["a"] * 4, tmp_path / "samples.png"),
        "mis.png": plot_misclassified(records, tmp_path / "mis.png"),
        "cm.png": plot_confusion_matrix(matrix, tmp_path / "cm.png"),
    }
    for name, figure in figures.items():
        assert isinstance(figure, matplotlib.figure.Figure)
        assert (tmp_path / name).stat().st_size > 1000


def test_scoring_restores_each_module_mode_and_leaves_batchnorm_alone() -> None:
    _, test_loader = loaders(64, 20)
    for training in (True, False):
        model = Net().train(training)
        model.c2.eval()  # a frozen part of a training model stays frozen
        modes = [m.training for m in model.modules()]
        before = weights(model)
        evaluate(model, test_loader, "cpu")
        misclassified(model, test_loader, "cpu")
        confusion_matrix(model, test_loader, "cpu")
        assert [m.training for m in model.modules()] == modes
        assert_same_weights(model, before)
        assert not torch.is_inference_mode_enabled()


def test_test_time_flip_scores_the_mean_logits_of_each_image_and_its_mirror() -> None:
    seed_everything(0)
    model = Net().eval()
    _, test_loader = loaders(64, 20)
    images, labels = next(iter(test_loader))
    with torch.no_grad():
        plain = model(images)
        mean = (plain + model(images.flip(3))) / 2
    assert not torch.allclose(plain, mean, rtol=1e-3, atol=1e-4)  # the mirror changes the logits
    for flip, logits in ((False, plain), (True, mean)):
        loss, accuracy = evaluate(model, test_loader, "cpu", mixed_precision=False, flip=flip)
        assert loss == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
        assert accuracy == pytest.approx(100.0 * (logits.argmax(1) == labels).float().mean().item())


def test_the_moving_average_weighs_each_step_by_the_decay() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].running_mean.fill_(1.0)
    average = WeightAverage(model, decay=0.75)
    with torch.no_grad():
        model[0].weight.fill_(5.0)
        model[1].running_mean.fill_(5.0)
        model[1].num_batches_tracked.fill_(7)
    average.update(step=0)
    # Starts as a copy; each update moves 1 - decay of the way; integer counters are copied.
    assert torch.equal(average.module[0].weight, torch.full((2, 2), 0.75 * 1.0 + 0.25 * 5.0))
    assert torch.equal(average.module[1].running_mean, torch.full((2,), 2.0))
    assert average.module[1].num_batches_tracked.item() == 7
    assert not any(p.requires_grad for p in average.module.parameters())


def test_a_warmed_up_average_starts_near_the_model_and_settles_at_its_decay() -> None:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average = WeightAverage(model, decay=0.998, warmup=True)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average.update(step=0)  # keeps (1 + 0) / (10 + 0) = 0.1 of the untrained weight
    assert average.module.weight.item() == pytest.approx(0.9)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average.update(step=10_000)  # (1 + t) / (10 + t) > 0.998 by now: the decay itself rules
    assert average.module.weight.item() == pytest.approx(0.9 * 0.998)


def test_fit_counts_the_average_updates_across_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    steps: list[int] = []
    update = WeightAverage.update

    def recording_update(self: WeightAverage, step: int) -> None:
        steps.append(step)
        update(self, step)

    monkeypatch.setattr(WeightAverage, "update", recording_update)
    seed_everything(0)
    fit(Net(), *loaders(), device="cpu", progress=False,
        config=dataclasses.replace(recipe(2), ema_decay=0.9, ema_warmup=True))
    assert steps == list(range(20))  # 10 batches per epoch, counted on through epoch 2


def test_the_warm_up_changes_only_the_average() -> None:
    runs = {}
    for warmup in (False, True):
        seed_everything(0)
        runs[warmup] = fit(Net(), *loaders(), device="cpu", progress=False,
                           config=dataclasses.replace(recipe(2), ema_decay=0.998, ema_warmup=warmup))
    assert runs[True].train_loss == runs[False].train_loss
    assert runs[True].test_acc == runs[False].test_acc
    # 20 steps at 0.998 leave the average ~96% untrained; warmed up it follows the model.
    gap = {warmup: abs(run.ema_test_acc[-1] - run.test_acc[-1]) for warmup, run in runs.items()}
    assert gap[True] < gap[False]


def test_scoring_a_moving_average_leaves_training_and_checkpoints_unchanged(tmp_path: Path) -> None:
    plain = train(epochs=2, checkpoint_dir=tmp_path / "plain")
    seed_everything(0)
    averaged = fit(Net(), *loaders(), device="cpu", progress=False, checkpoint_dir=tmp_path / "ema",
                   config=dataclasses.replace(recipe(2), ema_decay=0.9))
    assert averaged.train_loss == plain.train_loss and averaged.test_acc == plain.test_acc
    assert len(averaged.ema_test_acc) == 2 and not plain.ema_test_acc
    saved = {name: torch.load(tmp_path / name / "last.pt", weights_only=True)
             for name in ("plain", "ema")}
    for key, tensor in saved["plain"]["model"].items():
        assert torch.equal(tensor, saved["ema"]["model"][key])
    assert not saved["plain"]["ema"]
    # The scores are the saved average's, and it is not the model's own weights.
    average = Net()
    average.load_state_dict(saved["ema"]["ema"])
    assert evaluate(average, loaders()[1], "cpu")[1] == averaged.ema_test_acc[-1]
    assert not torch.equal(average.head[1].weight, saved["ema"]["model"]["head.1.weight"])


def test_a_checkpoint_without_its_moving_average_is_refused_before_anything_loads(
    tmp_path: Path
) -> None:
    tiny_fit(tmp_path, ema_decay=0.5)
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    payload["ema"] = {}
    torch.save(payload, tmp_path / "last.pt")
    model = Net()
    before = weights(model)
    with pytest.raises(CheckpointError, match="holds no moving average of the weights"):
        tiny_fit(tmp_path, model=model, resume=True, ema_decay=0.5)
    assert_same_weights(model, before)


def test_format_table_lays_out_a_markdown_table() -> None:
    @dataclasses.dataclass
    class Row:
        rule: str
        count: int
        share: float
        passed: bool

    table = format_table([Row("parameters", 194410, 0.5, True), Row("rf", 51, 12.345, False)])
    lines = table.splitlines()
    assert [line.split("|")[1:-1] for line in lines][0] == [" rule       ", " count   ", " share ", " passed "]
    assert set(lines[1]) == {"|", "-", " "}
    assert [cell.strip() for cell in lines[2].split("|")[1:-1]] == ["parameters", "194,410", "0.50", "yes"]
    assert [cell.strip() for cell in lines[3].split("|")[1:-1]] == ["rf", "51", "12.35", "NO"]
    assert len({len(line) for line in lines}) == 1, "columns are padded to one width"
    assert format_table([]) == ""


def test_get_device_prefers_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert get_device() == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert get_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_device() == torch.device("cuda")


def test_a_saved_file_reaches_the_disk_before_it_replaces_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("sync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda *a: events.append("rename") or replace(*a))
    History(train_loss=[1.0]).save(tmp_path / "history.json")
    assert History.load(tmp_path / "history.json").train_loss == [1.0]
    assert events == ["sync", "rename", "sync"]  # the file, the rename, the folder's entry


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_a_file_system_that_cannot_sync_still_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def refuse(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", refuse)  # as some network and FUSE mounts do
    History(train_loss=[1.0]).save(tmp_path / "history.json")
    assert History.load(tmp_path / "history.json").train_loss == [1.0]


def test_a_sync_that_fails_to_write_fails_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="Input/output error"):
        History(train_loss=[1.0]).save(tmp_path / "history.json")
    assert not (tmp_path / "history.json").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


@pytest.mark.parametrize("val_scores, best_epoch", [([50.0, 70.0, 60.0], 2), ([50.0, 70.0, 70.0], 3)],
                         ids=["rise-then-fall", "tie"])
def test_validation_is_scored_every_epoch_and_best_pt_follows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, val_scores: list[float], best_epoch: int
) -> None:
    images, labels = synthetic_cifar10(100, seed=5)
    val_loader = eval_loader(CIFAR10Dataset(images, labels, eval_transforms()), CONFIG.batch_size, 0)
    # Scripted validation scores: a net this small rarely falls on its own, and best.pt must
    # not follow a fall (of tied epochs it keeps the later one).
    scripted = iter(val_scores)
    scored = utils.evaluate

    def evaluate(model: nn.Module, loader, *args, **kwargs) -> tuple[float, float]:
        loss, accuracy = scored(model, loader, *args, **kwargs)
        return (loss, next(scripted)) if loader is val_loader else (loss, accuracy)

    monkeypatch.setattr(utils, "evaluate", evaluate)
    seed_everything(0)
    history = fit(Net(), *loaders(), config=recipe(3), device="cpu", checkpoint_dir=tmp_path,
                  progress=False, val_loader=val_loader)
    assert history.val_acc == val_scores
    assert len(history.val_loss) == len(history.test_acc) == 3
    best, last = (torch.load(tmp_path / name, weights_only=True) for name in ("best.pt", "last.pt"))
    assert best["history"]["val_acc"] == val_scores[:best_epoch]
    assert last["history"]["val_acc"] == val_scores
    same_weights = all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    assert same_weights == (best_epoch == 3)


def test_a_tuning_run_never_scores_the_test_set_and_still_reports(tmp_path: Path) -> None:
    images, labels = synthetic_cifar10(100, seed=5)
    val_loader = eval_loader(CIFAR10Dataset(images, labels, eval_transforms()), CONFIG.batch_size, 0)
    seed_everything(0)
    history = fit(Net(), loaders()[0], None, config=recipe(2), device="cpu", progress=False,
                  val_loader=val_loader)
    assert history.test_acc == [] and len(history.val_acc) == 2
    assert history.summary() == "2 epochs, no test scores (a tuning run: see val_acc)"
    labels_drawn = [line.get_label() for line in plot_history(history).axes[1].lines]
    assert labels_drawn == ["train (augmented)", "validation"]


def test_resume_refuses_a_run_that_scored_other_splits(tmp_path: Path, last_pt: bytes) -> None:
    (tmp_path / "last.pt").write_bytes(last_pt)
    with pytest.raises(CheckpointError, match=r"scored \('test' in the checkpoint, '' now\)"):
        tiny_fit(tmp_path, test=False, resume=True)


def test_a_checkpoint_older_than_a_config_field_resumes_with_its_default(
    tmp_path: Path, last_pt: bytes
) -> None:
    payload = torch.load(io.BytesIO(last_pt), weights_only=True)
    # As written before EMA existed.
    del payload["config"]["ema_decay"], payload["config"]["ema_warmup"], payload["ema"]
    del payload["history"]["ema_test_acc"], payload["history"]["ema_val_acc"]
    torch.save(payload, tmp_path / "last.pt")
    assert tiny_fit(tmp_path, resume=True).epochs == 1
    with pytest.raises(CheckpointError, match=r"different run: ema_decay \(0.0 in the checkpoint, 0.5 now\)\. "):
        tiny_fit(tmp_path, resume=True, ema_decay=0.5)


def test_without_an_average_a_resume_ignores_the_warm_up(tmp_path: Path, last_pt: bytes) -> None:
    (tmp_path / "last.pt").write_bytes(last_pt)
    for warmup in (False, True):
        assert tiny_fit(tmp_path, resume=True, ema_decay=0.0, ema_warmup=warmup).epochs == 1


def test_a_checkpoint_older_than_the_warm_up_resumes_only_without_it(tmp_path: Path) -> None:
    tiny_fit(tmp_path, ema_decay=0.5, ema_warmup=False)
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    del payload["config"]["ema_warmup"]  # as written before the warm-up existed
    torch.save(payload, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"ema_warmup \(False in the checkpoint, True now\)"):
        tiny_fit(tmp_path, resume=True, ema_decay=0.5)
    assert tiny_fit(tmp_path, resume=True, ema_decay=0.5, ema_warmup=False).epochs == 1


def test_resume_without_a_last_pt_says_it_starts_a_new_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tiny_fit(tmp_path / "new", resume=True)
    assert capsys.readouterr().out == (
        f"resume=True, but {tmp_path / 'new'} holds no last.pt: starting a new run\n"
    )


def test_an_empty_scoring_loader_is_refused_before_training() -> None:
    empty = eval_loader(CIFAR10Dataset(*synthetic_cifar10(0), eval_transforms()), 8, 0)
    with pytest.raises(ValueError, match="the val loader yields no batches: pass None"):
        fit(Net(), loaders()[0], config=recipe(1), device="cpu", val_loader=empty)


def test_cpus_without_native_bf16_train_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr("utils._cpu_has_native_bf16", lambda: False)
    assert half_dtype(cpu) is None and not autocast(cpu)._enabled
    monkeypatch.setattr("utils._cpu_has_native_bf16", lambda: True)
    assert half_dtype(cpu) is torch.bfloat16 and autocast(cpu)._enabled
    assert not autocast(cpu, enabled=False)._enabled
