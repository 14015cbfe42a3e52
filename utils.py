"""Training and reporting: the recipe, the train/evaluate loop, checkpoints, and the plots."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import errno
import functools
import io
import json
import math
import numbers
import os
import pickle
import random
import re
import socket
import tempfile
import time
import typing
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dataset import CLASSES, RefusedFileError, read_regular_file, seed_epoch
from transforms import denormalize, describe_transform


# -------------------------------------------------------------------- device and setup


def get_device() -> torch.device:
    """The fastest device present: CUDA, then Apple MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class NoGPUError(RuntimeError):
    """Colab gave this notebook no GPU, and the settings do not allow training on its CPU."""


def train_step_seconds(
    model: nn.Module,
    batch_size: int,
    device: torch.device,
    steps: int = 3,
    warmup: int = 1,
    mixed_precision: bool = True,
) -> float:
    """Mean seconds of one training step (forward, backward, SGD) on random images, as `fit` trains.

    A copy of `model` trains, so the model itself is untouched; the first `warmup` steps
    (allocation, kernel choice) are not counted.
    """
    model = copy.deepcopy(model).to(device, memory_format=memory_format(device)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    inputs = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(
        memory_format=memory_format(device)
    )
    targets = torch.randint(0, 10, (batch_size,), device=device)
    timings = []
    for _ in range(warmup + steps):
        _synchronize(device)
        start = time.perf_counter()
        with autocast(device, mixed_precision):
            loss = nn.functional.cross_entropy(model(inputs).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _synchronize(device)
        timings.append(time.perf_counter() - start)
    return sum(timings[warmup:]) / steps


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer reads what it took (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def estimate_epoch_seconds(
    model: nn.Module,
    config: TrainConfig,
    images: int,
    device: torch.device,
) -> float:
    """Seconds per epoch of `images` images on `device`, timed on a few training steps."""
    step = train_step_seconds(
        model, config.batch_size, device, mixed_precision=config.mixed_precision
    )
    # The train loader drops a partial last batch (make_loaders), so whole batches only.
    return step * max(1, images // config.batch_size)


def check_accelerator(
    device: torch.device,
    model: nn.Module,
    config: TrainConfig,
    *,
    in_colab: bool,
    allow_cpu: bool,
    images: int = 50_000,
) -> str:
    """Stop a Colab run that has no GPU (unless `allow_cpu`); else name the device and its cost."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "GPU: Apple silicon (MPS)"
    epochs = config.epochs
    if in_colab and not allow_cpu:
        raise NoGPUError(
            f"This Colab runtime has no GPU: {epochs} epochs on its CPU would take hours, not "
            "minutes. Fix: Runtime → Change runtime type → Hardware accelerator: GPU (e.g. T4) "
            "→ Save, then Runtime → Run all. To train on the CPU anyway, set ALLOW_CPU = True "
            "in the settings cell and run it again."
        )
    seconds = estimate_epoch_seconds(model, config, images, device)
    total = seconds * epochs
    duration = f"{total / 3600:.1f} h" if total >= 3600 else f"{math.ceil(total / 60)} min"
    return (
        f"CPU: about {seconds:,.0f} s per epoch of {images:,} images here (timed on a few "
        f"training steps), so {epochs} epochs take about {duration}. A GPU takes minutes "
        "(Colab: Runtime → Change runtime type → GPU); S9_SMOKE=1 runs a short check on a "
        "slice of the data."
    )


def drive_checkpoint_dir(mount_point: str = "/content/drive") -> Path:
    """Mount Google Drive (Colab only); return its s9-checkpoints folder, which outlives the VM."""
    try:
        from google.colab import drive
    except ImportError as error:
        raise RuntimeError(
            "USE_DRIVE = True needs Google Colab (it mounts Google Drive). Here, set "
            "USE_DRIVE = False: checkpoints then go to checkpoints/ beside the notebook."
        ) from error
    drive.mount(mount_point)
    return Path(mount_point) / "MyDrive" / "s9-checkpoints"


# -------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe; its defaults tie the best recipe measured on validation.

    Frozen: a run's recipe cannot change under it; dataclasses.replace makes a changed copy.
    """

    epochs: int = 60
    # Batch 256 at peak LR 0.4 matched batch 128 at 0.2 on validation over 60 epochs (87.94% vs
    # 88.00%) with half the optimizer steps, which should pay on a GPU; on a 2-core CPU an epoch
    # takes about as long (benchmarks/README.md).
    batch_size: int = 256
    # One-cycle: warm up linearly from max_lr/div_factor to max_lr over the first
    # warmup_fraction of steps, then anneal linearly to max_lr/(div_factor*final_div_factor).
    max_lr: float = 0.4
    warmup_fraction: float = 0.2
    div_factor: float = 10.0
    final_div_factor: float = 100.0
    # The shape of the one-cycle's descent after the warm-up: "linear" or "cos" (cosine).
    anneal: str = "linear"
    # "sgd": SGD with (Nesterov) momentum. "adamw": AdamW, with `momentum` as its first beta
    # and decoupled weight decay; it wants a max_lr about 100x smaller than SGD's.
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    # Applied to conv/linear weights only: decaying BatchNorm scales and biases only hurts.
    weight_decay: float = 5e-4
    # Softened targets: cheap regularisation that helps most when data is small.
    label_smoothing: float = 0.1
    # > 0: also score an exponential moving average of the weights after every epoch (decay per
    # batch; 0.998 averages over ~500 batches). A measurement: training and best.pt are unchanged.
    # It leads the model for most of a run: 85% on validation 16 to 25 epochs sooner in the six
    # 60-epoch validation runs that scored it, four with a constant decay (benchmarks/README.md).
    ema_decay: float = 0.998
    # True: the decay starts low and rises, min(ema_decay, (1 + t) / (10 + t)) at update t, so
    # the average forgets the untrained net within its first epoch instead of carrying it for
    # thousands of steps (the num_updates rule of TensorFlow's ExponentialMovingAverage). On
    # validation it ended level with the model after 10 epochs; the constant decay ended 21
    # points below (benchmarks/README.md). Without a moving average (ema_decay=0) it does nothing.
    ema_warmup: bool = True
    seed: int = 0
    # Autocast to a 16-bit float: float16 on CUDA; bfloat16 on CPUs with native bf16
    # instructions, float32 on other CPUs, where emulated bf16 would be slower. The measured
    # gain and the bench.py command that measures it: benchmarks/README.md, How fast.
    mixed_precision: bool = True
    # Progress-bar refresh and NaN check, in batches: each costs a device sync on a GPU.
    log_every: int = 20

    def __post_init__(self) -> None:
        """Refuse a recipe that would fail mid-run, naming each bad field and its valid range.

        Numbers of numpy types (from a sweep over np.linspace, say) are stored as plain ones.
        """
        values = {name: getattr(self, name) for name in _field_types()}
        wrong_types = _wrong_types(values)
        if wrong_types:
            raise TypeError(
                f"invalid TrainConfig: {'; '.join(wrong_types)}. Pass values of those types "
                "(TrainConfig() holds the measured recipe)."
            )
        problems = _out_of_range(values)
        if problems:
            raise ValueError(
                f"invalid TrainConfig: {'; '.join(problems)}. Pass values in those ranges "
                "(TrainConfig() holds the measured recipe)."
            )
        # Plain values: weights_only loading refuses a checkpoint holding numpy's. Set as a
        # frozen dataclass's __init__ sets its fields.
        for name, kind in _field_types().items():
            object.__setattr__(self, name, kind(getattr(self, name)))


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# What each annotated type of a TrainConfig field accepts, in words: a bool is an int to
# Python but no count or rate, and a number may be numpy's (it is stored as a plain one).
_ACCEPTED = {
    bool: (lambda value: isinstance(value, (bool, np.bool_)), "a bool (True or False)"),
    int: (lambda value: isinstance(value, numbers.Integral) and not isinstance(value, bool),
          "an int"),
    float: (lambda value: isinstance(value, numbers.Real) and not isinstance(value, bool),
            "a number (an int or a float)"),
    str: (lambda value: isinstance(value, str), "a string"),
}


@functools.cache
def _field_types() -> dict[str, type]:
    """Each TrainConfig field's annotated type (bool, int, float or str)."""
    hints = typing.get_type_hints(TrainConfig)
    return {spec.name: hints[spec.name] for spec in dataclasses.fields(TrainConfig)}


def _wrong_types(values: dict[str, object]) -> list[str]:
    """Each TrainConfig field in `values` not of its annotated type, with the type it needs."""
    wrong = []
    for name, kind in _field_types().items():
        accepts, described = _ACCEPTED[kind]
        value = values[name]
        if not accepts(value):
            wrong.append(f"{name}={value!r:.40} must be {described}, not {type(value).__name__}")
    return wrong


def _out_of_range(values: dict[str, object]) -> list[str]:
    """Each TrainConfig field in `values` (each of its type) that would fail a run, and why."""
    v = values
    float32 = f"{_FLOAT32_MAX:.3g}"
    rules = (
        ("epochs", v["epochs"] >= 1, ">= 1"),
        ("batch_size", v["batch_size"] >= 1, ">= 1"),
        # torch applies the learning rate and weight decay as float32s: larger ones fail in it.
        ("max_lr", 0 < v["max_lr"] <= _FLOAT32_MAX, f"in (0, {float32}]"),
        # OneCycleLR divides by the annealing phase's length: 1.0 fails on the last batch.
        ("warmup_fraction", 0 <= v["warmup_fraction"] < 1, "in [0, 1)"),
        # The cycle starts at max_lr/div_factor and ends lower still: below 1 it would start
        # above max_lr, and a tiny factor overflows the float32 learning rate.
        ("div_factor", 1 <= v["div_factor"] <= _FLOAT32_MAX, f"in [1, {float32}]"),
        ("final_div_factor", 1 <= v["final_div_factor"] <= _FLOAT32_MAX, f"in [1, {float32}]"),
        ("anneal", v["anneal"] in ("linear", "cos"), "'linear' or 'cos'"),
        ("optimizer", v["optimizer"] in ("sgd", "adamw"), "'sgd' or 'adamw'"),
        ("momentum", 0 < v["momentum"] < 1 if v["nesterov"] else 0 <= v["momentum"] < 1,
         "in (0, 1) with nesterov=True, else in [0, 1)"),
        ("weight_decay", 0 <= v["weight_decay"] <= _FLOAT32_MAX, f"in [0, {float32}]"),
        ("label_smoothing", 0 <= v["label_smoothing"] < 1, "in [0, 1)"),
        ("ema_decay", 0 <= v["ema_decay"] < 1, "in [0, 1) (0: no moving average)"),
        ("log_every", v["log_every"] >= 1, ">= 1 (batches between loss checks)"),
        ("seed", 0 <= v["seed"] < 2**32, "in [0, 2**32) (numpy's seeds)"),
    )
    infinite = [name for name, kind in _field_types().items()
                if kind is float and not _is_finite(v[name])]
    return [f"{name}={v[name]!r:.40} must be finite" for name in infinite] + [
        f"{name}={v[name]!r:.40} must be {rule}"
        for name, ok, rule in rules if not ok and name not in infinite
    ]


def _is_finite(value: numbers.Real) -> bool:
    """math.isfinite, where a number too large for a float is infinite, not an OverflowError."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


# ----------------------------------------------------------------------------- history


@dataclass
class History:
    """Per-epoch metrics of a run (accuracies in percent), plus the per-batch learning rate."""

    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    # Scores of the moving average of the weights (only when TrainConfig.ema_decay > 0).
    ema_test_acc: list[float] = field(default_factory=list)
    ema_val_acc: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    batch_lr: list[float] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        """Number of completed epochs."""
        return len(self.seconds)

    @property
    def best_test_acc(self) -> float:
        """Highest test accuracy of any epoch (percent)."""
        return max(self.test_acc, default=float("nan"))

    def first_epoch_reaching(self, accuracy: float, averaged: bool = False) -> int | None:
        """The first epoch (1-based) whose test accuracy is >= `accuracy`, or None.

        Args:
            accuracy: the target, in percent.
            averaged: score the moving average of the weights (`ema_test_acc`), not the model.
        """
        scores = self.ema_test_acc if averaged else self.test_acc
        return next((i + 1 for i, acc in enumerate(scores) if acc >= accuracy), None)

    def summary(self, target: float = 85.0) -> str:
        """Final and best test accuracy, and the first epoch that reached `target` percent."""
        if not self.test_acc:
            return f"{self.epochs} epochs, no test scores (a tuning run: see val_acc)"
        best = self.test_acc.index(self.best_test_acc) + 1
        text = (
            f"final test accuracy {self.test_acc[-1]:.2f}% (epoch {self.epochs}), "
            f"best {self.best_test_acc:.2f}% (epoch {best}); {self._reached(target, False)}; "
            f"training time {sum(self.seconds):.0f} s"
        )
        if self.ema_test_acc:
            text += (
                f"\nmoving average of the weights: final test accuracy "
                f"{self.ema_test_acc[-1]:.2f}%; {self._reached(target, True)}"
            )
        return text

    def _reached(self, target: float, averaged: bool) -> str:
        """When the model (or its moving average) first reached `target` percent, in words."""
        first = self.first_epoch_reaching(target, averaged)
        if first is None:
            return f"never reached {target:g}% in {self.epochs} epochs"
        return f"first reached {target:g}% at epoch {first}"

    def to_dict(self) -> dict[str, list[float]]:
        """Plain lists, for JSON and checkpoints."""
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the history as JSON, atomically."""
        _atomic_write(Path(path), lambda f: f.write(json.dumps(self.to_dict()).encode()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> History:
        """Read a history written by `save`."""
        return cls(**json.loads(Path(path).read_text()))


# ------------------------------------------- errors, and one run per checkpoint folder


class NonFiniteLossError(RuntimeError):
    """Training diverged: a loss, a weight or a BatchNorm statistic became NaN or infinite."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: empty, cut short, foreign, or from a different run."""


class FolderInUseError(RuntimeError):
    """Another run holds the checkpoint folder: two runs in one folder overwrite each other."""


# The files of one run in a checkpoint folder: a new run moves them aside, never overwrites them.
_RUN_FILES = ("last.pt", "best.pt", "history.json")
# Held by the run that uses a checkpoint folder, naming it (see `_new_lock_record`) and renewed
# before each epoch's checkpoint.
_LOCK = "run.lock"
# Held while a stale lock is replaced, so that two runs never both take one over.
_TAKEOVER = "run.lock.takeover"
# A lock from another machine, whose process cannot be looked up, counts as abandoned once its
# last renewal is this old, or three of its run's epochs if longer: a Colab disconnect ends the
# VM before its run can remove the lock.
_LOCK_TIMEOUT_SECONDS = 600
_LOCK_TIMEOUT_EPOCHS = 3
# Process ids are C ints: a larger "pid" in a lock is no process's (os.kill would overflow).
_MAX_PID = 2**31 - 1
# The fallback torch.save raises when its writes fail (a full disk, say).
_TORCH_WRITE_FAILED = "PytorchStreamWriter failed"


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a file.

    Where the file system can sync, the file reaches the disk before the rename and the rename
    before this returns, so a power cut leaves the old file or the new one, never an empty one.
    A failed write (a full disk, say) raises an OSError that names the file and the fix.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            _sync(f.fileno())
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        reason, fix = _write_failure(err)
        if reason is None:
            raise
        raise OSError(
            f"could not write {path} ({reason}); the files written before are untouched. {fix}, "
            "or pass another checkpoint_dir; then run again with resume=True."
        ) from err


def _sync(fd: int) -> None:
    """Flush an open file to the disk; a file system that cannot sync (EINVAL, ENOTSUP) is let be."""
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename) to the disk: best effort, any failure ignored.

    The file itself is already written and synced, so a folder that cannot be opened or
    synced (Windows, some network and FUSE mounts) costs only the rename's durability.
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_failure(err: BaseException) -> tuple[str | None, str]:
    """Why a write failed and what to do, in words; (None, "") for an error no write causes."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full", "Free some disk space"
    if isinstance(err, OSError):
        return err.strerror or str(err), "Fix that"
    if _TORCH_WRITE_FAILED in str(err):  # torch's own error does not say why
        return (
            "writing failed (disk full, or the folder unreachable?)",
            "Free some disk space or check that the folder is reachable",
        )
    return None, ""


@contextlib.contextmanager
def _folder_lock(folder: Path | None) -> Iterator[_RunLock | None]:
    """Hold `folder`'s lock while the body runs (nothing without a folder): one run per folder."""
    if folder is None:
        yield None
        return
    lock = _RunLock(folder)
    lock.take()
    try:
        yield lock
    finally:
        lock.release()


def _new_lock_record() -> dict[str, object]:
    """What a run's lock says of it: which run, where it runs, since when, and its heartbeat."""
    now = time.time()
    return {
        "run": uuid.uuid4().hex, "pid": os.getpid(), "process": _process_identity(os.getpid()),
        "host": socket.gethostname(), "started": _local_time(now), "heartbeat": now,
        "epoch_seconds": None,
    }


def _process_identity(pid: int) -> str | None:
    """Which process `pid` is, told apart from a later one with its pid; None without /proc.

    Linux's boot id and the process's start time in clock ticks since boot (field 22 of
    /proc/<pid>/stat): a restarted container or machine reuses pids, never both of these.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    # Field 2, the command name, is in parentheses and may hold spaces and parentheses itself.
    after_name = stat[stat.rfind(")") + 1:].split()
    return f"{boot}:{after_name[19]}" if len(after_name) > 19 else None


@dataclass
class _RunLock:
    """This run's lock on its checkpoint folder: taken, renewed every epoch, released."""

    folder: Path
    record: dict[str, object] = field(default_factory=_new_lock_record)

    @property
    def path(self) -> Path:
        """The lock file."""
        return self.folder / _LOCK

    def take(self) -> None:
        """Create the lock; take over a stale one; refuse a live run's (FolderInUseError)."""
        if not _create_exclusive(self.path, json.dumps(self.record)):
            holder, now = _lock_holder(self.path), time.time()
            if not _is_stale(holder, now):
                raise FolderInUseError(_in_use_message(self.path, holder, now))
            self._take_over(holder)

    def _take_over(self, stale: dict) -> None:
        """Replace the lock that names the ended run `stale`, unless another run did first."""
        takeover = self.folder / _TAKEOVER
        if not _create_exclusive(takeover, json.dumps(self.record)):
            raise FolderInUseError(
                f"another run is taking over {self.path} just now (it holds {takeover}). Run "
                f"again in a moment; if no other run is starting there, delete {takeover} first."
            )
        try:
            holder = _lock_holder(self.path)
            if holder != stale:  # another run took it over between our look and now
                raise FolderInUseError(_in_use_message(self.path, holder, time.time()))
            print(f"Taking over {self.path}: its run "
                  f"({_describe_holder(stale, time.time())}) has ended")
            self._write()
        finally:
            takeover.unlink(missing_ok=True)

    def refresh(self) -> None:
        """Renew the heartbeat and record the epoch's time; stop if another run took the lock."""
        holder = _lock_holder(self.path)
        now = time.time()
        if holder.get("run") != self.record["run"]:
            raise FolderInUseError(
                f"{self.path} no longer names this run ({_describe_holder(holder, now)}): another "
                "run took the folder over, judging this one ended, or the lock was deleted. This "
                "run stops before writing its checkpoint, so that no two runs overwrite each "
                "other's. Go on in another checkpoint_dir, or resume here once no other run uses "
                "it."
            )
        self.record.update(heartbeat=now, epoch_seconds=now - self.record["heartbeat"])
        self._write()

    def release(self) -> None:
        """Remove the lock if it still names this run (one taken over is the other run's)."""
        if _lock_holder(self.path).get("run") == self.record["run"]:
            self.path.unlink(missing_ok=True)  # removed meanwhile: the exception in flight matters

    def _write(self) -> None:
        """Replace the lock file with this run's record, in one step."""
        _atomic_write(self.path, lambda f: f.write(json.dumps(self.record).encode()))


def _create_exclusive(path: Path, text: str) -> bool:
    """Create `path` holding `text` unless it exists; False if it does."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
        except OSError:
            path.unlink()  # an empty lock would look like a live run's to the next one
            raise
        return True
    except OSError as err:
        raise OSError(
            f"cannot write checkpoints to {path.parent} ({err.strerror or err}). Pass a "
            "checkpoint_dir you can write to, or fix that folder's permissions."
        ) from err


def _lock_holder(lock: Path) -> dict:
    """The record `lock` holds, less garbled entries; {} if none (gone, being written, not JSON)."""
    try:
        holder = json.loads(read_regular_file(lock, 4096).decode("utf-8", "replace"))
    except (OSError, RefusedFileError, ValueError, RecursionError):  # JSON nested too deep
        return {}
    if not isinstance(holder, dict):
        return {}
    return {key: value for key, value in holder.items() if _is_lock_entry(key, value)}


def _is_lock_entry(key: str, value: object) -> bool:
    """Whether `key: value` is an entry `_new_lock_record` or a heartbeat could have written."""
    if key in ("run", "process", "host", "started"):
        return isinstance(value, str)
    if key == "pid":
        return type(value) is int and 0 < value <= _MAX_PID
    if key == "heartbeat":
        return _is_number(value)
    if key == "epoch_seconds":  # three epochs' time must stay finite too
        return _is_number(value) and value >= 0 and _is_number(_LOCK_TIMEOUT_EPOCHS * value)
    return False


def _is_stale(holder: dict, now: float) -> bool:
    """Whether a lock's run has ended, as far as can be known at time `now`.

    On this host: its process is gone, or its pid is another process's now (a restarted
    container reuses pids), where `_process_identity` tells. From another: its heartbeat is
    older than `_lock_timeout`. A record without a pid or a heartbeat is never stale.
    """
    if holder.get("host") == socket.gethostname():
        pid = holder.get("pid")
        if pid is None:
            return False
        if not _process_exists(pid):
            return True
        recorded, current = holder.get("process"), _process_identity(pid)
        return None not in (recorded, current) and recorded != current
    silence = _silence(holder, now)
    return silence is not None and silence > _lock_timeout(holder)


def _process_exists(pid: int) -> bool:
    """Whether process `pid` runs on this host; True where that cannot be checked."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would end the process on Windows
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        pass
    return True


def _silence(holder: dict, now: float) -> float | None:
    """Seconds since a lock's last heartbeat, at time `now`; None if it records none."""
    heartbeat = holder.get("heartbeat")
    return now - heartbeat if heartbeat is not None else None


def _lock_timeout(holder: dict) -> float:
    """How long a lock from another machine may go without a heartbeat before it is stale."""
    epoch = holder.get("epoch_seconds")
    return max(_LOCK_TIMEOUT_SECONDS, _LOCK_TIMEOUT_EPOCHS * epoch if epoch is not None else 0)


def _describe_holder(holder: dict, now: float) -> str:
    """The run a lock names, in words: where it runs, since when, and its last heartbeat."""
    if not holder:
        return ("its lock file is empty, unreadable or garbled: being written, or left by a crash "
                "or by hand")
    silence = _silence(holder, now)
    # Minutes ago, not a time of day: the other machine's clock and time zone may differ.
    heartbeat = "unknown" if silence is None else f"{max(0.0, silence) / 60:.0f} min ago"
    return (
        f"pid {holder.get('pid', 'unknown')} on {holder.get('host', 'an unknown host')}, "
        f"started {holder.get('started', 'unknown')}, last heartbeat {heartbeat}"
    )


def _in_use_message(lock: Path, holder: dict, now: float) -> str:
    """The refusal of a folder whose lock names a run that may be live: which, and the fixes."""
    text = (
        f"{lock.parent} is in use by another run ({_describe_holder(holder, now)}, per {lock}): "
        "two runs in one folder overwrite each other's checkpoints. Pass another checkpoint_dir; "
        f"or, if that run has ended, delete {lock} and run again"
    )
    silence = _silence(holder, now)
    if holder.get("host") == socket.gethostname() or silence is None:
        return f"{text}."
    timeout = _lock_timeout(holder)
    return (
        f"{text}; or wait: a run on another machine renews its lock every epoch, and a lock not "
        f"renewed for {timeout / 60:.0f} min (its Colab VM disconnected, say) is taken over, this "
        f"one in {math.ceil(max(0.0, timeout - silence) / 60)} min."
    )


def _local_time(seconds: float) -> str:
    """A time (seconds since the epoch) as local date and time, to the second."""
    return datetime.datetime.fromtimestamp(seconds).isoformat(" ", "seconds")


def _drop_orphans(folder: Path) -> None:
    """Delete the temporary files `_atomic_write` left when a run was killed mid-write.

    Only the lock's holder calls this: no other run can be writing them.
    """
    for name in (*_RUN_FILES, _LOCK):
        for orphan in folder.glob(f".{name}.*"):
            orphan.unlink(missing_ok=True)


def _move_earlier_run_aside(folder: Path) -> None:
    """Move an earlier run's files into a new `folder/previous-<time>/`, so none is overwritten."""
    found = [folder / name for name in _RUN_FILES if (folder / name).exists()]
    if not found:
        return
    target = _new_folder(folder / f"previous-{time.strftime('%Y%m%d-%H%M%S')}")
    for path in found:
        os.replace(path, target / path.name)
    names = ", ".join(path.name for path in found)
    print(f"Starting a new run: moved the earlier run's {names} to {target}")


def _new_folder(path: Path) -> Path:
    """Create `path`, or `path-2`, `path-3`, ... if it exists: never reuse a folder."""
    candidate, suffix = path, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = path.with_name(f"{path.name}-{suffix}")


# ------------------------------------------------- optimizer, moving average, schedule


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, or AdamW; weight decay on weights of rank > 1 only."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    lr = config.max_lr / config.div_factor
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(config.momentum, 0.999))
    return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=config.nesterov)


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics.

    Args:
        model: the network being trained; the average starts as a copy of its weights.
        decay: the weight kept by the average at each `update` (0.998: ~500 updates' memory).
        warmup: keep min(decay, (1 + t) / (10 + t)) at update t instead, so early updates
            move the average most of the way to the model.

    Written by hand rather than with torch's AveragedModel, whose update reads its tensor step
    counter back as a Python bool (`bool(n_averaged == 0)`): a GPU sync on every update when
    the average lives on the GPU.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self._floats = [pair for pair in pairs if pair[0].is_floating_point()]
        self._counts = [pair for pair in pairs if not pair[0].is_floating_point()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move every float tensor 1 - decay of the way to the model's; copy integer counters.

        Args:
            step: how many updates came before this one (only the warm-up reads it).
        """
        decay = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        averages, current = zip(*self._floats)
        torch._foreach_lerp_(list(averages), list(current), 1.0 - decay)
        for average, count in self._counts:
            average.copy_(count)


def _make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.OneCycleLR:
    """A per-batch one-cycle schedule that spans exactly `epochs` epochs."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.max_lr,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        pct_start=config.warmup_fraction,
        div_factor=config.div_factor,
        final_div_factor=config.final_div_factor,
        anneal_strategy=config.anneal,
        cycle_momentum=False,
    )


# --------------------------------------------------- scoring, precision, memory format


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str | None = None,
    mixed_precision: bool = True,
    flip: bool = False,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (percent) of `model` over `loader`.

    `flip=True` scores test-time augmentation: the mean of the logits of each image and of its
    mirror image. It costs two forward passes and `fit` never scores with it: report it apart.
    """
    device = _model_device(model, device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    for _, labels, logits in _predict(model, loader, device, mixed_precision, flip):
        labels = labels.to(device, non_blocking=True)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        count += len(labels)
    if count == 0:
        raise ValueError("evaluate got an empty loader: the data set it scores has no images")
    return loss_sum.item() / count, 100.0 * correct.item() / count


def _model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """`device` as a torch.device; None means the device the model's weights are on."""
    return torch.device(device) if device is not None else next(model.parameters()).device


def _predict(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str | None = None,
    mixed_precision: bool = True,
    flip: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, labels, float32 logits) per batch: images and labels as loaded, logits on device.

    With `flip`, the logits are the mean over each image and its horizontal mirror.

    Eval mode, inference mode and autocast hold only while a batch is scored, and the model's
    own mode is back before each yield: nothing leaks into the caller's code between batches,
    after an early exit, or into a model that was training.
    """
    device = _model_device(model, device)
    modes = [(module, module.training) for module in model.modules()]  # some may be frozen
    for images, labels in loader:
        model.eval()
        try:
            with torch.inference_mode(), autocast(device, mixed_precision):
                inputs = images.to(device, non_blocking=True, memory_format=memory_format(device))
                logits = model(inputs).float()
                if flip:
                    logits = (logits + model(inputs.flip(3)).float()) / 2
        finally:
            for module, training in modes:
                module.training = training
        yield images, labels, logits


def half_dtype(device: torch.device) -> torch.dtype | None:
    """The 16-bit float this device computes fast, or None: fp16 on CUDA, bf16 on bf16 CPUs."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return None


@functools.cache
def _cpu_has_native_bf16() -> bool:
    """Whether the CPU does bf16 math in hardware (AVX512-BF16 or AMX), per Linux's cpuinfo.

    oneDNN's own check also passes on AVX-512 CPUs without these instructions (many cloud and
    Colab CPUs), where bf16 is emulated and slower than float32. Elsewhere: False.
    """
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """Autocast to the device's fast 16-bit float (see `half_dtype`); a no-op without one."""
    dtype = half_dtype(device)
    return torch.autocast(
        device.type, dtype=dtype or torch.float32, enabled=enabled and dtype is not None
    )


def memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last (NHWC) on CUDA and CPUs, whose conv kernels (cuDNN, oneDNN) prefer it."""
    return torch.channels_last if device.type in ("cuda", "cpu") else torch.contiguous_format


def _to_device(
    images: torch.Tensor, labels: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to the device, in the device's preferred memory format."""
    images = images.to(device, non_blocking=True, memory_format=memory_format(device))
    return images, labels.to(device, non_blocking=True)


# ----------------------------------- checkpoints: saving, and checking before a resume


@dataclass
class _TrainState:
    """What a checkpoint must hold to continue a run exactly, and the data it was trained on."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.OneCycleLR
    scaler: torch.amp.GradScaler
    history: History
    # Training-set size, steps per epoch and the scored splits: a resume must see the same.
    data: dict[str, int | str]
    ema: WeightAverage | None = None
    # What else decides the result (see `_run_setup`), as {"from_epoch", "setup"}: one entry per
    # stretch of epochs trained in one setup, the last this session's. A resume elsewhere does
    # not repeat the run; one allowed anyway adds an entry.
    setups: list[dict[str, object]] = field(default_factory=list)


# torch's warning when a scheduler's first step finds no optimizer step before it.
_SCHEDULER_BEFORE_OPTIMIZER = re.escape(
    "Detected call of `lr_scheduler.step()` before `optimizer.step()`"
)
# Every entry a checkpoint written by `fit` holds; each is a dict.
_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "history", "config", "data")
_SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
# Config fields a resumed run may change: they change no result worth refusing.
_FREE_FIELDS = ("log_every", "mixed_precision")
# Config fields added after checkpoints were first written, with the value every older
# checkpoint's run had: such a checkpoint resumes as long as the field still has that value.
_ADDED_FIELDS = {"ema_decay": 0.0, "ema_warmup": False, "anneal": "linear", "optimizer": "sgd"}
# torch.load reports an empty, cut-short or foreign file as any of these.
_UNREADABLE = (
    EOFError, KeyError, IndexError, TypeError, AttributeError, RuntimeError, ValueError,
    pickle.UnpicklingError, zipfile.BadZipFile,
)
# Far more than a checkpoint of this project's nets (a few MB) or any net a CPU trains.
_MAX_CHECKPOINT_BYTES = 2**30
_RESUME_FIX = (
    "Delete it, or pass resume=False to start a new run (the folder's run is then moved aside, "
    "not deleted)."
)


def _save_checkpoint(path: Path, state: _TrainState, config: TrainConfig) -> None:
    """Atomically write everything needed to continue the run; never a NaN or an infinity."""
    payload = {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "history": state.history.to_dict(),
        "config": dataclasses.asdict(config),
        "data": state.data,
        "ema": state.ema.module.state_dict() if state.ema is not None else {},
        "setups": state.setups,
    }
    bad = _first_non_finite(payload)
    if bad is not None:
        raise NonFiniteLossError(f"refusing to write {path}: its {bad} holds NaN or infinities.")
    with _checksummed_saves():
        _atomic_write(path, lambda f: torch.save(payload, f))


def _checksummed_saves() -> contextlib.AbstractContextManager:
    """torch.save writing each record's CRC-32, which loading checks, whatever torch's setting."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # torch before 2.5 always writes it
        return contextlib.nullcontext()
    return config.patch({"save.compute_crc32": True})


def _first_non_finite(value: object, name: str = "") -> str | None:
    """The dotted name of the first float tensor in `value` (dicts, lists) with a NaN or inf."""
    if isinstance(value, torch.Tensor):
        return name if value.is_floating_point() and not torch.isfinite(value).all() else None
    if isinstance(value, dict):
        children = list(value.items())
    elif isinstance(value, (list, tuple)):
        children = list(enumerate(value))
    else:
        return None
    for key, child in children:
        bad = _first_non_finite(child, f"{name}.{key}" if name else str(key))
        if bad is not None:
            return bad
    return None


def _read_checkpoint(path: Path, keys: Sequence[str], fix: str) -> dict:
    """torch.load a checkpoint written by `fit`, refusing an empty, cut-short or foreign file."""
    # Read first: a missing or unreadable file keeps its own OSError, and torch.load of the
    # bytes then fails only for what they hold (from a path, some cuts raise OSError too).
    try:
        content = read_regular_file(path, _MAX_CHECKPOINT_BYTES)
    except RefusedFileError as err:
        raise CheckpointError(f"{path} cannot be a checkpoint: {err}. {fix}") from err
    try:
        # Each record is checked before any is unpickled: a changed bit in the pickle is then
        # reported as what it is, not as a file torch cannot read.
        problem = _archive_problem(content)
        if problem is None:
            payload = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except _UNREADABLE as err:
        lines = str(err).strip().splitlines()
        reason = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({reason}): it is empty, cut short (killed while "
            f"being written or copied?) or not a torch file. {fix}"
        ) from err
    if problem is not None:
        raise CheckpointError(f"{path} {problem}. {fix}")
    entries = payload if isinstance(payload, dict) else {}
    missing = [k for k in keys if not isinstance(entries.get(k), dict)]
    if missing:
        bare = entries and all(isinstance(v, torch.Tensor) for v in entries.values())
        hint = (
            " It looks like a bare state_dict, which loads with "
            "model.load_state_dict(torch.load(path, weights_only=True))."
            if bare
            else ""
        )
        raise CheckpointError(
            f"{path} is not a checkpoint written by this version of fit: it has no "
            f"{', '.join(repr(k) for k in missing)} {'entry' if len(missing) == 1 else 'entries'}."
            f"{hint} {fix}"
        )
    return payload


def _archive_problem(content: bytes) -> str | None:
    """What makes a torch.save zip unusable before it is unpickled, in words; None if nothing.

    torch.save stores every record (the pickle, each tensor's bytes) uncompressed with its
    CRC-32, and torch.load never checks them. A compressed record is no torch file's, and
    unpacking it could cost far more than the file's size. Raises BadZipFile for no zip.
    """
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        compressed = [
            info.filename for info in archive.infolist() if info.compress_type != zipfile.ZIP_STORED
        ]
        if compressed:
            return (
                f"is not a checkpoint written by fit: its record {compressed[0]} is compressed, "
                "which torch.save never does"
            )
        damaged = archive.testzip()
    if damaged is not None:
        return (
            f"is corrupt: its record {damaged} no longer matches the CRC-32 checksum it was "
            "saved with (a bit changed on disk or in a copy)"
        )
    return None


def _check_same_run(
    path: Path, payload: dict, data: dict[str, int | str], config: TrainConfig
) -> None:
    """Refuse a checkpoint whose recipe, training-set size, steps or scored splits differ."""
    _check_saved_recipe(path, payload["config"], config)
    saved = {**_ADDED_FIELDS, **payload["config"], **payload["data"]}
    wanted = {**dataclasses.asdict(config), **data}
    if 0 in (saved["ema_decay"], wanted["ema_decay"]):
        # Without a moving average on one side, its warm-up is no further difference.
        saved.pop("ema_warmup", None)
        wanted.pop("ema_warmup", None)
    for key in _FREE_FIELDS:
        wanted.pop(key)
    differences = _differences(saved, wanted)
    if differences:
        raise CheckpointError(
            f"{path} holds a different run: {'; '.join(differences)}. Resume with the same config, "
            "training data and batch size; or pass resume=False to start a new run (the old one "
            "is moved aside); or use a new checkpoint_dir."
        )


def _check_saved_recipe(path: Path, saved: dict, config: TrainConfig) -> None:
    """Refuse a saved recipe that TrainConfig refuses: fit never saves one.

    A field the checkpoint lacks is left to `_check_same_run`: it is taken from `config`.
    """
    values = {**dataclasses.asdict(config),
              **{name: saved[name] for name in _field_types() if name in saved}}
    problems = _wrong_types(values) or _out_of_range(values)
    if problems:
        raise CheckpointError(
            f"{path} holds a recipe that TrainConfig refuses ({'; '.join(problems)}), which fit "
            f"never saves. {_RESUME_FIX}"
        )


def _check_weights_fit(path: Path, weights: dict, model: nn.Module, fix: str) -> None:
    """Refuse weights whose names, shapes or dtypes differ from `model`'s, before any loads."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    present = [k for k in expected if k in weights]
    reshaped = [
        k for k in present
        if not isinstance(weights[k], torch.Tensor) or weights[k].shape != expected[k].shape
    ]
    # load_state_dict would cast an int64 or complex tensor silently
    retyped = [k for k in present if k not in reshaped and weights[k].dtype != expected[k].dtype]
    problems = [
        f"{label}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
        for label, names in (("missing", missing), ("extra", unexpected),
                             ("other shape", reshaped), ("other dtype", retyped))
        if names
    ]
    if problems:
        raise CheckpointError(
            f"{path} holds the weights of a different network ({'; '.join(problems)}). {fix}"
        )


def _check_saved_finite(path: Path, content: dict, fix: str) -> None:
    """Refuse checkpoint content with a NaN or an infinity: `_save_checkpoint` writes none."""
    bad = _first_non_finite(content)
    if bad is not None:
        raise CheckpointError(
            f"{path} holds NaN or infinite values in {bad}, which fit never saves. {fix}"
        )


def _check_scaler_state(path: Path, scaler: dict) -> None:
    """Refuse a GradScaler state that is neither empty (a run without one) nor complete."""
    missing = [k for k in _SCALER_KEYS if k not in scaler]
    if scaler and missing:
        raise CheckpointError(
            f"{path} holds an incomplete GradScaler state (no {', '.join(missing)}). {_RESUME_FIX}"
        )
    wrong = [k for k in _SCALER_KEYS if k in scaler and not _is_number(scaler[k])]
    if scaler and not wrong and scaler["scale"] <= 0:
        wrong = ["scale"]
    if wrong:
        raise CheckpointError(
            f"{path} holds a GradScaler state with a bad {', '.join(wrong)} (each must be a "
            f"finite number, the scale a positive one). {_RESUME_FIX}"
        )


def _is_number(value: object) -> bool:
    """Whether `value` is a finite int or float (not a bool)."""
    return type(value) in (int, float) and math.isfinite(value)


def _check_history(path: Path, history: History, data: dict, config: TrainConfig) -> None:
    """Refuse a history longer than the run, or whose lists disagree with its epoch count."""
    lists = history.to_dict()
    bad = [name for name, values in lists.items()
           if not isinstance(values, list) or not all(_is_number(v) for v in values)]
    epochs = len(history.seconds) if "seconds" not in bad else 0
    scored = str(data["scored"]).split("+")
    lengths = {"train_loss": epochs, "train_acc": epochs, "lr": epochs, "seconds": epochs,
               "batch_lr": epochs * data["steps_per_epoch"]}
    for split in ("val", "test"):
        lengths[f"{split}_loss"] = lengths[f"{split}_acc"] = epochs if split in scored else 0
        lengths[f"ema_{split}_acc"] = lengths[f"{split}_acc"] if config.ema_decay > 0 else 0
    problems = [f"{name} is no list of finite numbers" for name in bad] + [
        f"{name} has {len(lists[name])} entries, not {length}"
        for name, length in lengths.items() if name not in bad and len(lists[name]) != length
    ]
    if epochs > config.epochs:
        problems.append(f"{epochs} epochs, more than config.epochs={config.epochs}")
    if problems:
        raise CheckpointError(
            f"{path} holds a history this run cannot have ({'; '.join(problems)}). {_RESUME_FIX}"
        )


def _check_optimizer_and_schedule(
    path: Path, payload: dict, state: _TrainState, epochs: int
) -> None:
    """Refuse an optimizer or scheduler state other than this run's after `epochs` epochs.

    Checked entry by entry against the fresh `state`, which is neither changed nor copied.
    """
    problems = _optimizer_layout_problems(payload["optimizer"], state.optimizer)
    if not problems:
        steps = epochs * state.data["steps_per_epoch"]
        # A GradScaler (saved only when enabled) skips the steps with inf gradients.
        scaled = bool(payload["scaler"])
        problems = _schedule_problems(payload, state, epochs) + _buffer_problems(
            payload["optimizer"]["state"], state.optimizer, steps, scaled
        )
    if problems:
        raise CheckpointError(
            f"{path} holds an optimizer or scheduler state other than this run's after {epochs} "
            f"epochs: {'; '.join(problems)}. {_RESUME_FIX}"
        )


def _optimizer_layout_problems(saved: dict, optimizer: torch.optim.Optimizer) -> list[str]:
    """What `optimizer.load_state_dict(saved)` would fail on, or map to other parameters."""
    groups = saved.get("param_groups")
    if not isinstance(saved.get("state"), dict) or not (
        isinstance(groups, list)
        and all(isinstance(group, dict) and isinstance(group.get("params"), list)
                for group in groups)
    ):
        return ["no 'state' dict and 'param_groups' list of parameter groups"]
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    # torch numbers the parameters in order, through the groups; load_state_dict maps by number.
    if [group["params"] for group in groups] != [
        list(range(start, start + size)) for start, size in zip(starts, sizes)
    ]:
        return [f"param_groups of {[len(group['params']) for group in groups]} parameters, "
                f"not this network's {sizes} numbered in order"]
    return []


def _schedule_problems(payload: dict, state: _TrainState, epochs: int) -> list[str]:
    """How the saved schedule and learning rates differ from this run's after `epochs` epochs."""
    steps = epochs * state.data["steps_per_epoch"]
    saved = payload["scheduler"]
    if type(saved.get("last_epoch")) is not int or saved["last_epoch"] != steps:
        return [f"scheduler.last_epoch ({saved.get('last_epoch')!r:.20} in the checkpoint, "
                f"{steps} after {epochs} epochs)"]
    lrs = _learning_rates_at(state.scheduler, steps)
    schedule = {**state.scheduler.state_dict(), "last_epoch": steps, "_last_lr": lrs}
    groups = [{**group, "lr": lr}
              for group, lr in zip(state.optimizer.state_dict()["param_groups"], lrs)]
    # Only the entries both sides have: another torch version may add or drop some.
    saved_groups = payload["optimizer"]["param_groups"]
    return _differences(saved, _shared(schedule, saved), "scheduler") + [
        difference
        for i, (saved_group, group) in enumerate(zip(saved_groups, groups))
        for difference in _differences(
            saved_group, _shared(group, saved_group), f"param_groups.{i}"
        )
    ]


def _shared(entries: dict, other: dict) -> dict:
    """The entries of `entries` whose keys `other` has, but for a step count that only warns."""
    return {k: v for k, v in entries.items() if k in other and k != "_step_count"}


def _learning_rates_at(scheduler: torch.optim.lr_scheduler.OneCycleLR, steps: int) -> list[float]:
    """The learning rate of each parameter group after `steps` steps of `scheduler`.

    The scheduler is moved there and back: its get_lr only reads the optimizer (with
    cycle_momentum off, as `_make_scheduler` sets it).
    """
    current = scheduler.last_epoch
    scheduler.last_epoch = steps
    try:
        with warnings.catch_warnings():  # get_lr warns when called outside step(): here it is read
            warnings.simplefilter("ignore", UserWarning)
            return scheduler.get_lr()
    finally:
        scheduler.last_epoch = current


def _buffer_problems(
    saved: dict, optimizer: torch.optim.Optimizer, steps: int, scaled: bool
) -> list[str]:
    """How the per-parameter optimizer state differs from what `optimizer` writes in `steps` steps.

    Every key `_state_keys` names must be there, and no other; `scaled`: a GradScaler may have
    skipped every step, so that no parameter has state yet.
    """
    params = [(param, group) for group in optimizer.param_groups for param in group["params"]]
    problems = [
        f"state for parameter {index!r:.20}, which this network lacks"
        for index in saved if type(index) is not int or not 0 <= index < len(params)
    ]
    expected = {index: _state_keys(optimizer, group)
                for index, (param, group) in enumerate(params) if param.requires_grad}
    stateful = [index for index, keys in expected.items() if keys]
    missing = [index for index in stateful if index not in saved]
    # One optimizer step writes the state of every parameter at once: part of it missing is
    # damage, all of it only a run whose every step the GradScaler skipped.
    if missing and not (scaled and len(missing) == len(stateful)):
        listed = ", ".join(map(str, missing[:3])) + (", ..." if len(missing) > 3 else "")
        problems.append(f"no {type(optimizer).__name__} state for parameter(s) {listed}")
    for index, entry in saved.items():
        if type(index) is int and 0 <= index < len(params):
            keys = expected.get(index, ())
            problems += _entry_problems(index, entry, params[index][0], keys, steps)
    return problems


def _state_keys(optimizer: torch.optim.Optimizer, group: dict) -> tuple[str, ...]:
    """The state keys `optimizer` (made by `_make_optimizer`) keeps for a parameter of `group`."""
    if isinstance(optimizer, torch.optim.AdamW):
        return ("step", "exp_avg", "exp_avg_sq")
    # SGD: without momentum (nesterov=False, momentum=0) it keeps no state.
    return ("momentum_buffer",) if group["momentum"] else ()


def _entry_problems(
    index: int, entry: object, param: torch.Tensor, keys: tuple[str, ...], steps: int
) -> list[str]:
    """What is wrong with one parameter's saved optimizer state, given the `keys` it must hold."""
    if not isinstance(entry, dict):
        return [f"state of parameter {index} is no dict"]
    # None: what older torch versions saved for SGD without momentum, which keeps no buffer.
    held = {key: value for key, value in entry.items() if value is not None}
    if set(held) != set(keys):
        return [f"state of parameter {index} holds {list(held)!r:.80}, not {list(keys)} "
                "(what this optimizer writes)"]
    problems = [
        f"{key} of parameter {index} is no {param.dtype} tensor of shape {tuple(param.shape)}"
        for key, value in held.items()
        if key != "step" and not (
            isinstance(value, torch.Tensor) and value.dtype == param.dtype
            and value.shape == param.shape
        )
    ]
    step = held.get("step")
    # A whole count of the steps taken (the GradScaler's skipped ones not counted)
    if "step" in held and not (
        isinstance(step, torch.Tensor) and step.shape == () and step.is_floating_point()
        and step.item().is_integer() and 1 <= step.item() <= steps
    ):
        problems.append(f"step of parameter {index} is no scalar float tensor counting 1 to "
                        f"{steps} optimizer steps")
    return problems


# How to resume in the setup a checkpoint records, for each entry of `_run_setup`.
_SETUP_FIXES = {
    "augmentation": "give the training set the augmentation that run had (the same "
                    "train_transforms arguments)",
    "device": "pass device={saved!r} to fit",
    "autocast": "autocast to {saved} as that run did (TrainConfig.mixed_precision: float16 on "
                "CUDA, bfloat16 on a CPU with native bf16, else float32)",
    "loader_workers": "build the loaders with make_loaders(..., workers={saved})",
    "torch_threads": "call torch.set_num_threads({saved}) before fit",
}


def _resumed_setups(
    path: Path, payload: dict, now: dict, epochs: int, allow_other_setup: bool
) -> list[dict]:
    """The setups a resumed run trains in: the checkpoint's, and `now` if it differs.

    `now` is compared with the setup the checkpoint's run last trained in; a difference is
    refused, each named with how to match it, unless `allow_other_setup`.
    """
    recorded = _recorded_setups(path, payload)
    resumed = {"from_epoch": epochs + 1, "setup": now}
    if recorded is None:
        print(f"{path} predates records of the setup (augmentation, threads, loader workers, "
              "device, precision): resuming without checking that they are the same")
        return [resumed]
    last = recorded[-1]["setup"]
    # An entry only one side has was not recorded on the other (threads: CPU runs only).
    shared = {key: value for key, value in now.items() if key in last}
    differences = _differences(last, shared)
    if not differences:
        return recorded
    if not allow_other_setup:
        fixes = [_SETUP_FIXES[key].format(saved=last[key])
                 for key, value in shared.items() if _differences(last[key], value)]
        raise CheckpointError(
            f"{path} was trained in another setup: {'; '.join(differences)}. Resumed so, the run "
            f"would not repeat an uninterrupted one. To repeat it: {'; '.join(fixes)}. Or pass "
            "allow_other_setup=True to fit to continue anyway (the checkpoint keeps each "
            "setup); or resume=False to start a new run (the old one is moved aside)."
        )
    print(f"Resuming {path} in another setup ({'; '.join(differences)}): the run goes on, "
          "but no longer repeats an uninterrupted one. Its checkpoints record each setup.")
    return [*recorded, resumed]


def _recorded_setups(path: Path, payload: dict) -> list[dict] | None:
    """The setups a checkpoint's run trained in, oldest first; None if it predates such records."""
    if "setups" in payload:
        setups = payload["setups"]
    elif "setup" in payload:  # written before resumes kept each setup: the last one only
        setups = [{"from_epoch": 1, "setup": payload["setup"]}]
    else:
        return None
    if not (isinstance(setups, list) and setups
            and all(isinstance(entry, dict) and isinstance(entry.get("setup"), dict)
                    for entry in setups)):
        raise CheckpointError(
            f"{path} holds a setup record fit does not write (a list of setups). {_RESUME_FIX}"
        )
    return setups


def _differences(saved: object, now: object, name: str = "") -> list[str]:
    """'name (saved in the checkpoint, now now)' for each entry of `now` that `saved` differs in.

    Dicts are compared key by key (the keys of `now`: one only saved is no longer used) and
    lists of equal length item by item, so a nested difference is named by its path.
    """
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k, v in now.items() for d in _differences(saved.get(k), v, _join(name, k))]
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        pairs = enumerate(zip(saved, now))
        return [d for i, (a, b) in pairs for d in _differences(a, b, _join(name, i))]
    if _same_value(saved, now):
        return []
    return [f"{name} ({saved!r:.60} in the checkpoint, {now!r:.60} now)"]


def _same_value(saved: object, now: object) -> bool:
    """Equality of two checkpoint entries, where a tensor equals only itself, a bool only a bool."""
    if torch.is_tensor(saved) or torch.is_tensor(now):
        return saved is now
    return (type(saved) is bool) == (type(now) is bool) and saved == now


def _join(name: str, key: object) -> str:
    """A dotted path: `name.key`, or `key` at the top."""
    return f"{name}.{key}" if name else str(key)


def _load_checkpoint(
    path: Path, state: _TrainState, config: TrainConfig, allow_other_setup: bool = False
) -> None:
    """Restore `state` from `path`, all or nothing: every check passes before anything loads."""
    payload = _read_checkpoint(path, _CHECKPOINT_KEYS, _RESUME_FIX)
    _check_same_run(path, payload, state.data, config)
    _check_weights_fit(path, payload["model"], state.model, _RESUME_FIX)
    if state.ema is not None:
        if not isinstance(payload.get("ema"), dict) or not payload["ema"]:
            raise CheckpointError(
                f"{path} holds no moving average of the weights, though its run had "
                f"ema_decay={config.ema_decay}. {_RESUME_FIX}"
            )
        _check_weights_fit(path, payload["ema"], state.ema.module, _RESUME_FIX)
    _check_scaler_state(path, payload["scaler"])
    _check_saved_finite(path, payload, _RESUME_FIX)
    try:
        history = History(**payload["history"])
    except TypeError as err:
        raise CheckpointError(
            f"{path} holds a history this run cannot use ({err}). {_RESUME_FIX}"
        ) from err
    _check_history(path, history, state.data, config)
    _check_optimizer_and_schedule(path, payload, state, history.epochs)
    setups = _resumed_setups(
        path, payload, state.setups[-1]["setup"], history.epochs, allow_other_setup
    )
    state.model.load_state_dict(payload["model"])
    if state.ema is not None:
        state.ema.module.load_state_dict(payload["ema"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    # Empty: the run had no GradScaler (CPU, or AMP off); one now enabled (CUDA) starts afresh.
    if payload["scaler"]:
        state.scaler.load_state_dict(payload["scaler"])
    state.history = history
    state.setups = setups


# ---------------------------------------------------------------------------- training


def _train_epoch(
    state: _TrainState,
    loader: DataLoader,
    device: torch.device,
    config: TrainConfig,
    epoch: int,
    progress: bool,
) -> tuple[float, float]:
    """One pass over `loader` with per-batch LR steps; returns (mean loss, accuracy %)."""
    model, optimizer, scheduler, scaler = state.model, state.optimizer, state.scheduler, state.scaler
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    model.train()
    losses: list[torch.Tensor] = []
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    # The bar is advanced by hand, never given the loader: tqdm.auto's asyncio mixin calls
    # iter() on an iterable at construction (tqdm issue 1598), which would start a second set
    # of workers each epoch, draw from the shuffle generator and leave an unfinished iterator
    # for later forked workers to trip over.
    with tqdm(total=len(loader), desc=f"epoch {epoch}", leave=False, disable=not progress) as bar:
        for batch, (images, labels) in enumerate(loader, start=1):
            images, labels = _to_device(images, labels, device)
            with autocast(device, config.mixed_precision):
                logits = model(images)
                loss = criterion(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if state.ema is not None:
                # The scheduler has stepped once per earlier batch of the run, resumed or not.
                state.ema.update(step=scheduler.last_epoch)
            state.history.batch_lr.append(scheduler.get_last_lr()[0])
            _step_scheduler(scheduler)
            losses.append(loss.detach())
            correct += (logits.argmax(1) == labels).sum()
            count += len(labels)
            bar.update()
            if batch % config.log_every == 0 or batch == len(loader):
                recent = torch.stack(losses[-config.log_every :]).cpu()
                _check_finite(recent, epoch, batch - len(recent) + 1)
                bar.set_postfix(
                    loss=f"{recent.mean().item():.3f}",
                    acc=f"{100.0 * correct.item() / count:.1f}",
                    lr=f"{state.history.batch_lr[-1]:.4f}",
                )
    return torch.stack(losses).mean().item(), 100.0 * correct.item() / count


def _step_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """`scheduler.step()`, without torch's false alarm when the GradScaler skipped step one.

    A step the GradScaler skips (inf gradients, usual in fp16's first steps) makes the
    scheduler's first step warn that it ran before the optimizer's: spurious here, and the
    schedule stays aligned (pytorch/pytorch#44511). Only the first step is wrapped: entering
    catch_warnings resets which warnings were already shown, so every batch would repeat them.
    """
    if scheduler.last_epoch > 0:
        scheduler.step()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _SCHEDULER_BEFORE_OPTIMIZER, UserWarning)
        scheduler.step()


def _check_finite(losses: torch.Tensor, epoch: int, first_batch: int) -> None:
    """Raise NonFiniteLossError naming the first batch whose loss is NaN or infinite."""
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        batch = first_batch + int(bad[0])
        raise NonFiniteLossError(
            f"loss became {losses[int(bad[0])].item()} at epoch {epoch}, batch {batch}."
        )


def _check_epoch_finite(
    model: nn.Module, scores: dict[str, tuple[float, float]], epoch: int
) -> None:
    """Raise NonFiniteLossError if a scored loss, a weight or a buffer is NaN or infinite."""
    problems = [
        f"{split} loss {loss}" for split, (loss, _) in scores.items() if not math.isfinite(loss)
    ]
    tensor = _first_non_finite(model.state_dict())
    if tensor is not None:
        problems.append(f"{tensor} holds NaN or infinite values")
    if problems:
        raise NonFiniteLossError(f"training diverged in epoch {epoch}: {'; '.join(problems)}.")


def _divergence_advice(config: TrainConfig, folder: Path | None, good_epochs: int) -> str:
    """How to fix a diverged run, and what its checkpoints hold: only what is true."""
    advice = (
        f"The learning rate is probably too high for this setup: lower max_lr (now "
        f"{config.max_lr:g}), or check the inputs for NaNs."
    )
    if folder is not None and (folder / "last.pt").exists():
        advice += f" The checkpoints still hold the last good epoch ({good_epochs}) in {folder}."
    elif folder is not None:
        advice += f" No checkpoint of this run was written to {folder}."
    return advice


def _run_epoch(
    state: _TrainState,
    train_loader: DataLoader,
    scored: dict[str, DataLoader],
    device: torch.device,
    config: TrainConfig,
    epoch: int,
    progress: bool,
) -> None:
    """Train and score one epoch, check that every number is finite, then record it."""
    seed_epoch(train_loader, epoch_seed(config.seed, epoch))
    start = time.perf_counter()
    train_loss, train_acc = _train_epoch(state, train_loader, device, config, epoch, progress)
    scores = {
        split: evaluate(state.model, loader, device, config.mixed_precision)
        for split, loader in scored.items()
    }
    _check_epoch_finite(state.model, scores, epoch)
    history = state.history
    history.train_loss.append(train_loss)
    history.train_acc.append(train_acc)
    for split, (loss, accuracy) in scores.items():
        getattr(history, f"{split}_loss").append(loss)
        getattr(history, f"{split}_acc").append(accuracy)
    history.lr.append(history.batch_lr[-1])
    history.seconds.append(time.perf_counter() - start)
    # Scoring the average is left out of the epoch time (its per-batch update is not).
    if state.ema is not None:
        _score_average(state.ema, history, scored, device, config.mixed_precision)
    if progress:
        tqdm.write(_epoch_line(history, config.epochs))


def _score_average(
    ema: WeightAverage,
    history: History,
    scored: dict[str, DataLoader],
    device: torch.device,
    mixed_precision: bool,
) -> None:
    """Score the moving average of the weights on each scored split; record it in `history`."""
    for split, loader in scored.items():
        accuracy = evaluate(ema.module, loader, device, mixed_precision)[1]
        getattr(history, f"ema_{split}_acc").append(accuracy)


def _save_run(lock: _RunLock, state: _TrainState, config: TrainConfig) -> None:
    """Renew the folder's lock, then write best.pt (at a new best), last.pt and history.json.

    The lock first: a run whose folder another run has taken over stops before writing. Only a
    validation score picks best.pt (of tied epochs, the later one): picking an epoch by its
    test score would flatter the test set. best.pt goes first: a kill between the two writes
    then resumes from the epoch before, which is recomputed, instead of losing a best epoch
    that last.pt already counted.
    """
    lock.refresh()
    folder = lock.folder
    val_acc = state.history.val_acc
    if val_acc and val_acc[-1] >= max(val_acc):
        _save_checkpoint(folder / "best.pt", state, config)
    _save_checkpoint(folder / "last.pt", state, config)
    state.history.save(folder / "history.json")


def _open_folder(
    folder: Path, state: _TrainState, config: TrainConfig, resume: bool, allow_other_setup: bool
) -> None:
    """Continue `folder`'s run (resume) or move an earlier run aside; the caller holds the lock."""
    _drop_orphans(folder)
    if resume and (folder / "last.pt").exists():
        _load_checkpoint(folder / "last.pt", state, config, allow_other_setup)
        # A kill between last.pt and history.json leaves the history an epoch behind.
        state.history.save(folder / "history.json")
        return
    if resume:  # say so: in a fresh VM this usually means the checkpoints are elsewhere
        print(f"resume=True, but {folder} holds no last.pt: starting a new run")
    _move_earlier_run_aside(folder)


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    test_loader: DataLoader | None = None,
    *,
    config: TrainConfig | None = None,
    device: torch.device | str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    val_loader: DataLoader | None = None,
    allow_other_setup: bool = False,
) -> History:
    """Train `model` with the one-cycle recipe, evaluating after every epoch.

    Args:
        model: the network (moved to `device`).
        train_loader: from `dataset.make_loaders`, batching `config.batch_size` images.
        test_loader: scored after every epoch (None: never, as while tuning a recipe).
        config: the recipe, `config.epochs` included; defaults to `TrainConfig()`.
        device: defaults to `get_device()`.
        checkpoint_dir: if given, `last.pt` and `history.json` are written there atomically
            after every epoch, never with a NaN or infinity in them (and `best.pt`, see
            `val_loader`). The run holds `checkpoint_dir/run.lock` meanwhile: a second run
            there is refused (FolderInUseError). The lock is renewed before every epoch's
            checkpoint, and taken over once its run has ended: on this machine, once its
            process is gone; from another (a Colab VM cut off by a disconnect), once it has
            gone unrenewed for 10 minutes, or three of its epochs if longer.
        resume: continue from `checkpoint_dir/last.pt` when it exists (after checking it is
            the same recipe, data and network, and intact). Otherwise an earlier run's files
            there are moved into a new `previous-<time>` subfolder, never overwritten.
        progress: show tqdm bars and the one-line epoch summaries.
        val_loader: a validation split, scored after every epoch. Only with it is `best.pt`
            written: the weights of the epoch with the best validation accuracy.
        allow_other_setup: resume even where the setup differs from the one the checkpoint's
            run last trained in (the augmentation, loader workers, device, autocast precision,
            and on a CPU the torch threads): the run then goes on but no longer repeats an
            uninterrupted one, and its checkpoints record each setup and the epoch it began.
            Without it such a resume is refused, naming each difference and how to match it.

    Returns:
        The run's History (the resumed one, extended, when resuming).
    """
    config = config or TrainConfig()
    device = torch.device(device) if device is not None else get_device()
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir: the folder holding last.pt")
    if len(train_loader) == 0:
        raise ValueError("the train loader yields no batches: the training set is empty")
    scored = {
        split: loader
        for split, loader in (("val", val_loader), ("test", test_loader))
        if loader is not None
    }
    empty = [split for split, loader in scored.items() if len(loader) == 0]
    if empty:
        raise ValueError(
            f"the {' and '.join(empty)} loader yields no batches: pass None to skip scoring it"
        )
    if train_loader.batch_size != config.batch_size:
        raise ValueError(
            f"the train loader batches {train_loader.batch_size} images but config.batch_size is "
            f"{config.batch_size}: build the loaders with make_loaders(..., config.batch_size)"
        )

    model.to(device, memory_format=memory_format(device))
    optimizer = _make_optimizer(model, config)
    state = _TrainState(
        model=model,
        optimizer=optimizer,
        scheduler=_make_scheduler(optimizer, config, config.epochs, len(train_loader)),
        scaler=torch.amp.GradScaler(
            device.type, enabled=config.mixed_precision and device.type == "cuda"
        ),
        history=History(),
        data={
            "train_images": len(train_loader.dataset),
            "steps_per_epoch": len(train_loader),
            "scored": "+".join(scored),
        },
        ema=(
            WeightAverage(model, config.ema_decay, warmup=config.ema_warmup)
            if config.ema_decay > 0 else None
        ),
        setups=[{"from_epoch": 1, "setup": _run_setup(train_loader, device, config)}],
    )
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    with _folder_lock(folder) as lock, _cudnn_autotuning(device):
        if lock is not None:
            _open_folder(lock.folder, state, config, resume, allow_other_setup)
        for epoch in range(state.history.epochs + 1, config.epochs + 1):
            try:
                _run_epoch(state, train_loader, scored, device, config, epoch, progress)
                if lock is not None:
                    _save_run(lock, state, config)
            except NonFiniteLossError as err:
                advice = _divergence_advice(config, folder, epoch - 1)
                raise NonFiniteLossError(f"{err} {advice}") from None
    return state.history


def _run_setup(loader: DataLoader, device: torch.device, config: TrainConfig) -> dict[str, object]:
    """What decides a run's result besides its recipe and data: a resume must find the same."""
    half = half_dtype(device) if config.mixed_precision else None
    setup = {
        "augmentation": describe_transform(getattr(loader.dataset, "transform", None)),
        "device": device.type,
        "autocast": str(half or torch.float32),
        # Each worker draws its own augmentation stream.
        "loader_workers": loader.num_workers,
    }
    if device.type == "cpu":
        # CPU kernels split their sums over the threads: another count adds up other floats.
        # On a GPU the threads only feed it, so a VM with other cores resumes alike.
        setup["torch_threads"] = torch.get_num_threads()
    return setup


@contextlib.contextmanager
def _cudnn_autotuning(device: torch.device) -> Iterator[None]:
    """cuDNN autotuning on CUDA for the run, then the caller's setting back.

    Training batches have one fixed shape, so cuDNN can time its kernels once and keep the
    fastest; code that runs after `fit` with changing shapes should not inherit that.
    """
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = previous or device.type == "cuda"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's shuffle and augmentation: distinct for every (run seed, epoch).

    Runs never have 100,003 epochs, so seeds of different (seed, epoch) pairs never collide.
    """
    return seed * 100_003 + epoch


def _epoch_line(history: History, epochs: int) -> str:
    """One line per epoch: losses, accuracies, learning rate, time."""
    i = history.epochs - 1
    parts = [
        f"epoch {i + 1:>3}/{epochs}  train loss {history.train_loss[i]:.3f} "
        f"acc {history.train_acc[i]:5.2f}%"
    ]
    if history.val_acc:
        parts.append(f"val loss {history.val_loss[i]:.3f} acc {history.val_acc[i]:5.2f}%")
    if history.test_acc:
        parts.append(f"test loss {history.test_loss[i]:.3f} acc {history.test_acc[i]:5.2f}%")
    for split in ("val", "test"):
        averaged = getattr(history, f"ema_{split}_acc")
        if averaged:
            parts.append(f"EMA {split} acc {averaged[i]:5.2f}%")
    parts.append(f"lr {history.lr[i]:.4f}  {history.seconds[i]:.1f}s")
    return "  ".join(parts)


def checkpoint_data(path: str | os.PathLike) -> dict:
    """What a checkpoint written by `fit` records of its data (source, image counts), or {}."""
    payload = _read_checkpoint(Path(path), ("model",), "Pass a last.pt or best.pt written by fit.")
    data = payload.get("data")
    return data if isinstance(data, dict) else {}


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the model weights of a checkpoint written by `fit` (tensors only: weights_only)."""
    path = Path(path)
    fix = "Pass a last.pt or best.pt written by fit."
    payload = _read_checkpoint(path, ("model",), fix)
    _check_weights_fit(path, payload["model"], model, "Load it into the network that wrote it.")
    _check_saved_finite(path, payload["model"], fix)
    model.load_state_dict(payload["model"])
    return model


# --------------------------------------------------------------------------- reporting


def format_table(rows: Sequence[object]) -> str:
    """A Markdown table of dataclass rows (their fields are the columns)."""
    if not rows:
        return ""
    names = [f.name for f in dataclasses.fields(rows[0])]
    cells = [[_cell(getattr(row, name)) for name in names] for row in rows]
    widths = [max(len(x) for x in column) for column in zip(names, *cells)]
    lines = [names, ["-" * w for w in widths], *cells]
    return "\n".join(
        "| " + " | ".join(x.ljust(w) for x, w in zip(line, widths)) + " |" for line in lines
    )


def _cell(value: object) -> str:
    """Table text for one value: thousands separators for ints, yes/NO for bools."""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _finish(fig: plt.Figure, path: str | os.PathLike | None) -> plt.Figure:
    """Tighten the layout and save the figure when a path is given."""
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_history(history: History, path: str | os.PathLike | None = None) -> plt.Figure:
    """Loss and accuracy per epoch: train, validation, test and moving average, where scored."""
    epochs = range(1, history.epochs + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4))
    ax_loss.plot(epochs, history.train_loss, label="train (label-smoothed)")
    ax_acc.plot(epochs, history.train_acc, label="train (augmented)")
    for label, losses, accuracies in (
        ("validation", history.val_loss, history.val_acc),
        ("test", history.test_loss, history.test_acc),
    ):
        if accuracies:
            ax_loss.plot(epochs, losses, label=label)
            ax_acc.plot(epochs, accuracies, label=label)
    for label, accuracies in (
        ("validation, moving average", history.ema_val_acc),
        ("test, moving average", history.ema_test_acc),
    ):
        if accuracies:
            ax_acc.plot(epochs, accuracies, label=label, linestyle="--")
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return _finish(fig, path)


def plot_lr_schedule(history: History, path: str | os.PathLike | None = None) -> plt.Figure:
    """The learning rate of every batch: the one-cycle shape, as it was actually applied."""
    steps_per_epoch = len(history.batch_lr) / max(history.epochs, 1)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(np.arange(len(history.batch_lr)) / steps_per_epoch, history.batch_lr)
    ax.set(title="One-cycle learning rate", xlabel="epoch", ylabel="learning rate")
    ax.grid(alpha=0.3)
    return _finish(fig, path)


def show_samples(
    images: Sequence[torch.Tensor],
    titles: Sequence[str],
    path: str | os.PathLike | None = None,
    columns: int = 8,
) -> plt.Figure:
    """A grid of normalised 3xHxW image tensors, denormalised for display, with titles."""
    rows = max(1, math.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(denormalize(image))
        ax.set_title(title, fontsize=9)
    return _finish(fig, path)


@dataclass
class Misclassified:
    """One wrong prediction: the (normalised) image, true and predicted class, confidence."""

    image: torch.Tensor
    true: int
    predicted: int
    confidence: float


def misclassified(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str | None = None,
    limit: int | None = None,
) -> list[Misclassified]:
    """The images of `loader` that `model` gets wrong, most confident mistakes first."""
    records: list[Misclassified] = []
    for images, labels, logits in _predict(model, loader, device):
        confidence, predicted = logits.softmax(1).cpu().max(1)
        for i in (predicted != labels).nonzero().flatten().tolist():
            records.append(
                # A copy: a view would keep its whole batch (pinned, on a GPU) alive.
                Misclassified(images[i].clone(), int(labels[i]), int(predicted[i]),
                              float(confidence[i]))
            )
    records.sort(key=lambda r: r.confidence, reverse=True)
    return records[:limit]


def plot_misclassified(
    records: Sequence[Misclassified],
    path: str | os.PathLike | None = None,
    count: int = 20,
    columns: int = 5,
) -> plt.Figure:
    """A grid of mistakes titled 'true -> predicted (confidence)'."""
    shown = list(records[:count])
    titles = [
        f"{CLASSES[r.true]}\n→ {CLASSES[r.predicted]} ({100 * r.confidence:.0f}%)" for r in shown
    ]
    return show_samples([r.image for r in shown], titles, path=path, columns=columns)


def confusion_matrix(
    model: nn.Module, loader: DataLoader, device: torch.device | str | None = None
) -> np.ndarray:
    """Counts of (true class, predicted class) over `loader`: a 10x10 int array."""
    matrix = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.long)
    for _, labels, logits in _predict(model, loader, device):
        predicted = logits.argmax(1).cpu()
        matrix += torch.bincount(
            labels * len(CLASSES) + predicted, minlength=len(CLASSES) ** 2
        ).view(len(CLASSES), len(CLASSES))
    return matrix.numpy()


def per_class_accuracy(matrix: np.ndarray) -> dict[str, float]:
    """Accuracy (percent) of each class, from a confusion matrix."""
    totals = matrix.sum(1)
    return {
        name: (100.0 * matrix[i, i] / totals[i]) if totals[i] else float("nan")
        for i, name in enumerate(CLASSES)
    }


def plot_confusion_matrix(
    matrix: np.ndarray, path: str | os.PathLike | None = None, split: str = "test"
) -> plt.Figure:
    """The confusion matrix of the `split` images as a heat map, rows normalised to true counts."""
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        color = "white" if rates[i, j] > 0.5 else "black"
        ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix ({split})")
    return _finish(fig, path)
