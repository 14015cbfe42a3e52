"""Cost, speed and accuracy of `Net` beside the net we started from and the candidates.

    python benchmarks/bench.py --data data/cifar10-full --nets Net --epochs 10  # ~20 min, 2 cores
    python benchmarks/bench.py --quick         # a smoke run of a minute or two (CI)

The README's rows each name their command. Give a long run `--checkpoint-dir DIR`: it then
checkpoints every epoch, and the same command run again continues from the last one.

Prints a readable table and one JSON object (also written to --json). Accuracy runs use the
CIFAR-10 folder named by S9_DATA (python-batch format) and fall back to synthetic data,
which the output says. CUDA timings run only where a GPU is present.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.starting_net import StartingNet  # noqa: E402
from benchmarks.variants import (  # noqa: E402
    HighResolutionNet, MixedKernelNet, ShallowSeparableNet, UnnormalisedWhitenedNet, WhitenedNet,
    WideSeparableNet,
)
from dataset import (  # noqa: E402
    CIFAR10Dataset, Splits, default_workers, eval_loader, load_splits, make_loaders,
)
from model import INPUT_SHAPE, Net, count_parameters  # noqa: E402
from transforms import eval_transforms, seed_transform, train_transforms  # noqa: E402
from utils import (  # noqa: E402
    TrainConfig, autocast, evaluate, fit, get_device, half_dtype, memory_format, seed_everything,
    train_step_seconds,
)

NETS = {
    "Net": Net, "StartingNet": StartingNet, "HighResolutionNet": HighResolutionNet,
    "MixedKernelNet": MixedKernelNet,
    "ShallowSeparableNet": ShallowSeparableNet, "WideSeparableNet": WideSeparableNet,
    "WhitenedNet": WhitenedNet, "UnnormalisedWhitenedNet": UnnormalisedWhitenedNet,
}
EPOCH_IMAGES = 50_000  # one epoch of full CIFAR-10


def build_net(name: str, train_images: np.ndarray) -> nn.Module:
    """A fresh `NETS[name]`; a net whose first weights come from data gets `train_images`."""
    model = NETS[name]()
    if hasattr(model, "init_from_data"):
        model.init_from_data(train_images)
    return model


def chosen_nets(requested: list[str] | None, quick: bool) -> list[str]:
    """The nets asked for; by default Net (quick mode) or Net and the net we started from."""
    return requested or (["Net"] if quick else ["Net", "StartingNet"])


def multiply_adds(model: nn.Module) -> int:
    """Multiply-adds of one forward pass on one 3x32x32 image."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    return counter.get_total_flops() // 2


def cpu_train_throughput(
    model: nn.Module, batch_size: int, steps: int, warmup: int = 3, mixed_precision: bool = True
) -> float:
    """Steady-state training images/s on the CPU (forward, backward, SGD step), as `fit` trains."""
    seed_everything(0)
    cpu = torch.device("cpu")
    return batch_size / train_step_seconds(model, batch_size, cpu, steps, warmup, mixed_precision)


def layer_milliseconds(
    model: nn.Module, batch_size: int, steps: int, mixed_precision: bool = True
) -> list[dict]:
    """Milliseconds of forward and backward for each layer of `model`, timed alone on the CPU.

    Each leaf module that runs gets a random input laid out in memory as the one it reads in
    the model (shape, strides and dtype: a channel slice of a channels-last map is not itself
    channels-last, and conv kernels differ by layout), under the autocast `fit` trains with;
    the gradient of its input is computed except where it reads the images. A row holds the
    median of max(`steps`, 5) timed runs of one call, times the calls per forward pass.
    Timed alone a layer misses what runs between layers (shortcut additions,
    concatenations, functional activations, the loss, the optimizer) and reads its input
    from cold memory, so the sum is a guide to the step's time, not a part of it.
    """
    cpu = torch.device("cpu")
    model = copy.deepcopy(model).to(cpu, memory_format=memory_format(cpu)).train()
    images = torch.randn(batch_size, *INPUT_SHAPE).contiguous(memory_format=memory_format(cpu))
    layouts: dict[nn.Module, tuple] = {}
    calls: dict[nn.Module, int] = {}

    def record(module: nn.Module, args: tuple) -> None:
        x = args[0]
        storage = x.untyped_storage().nbytes() // x.element_size()
        layouts.setdefault(module, (x.shape, x.stride(), x.storage_offset(), storage, x.dtype,
                                    x is not images))
        calls[module] = calls.get(module, 0) + 1

    leaves = [(n, m) for n, m in model.named_modules() if not any(m.children())]
    handles = [m.register_forward_pre_hook(record) for _, m in leaves]
    with torch.no_grad(), autocast(cpu, mixed_precision):
        model(images)
    for handle in handles:
        handle.remove()
    rows = []
    for name, module in leaves:
        if module not in layouts:
            continue
        shape, stride, offset, storage, dtype, needs_grad = layouts[module]
        source = torch.randn(storage, dtype=dtype).as_strided(shape, stride, offset)
        timings = []
        for _ in range(1 + max(steps, 5)):  # the first run allocates, picks kernels: not counted
            module.zero_grad(set_to_none=True)
            x = source.detach().requires_grad_(needs_grad)
            if getattr(module, "inplace", False):
                x = x.clone()  # an in-place layer may not write a leaf; its input is dense
            start = time.perf_counter()
            with autocast(cpu, mixed_precision):
                y = module(x)
            if y.requires_grad:  # not where a frozen layer reads the images
                y.backward(torch.ones_like(y))
            timings.append(time.perf_counter() - start)
        rows.append({"layer": name, "module": _describe(module), "input": list(shape[1:]),
                     "calls": calls[module],
                     "ms": round(1e3 * statistics.median(timings[1:]) * calls[module], 1)})
    return rows


def _describe(module: nn.Module) -> str:
    """A layer's class and, for a conv, what sets its cost (channels, kernel, dilation, groups)."""
    if not isinstance(module, nn.Conv2d):
        return type(module).__name__
    text = f"Conv2d {module.in_channels}->{module.out_channels} {module.kernel_size[0]}x{module.kernel_size[1]}"
    for label, value, plain in (("stride", module.stride[0], 1), ("dilation", module.dilation[0], 1),
                                ("groups", module.groups, 1)):
        if value != plain:
            text += f" {label} {value}"
    return text


def augmentation_throughput(images: np.ndarray, count: int) -> float:
    """Images/s of one process running `train_transforms` (what one loader worker does)."""
    transform = train_transforms()
    seed_transform(transform, 0)
    for image in images[:50]:
        transform(image=image)
    start = time.perf_counter()
    for i in range(count):
        transform(image=images[i % len(images)])
    return count / (time.perf_counter() - start)


def loader_epoch_seconds(
    train: tuple, batch_size: int, workers: int, augment: dict, epochs: int = 2
) -> list[float]:
    """Seconds to draw each of `epochs` training epochs from the train loader alone.

    The images are repeated or cut to 50,000, as in the CUDA timing, and augmented with the
    run's `train_transforms(**augment)`. No model runs, so on this machine, with these workers
    and this augmentation, no device trains faster: a GPU that waits for its batches is held
    to this (the README's Speed notes).
    """
    images, labels = _full_epoch(train)
    loader, _ = make_loaders(
        CIFAR10Dataset(images, labels, train_transforms(**augment)),
        # make_loaders also builds a test loader, which is never drawn from here
        CIFAR10Dataset(images[:batch_size], labels[:batch_size], eval_transforms()),
        batch_size=batch_size,
        workers=workers,
    )
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        for _ in loader:
            pass
        seconds.append(time.perf_counter() - start)
    return seconds


def _full_epoch(train: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The (images, labels) of `train`, repeated or cut to one 50,000-image epoch."""
    repeats = -(-EPOCH_IMAGES // len(train[1]))
    return (np.concatenate([train[0]] * repeats)[:EPOCH_IMAGES],
            np.concatenate([train[1]] * repeats)[:EPOCH_IMAGES])


def accuracy_run(
    net_name: str,
    data: Splits,
    config: TrainConfig,
    augment: dict,
    workers: int,
    device: torch.device,
    progress: bool = False,
    checkpoint_dir: Path | None = None,
) -> dict:
    """Train a fresh net with `config` on `device`; validation and test accuracy per epoch.

    Validation (when `data` holds a split) and test are each scored only if present: a tuning
    run passes data without test images, so the test set is never looked at while tuning.
    With `checkpoint_dir`, the run checkpoints every epoch into its own subfolder and continues
    from there when run again, so a long run survives an interruption.
    """
    seed_everything(config.seed)
    model = build_net(net_name, data.train_images)
    train_loader, test_loader = make_loaders(
        CIFAR10Dataset(data.train_images, data.train_labels, train_transforms(**augment)),
        CIFAR10Dataset(data.test_images, data.test_labels, eval_transforms()),
        batch_size=config.batch_size,
        workers=workers,
        seed=config.seed,
    )
    val_loader = (scoring_loader(data.val_images, data.val_labels, config.batch_size, workers)
                  if len(data.val_labels) else None)
    folder = _run_folder(checkpoint_dir, net_name, config, augment, data) if checkpoint_dir else None
    resumed = folder is not None and (folder / "last.pt").exists()
    start = time.perf_counter()
    history = fit(model, train_loader, test_loader if len(data.test_labels) else None,
                  config=config, device=device, progress=progress, val_loader=val_loader,
                  checkpoint_dir=folder, resume=folder is not None)
    default = dataclasses.replace(TrainConfig(), epochs=config.epochs, seed=config.seed)
    run = {
        "net": net_name,
        "device": str(device),
        "seed": config.seed,
        "epochs": config.epochs,
        "recipe": _changed(default, config),
        "config": dataclasses.asdict(config),  # in full: "recipe" is relative to changing defaults
        "augment": augment,
        "train_images": len(data.train_labels),
        "val_images": len(data.val_labels),
        "test_images": len(data.test_labels),
        "resumed": resumed,
        # This process only; train_seconds sums every epoch, also those before a resume.
        "wall_seconds": round(time.perf_counter() - start, 1),
        "train_seconds": round(sum(history.seconds), 1),
        "epoch_seconds": round(float(np.median(history.seconds)), 1),
        # Running mean over the last epoch's augmented batches, so below a clean-image score.
        "final_train_acc": round(history.train_acc[-1], 2),
    }
    for split in ("val", "test", "ema_val", "ema_test"):
        accuracies = getattr(history, f"{split}_acc")
        if accuracies:
            run[f"final_{split}_acc"] = round(accuracies[-1], 2)
            run[f"best_{split}_acc"] = round(max(accuracies), 2)
            run[f"{split}_acc_per_epoch"] = [round(a, 2) for a in accuracies]
    if history.test_acc:
        run["first_epoch_test_85"] = history.first_epoch_reaching(85.0)
    # Test-time flip costs two forward passes and the per-epoch scores do not use it: kept apart.
    for split, loader in (("val", val_loader), ("test", test_loader)):
        if f"final_{split}_acc" in run:
            flipped = evaluate(model, loader, device, config.mixed_precision, flip=True)[1]
            run[f"final_{split}_acc_flip"] = round(flipped, 2)
    # Beside validation accuracy, this says whether the net fits its training images much
    # better than unseen ones (a wide gap) or fits neither well (underfitting).
    clean_train = scoring_loader(data.train_images, data.train_labels, config.batch_size, workers)
    clean = evaluate(model, clean_train, device, config.mixed_precision)[1]
    run["final_clean_train_acc"] = round(clean, 2)
    return run


def scoring_loader(
    images: np.ndarray, labels: np.ndarray, batch_size: int, workers: int
) -> DataLoader:
    """An ordered, un-augmented loader over `images`, batched as `fit` scores them."""
    return eval_loader(CIFAR10Dataset(images, labels, eval_transforms()), batch_size, workers)


# Folder names record how a run departs from this recipe: TrainConfig's defaults before the
# moving average's warm-up was turned on, every field written out so that a changed default
# neither renames an earlier run's folder nor hands a new run an earlier run's folder.
_FOLDER_NAME_BASE = TrainConfig(
    epochs=60, batch_size=256, max_lr=0.4, warmup_fraction=0.2, div_factor=10.0,
    final_div_factor=100.0, anneal="linear", optimizer="sgd", momentum=0.9, nesterov=True,
    weight_decay=5e-4, label_smoothing=0.1, ema_decay=0.998, ema_warmup=False, seed=0,
    mixed_precision=True, log_every=20,
)


def _run_folder(
    checkpoint_dir: Path, net_name: str, config: TrainConfig, augment: dict, data: Splits
) -> Path:
    """The checkpoint subfolder of one run, named by everything that defines it.

    `fit` refuses a checkpoint of another TrainConfig or augmentation, but not of other data of
    the same size: a folder per run definition keeps one sweep row from resuming another's weights.
    """
    spec = {
        "config": _changed(_FOLDER_NAME_BASE, config),  # a new field at its default keeps the name
        "augment": augment,
        "data": data.source,
        "images": [len(data.train_labels), len(data.val_labels), len(data.test_labels)],
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return checkpoint_dir / f"{net_name}-seed{config.seed}-{digest}"


def _changed(default: object, current: object) -> dict:
    """The fields of a dataclass that differ from its default: how a run departs from the recipe."""
    return {k: v for k, v in dataclasses.asdict(current).items() if getattr(default, k) != v}


def _overrides(pairs: list[str], types: dict[str, type], what: str) -> dict:
    """Parse `name=value` pairs, typed by the named setting's default; exit naming a bad one."""
    result = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in types:
            raise SystemExit(
                f"--{what} {pair!r}: expected name=value with name one of {', '.join(types)}"
            )
        try:
            result[name] = _typed(value, types[name])
        except ValueError:
            raise SystemExit(
                f"--{what} {pair!r}: {value!r} is not a {types[name].__name__}"
            ) from None
    return result


def _typed(value: str, kind: type) -> object:
    """`value` as a `kind`; booleans must be spelled true/false (or 1/0)."""
    if kind is bool:
        words = {"true": True, "1": True, "false": False, "0": False}
        if value.lower() not in words:
            raise ValueError(value)
        return words[value.lower()]
    return kind(value)


def cuda_epoch_seconds(
    train: tuple, net_name: str, batch_size: int, mixed_precision: bool, workers: int,
    augment: dict,
) -> dict:
    """Steady-state seconds for one 50,000-image epoch on CUDA, augmenting in loader workers."""
    images, labels = _full_epoch(train)
    config = dataclasses.replace(TrainConfig(), epochs=3, batch_size=batch_size,
                                 mixed_precision=mixed_precision, log_every=50)
    seed_everything(0)
    train_loader, test_loader = make_loaders(
        CIFAR10Dataset(images, labels, train_transforms(**augment)),
        CIFAR10Dataset(images[:config.batch_size], labels[:config.batch_size], eval_transforms()),
        batch_size=config.batch_size,
        workers=workers,
    )
    torch.cuda.reset_peak_memory_stats()
    model = build_net(net_name, train[0])
    history = fit(model, train_loader, test_loader, config=config, device="cuda", progress=False)
    return {
        "net": net_name,
        "batch_size": batch_size,
        "mixed_precision": mixed_precision,
        "loader_workers": workers,
        "epoch_seconds": [round(s, 2) for s in history.seconds],
        "steady_epoch_seconds": round(min(history.seconds[1:]), 2),
        "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    }


def _parser() -> argparse.ArgumentParser:
    """The command line: what to run, on what data, with which recipe."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a one-to-two-minute smoke run")
    parser.add_argument("--data", default=os.environ.get("S9_DATA"),
                        help="folder holding cifar-10-batches-py/ (default: $S9_DATA; none: synthetic)")
    parser.add_argument("--validation", type=int, default=0,
                        help="hold this many training images out and score them every epoch")
    parser.add_argument("--no-test", action="store_true",
                        help="never score the test set (tuning runs: decide on validation)")
    parser.add_argument("--nets", nargs="+", choices=list(NETS), default=None,
                        help="nets to time and train (default: Net and StartingNet; --quick: Net)")
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs,
                        help="epochs of the accuracy runs (default: the recipe's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds of the accuracy runs, one run per net and seed (default: 0)")
    parser.add_argument("--recipe", nargs="+", default=[], metavar="NAME=VALUE",
                        help="TrainConfig fields to change, e.g. max_lr=0.4 label_smoothing=0.2")
    parser.add_argument("--augment", nargs="+", default=[], metavar="NAME=VALUE",
                        help="train_transforms arguments to change, e.g. rotate=5 cutout_p=0.3")
    parser.add_argument("--workers", type=int, default=None, help="loader workers")
    parser.add_argument("--device", default=None,
                        help="device of the accuracy runs (default: CUDA, then MPS, then the CPU)")
    parser.add_argument("--progress", action="store_true", help="progress bars and a line per epoch")
    parser.add_argument("--checkpoint-dir", type=Path,
                        help="checkpoint every epoch under this folder, and resume from it")
    parser.add_argument("--layers", action="store_true",
                        help="also time each layer of each net alone on the CPU (where a step's time goes)")
    parser.add_argument("--json", type=Path, help="also write the JSON object here")
    return parser


def _load_data(folder: str | None, limits: tuple[int, int] | None, validation: int,
               no_test: bool) -> Splits:
    """The run's splits; a folder that was named but holds no CIFAR-10 stops the run."""
    try:
        data = load_splits(folder, limit=limits, synthetic_fallback=folder is None,
                           validation=validation)
    except FileNotFoundError as error:
        raise SystemExit(f"{error}\nbench.py: give --data (or S9_DATA) a folder holding "
                         "cifar-10-batches-py/, or neither of them for synthetic images.")
    if no_test:
        data.test_images, data.test_labels = data.test_images[:0], data.test_labels[:0]
    return data


def net_costs(
    model: nn.Module, batch_size: int, steps: int, mixed_precision: bool, layers: bool = False
) -> dict:
    """Parameters, multiply-adds and CPU training speed of a net; per layer too if `layers`."""
    images_per_s = cpu_train_throughput(model, batch_size, steps, mixed_precision=mixed_precision)
    costs = {
        "parameters": count_parameters(model),
        "multiply_adds": multiply_adds(model),
        "cpu_train_images_per_s": round(images_per_s),
    }
    if layers:
        costs["cpu_train_step_ms"] = round(1e3 * batch_size / images_per_s, 1)
        costs["cpu_layer_ms"] = layer_milliseconds(model, batch_size, steps, mixed_precision)
    return costs


def main() -> None:
    """Run the benchmark and print the table and the JSON object."""
    args = _parser().parse_args()
    workers = default_workers(args.workers)
    steps, aug_count, epochs = (3, 500, 2) if args.quick else (20, 5000, args.epochs)
    limits = (512, 256) if args.quick else None
    data = _load_data(args.data, limits, args.validation, args.no_test)
    defaults = TrainConfig()
    # epochs and seed have their own options (--epochs, --seeds), so they are not recipe fields
    fields = {f.name: type(getattr(defaults, f.name)) for f in dataclasses.fields(defaults)
              if f.name not in ("epochs", "seed")}
    recipe = _overrides(args.recipe, fields, "recipe")
    augment_fields = inspect.signature(train_transforms).parameters
    augment = _overrides(args.augment, {n: type(p.default) for n, p in augment_fields.items()}, "augment")
    nets = chosen_nets(args.nets, args.quick)
    device = torch.device(args.device) if args.device else get_device()
    mixed_precision = recipe.get("mixed_precision", defaults.mixed_precision)
    batch_size = recipe.get("batch_size", defaults.batch_size)

    result: dict = {
        "device": {
            "cpu": _cpu_name(),
            "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "accuracy_runs_on": str(device),
            "autocast": str(half_dtype(device)) if mixed_precision and half_dtype(device) else "off",
            "loader_workers": workers,
        },
        "commit": _commit(),
        "torch": torch.__version__,
        "mode": "quick" if args.quick else "full",
        "data": data.source,
        "command": " ".join(["python benchmarks/bench.py", *sys.argv[1:]]),
        "nets": {},
    }
    for name in nets:
        result["nets"][name] = net_costs(build_net(name, data.train_images), batch_size, steps,
                                         mixed_precision, args.layers)
    result["augmentation_images_per_s_one_worker"] = round(
        augmentation_throughput(data.train_images, aug_count)
    )
    result["loader_epoch_seconds"] = [
        round(seconds, 2)
        for seconds in loader_epoch_seconds(
            (data.train_images, data.train_labels), batch_size, workers, augment
        )
    ]
    result["accuracy"] = [
        accuracy_run(n, data, dataclasses.replace(defaults, epochs=epochs, seed=seed, **recipe),
                     augment, workers, device, args.progress, args.checkpoint_dir)
        for n in nets
        for seed in args.seeds
    ]
    if torch.cuda.is_available():
        train = (data.train_images, data.train_labels)
        result["cuda"] = [cuda_epoch_seconds(train, name, batch_size, amp, workers, augment)
                          for name in nets for amp in (True, False)]
    else:
        result["cuda"] = "skipped: no CUDA device"

    print(table(result))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


def _cpu_name() -> str:
    """The CPU's model name (Linux's cpuinfo), or the architecture where that is unavailable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    """The git commit the benchmark ran at, with '+changes' when the tree differs from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def seed_cell(runs: list[dict], key: str, spec: str) -> str:
    """One value per seed, then their mean when there are several; '-' when there are none."""
    values = [run.get(key) for run in runs if key in run]
    if not values:
        return "-"
    text = " / ".join("never" if value is None else format(value, spec) for value in values)
    numbers = [value for value in values if value is not None]
    if len(values) == 1 or len(numbers) != len(values):
        return text
    return f"{text} (mean {sum(numbers) / len(numbers):{spec or '.1f'}})"


def table(result: dict) -> str:
    """The headline numbers as a Markdown table, one column per net."""
    nets = result["nets"]
    runs = {n: [run for run in result["accuracy"] if run["net"] == n] for n in nets}
    rows = [
        ("parameters", lambda n: f"{nets[n]['parameters']:,}"),
        ("multiply-adds / image", lambda n: f"{nets[n]['multiply_adds'] / 1e6:.2f} M"),
        ("CPU training images/s", lambda n: f"{nets[n]['cpu_train_images_per_s']:,}"),
        ("val acc, final (%)", lambda n: seed_cell(runs[n], "final_val_acc", ".2f")),
        ("test acc, final (%)", lambda n: seed_cell(runs[n], "final_test_acc", ".2f")),
        ("test acc, best epoch (%)", lambda n: seed_cell(runs[n], "best_test_acc", ".2f")),
        ("val acc, final, moving average of weights (%)",
         lambda n: seed_cell(runs[n], "final_ema_val_acc", ".2f")),
        ("test acc, final, moving average of weights (%)",
         lambda n: seed_cell(runs[n], "final_ema_test_acc", ".2f")),
        ("val acc, final, test-time flip (%)", lambda n: seed_cell(runs[n], "final_val_acc_flip", ".2f")),
        ("test acc, final, test-time flip (%)", lambda n: seed_cell(runs[n], "final_test_acc_flip", ".2f")),
        ("training acc, final weights, un-augmented (%)",
         lambda n: seed_cell(runs[n], "final_clean_train_acc", ".2f")),
        ("first epoch with test acc >= 85%", lambda n: seed_cell(runs[n], "first_epoch_test_85", "")),
        ("seconds per epoch (median)", lambda n: seed_cell(runs[n], "epoch_seconds", ".0f")),
        ("accuracy run wall time (s)", lambda n: seed_cell(runs[n], "wall_seconds", ".0f")),
    ]
    lines = ["| metric | " + " | ".join(nets) + " |", "| --- |" + " --- |" * len(nets)]
    lines += [f"| {label} | " + " | ".join(cell(n) for n in nets) + " |" for label, cell in rows]
    run = result["accuracy"][0]
    seeds = ", ".join(str(seed) for seed in sorted({r["seed"] for r in result["accuracy"]}))
    changes = {**run.get("recipe", {}), **run.get("augment", {})}
    lines.append(
        f"\naccuracy: {run['epochs']} epochs, {run['train_images']:,} train / "
        f"{run.get('val_images', 0):,} validation / {run['test_images']:,} test images from "
        f"{result['data']}, seeds {seeds}, on {run.get('device', 'cpu')}; "
        + (f"changed from the defaults: {changes}" if changes else "default recipe")
    )
    lines.append(f"augmentation, one worker: {result['augmentation_images_per_s_one_worker']:,} images/s")
    if "loader_epoch_seconds" in result:
        lines.append(
            f"the train loader alone, {result['device']['loader_workers']} workers, no model: "
            f"{' and '.join(map(str, result['loader_epoch_seconds']))} s per training epoch "
            "(the training images repeated or cut to 50,000)"
        )
    for name, entry in nets.items():
        if "cpu_layer_ms" in entry:
            lines += layer_lines(name, entry)
    if isinstance(result["cuda"], list):
        for run in result["cuda"]:
            precision = "mixed precision" if run["mixed_precision"] else "float32"
            lines.append(
                f"CUDA ({result['device']['cuda']}), {run['net']}, batch {run['batch_size']}, "
                f"50,000-image epoch, {precision}: "
                f"{run['steady_epoch_seconds']} s, peak memory {run['peak_gpu_memory_mib']} MiB"
            )
    else:
        lines.append(f"CUDA: {result['cuda']}")
    return "\n".join(lines)


def layer_lines(name: str, entry: dict, shown: int = 8) -> list[str]:
    """The slowest layers of one net's CPU training step, each against the whole step."""
    step = entry["cpu_train_step_ms"]
    layers = sorted(entry["cpu_layer_ms"], key=lambda row: row["ms"], reverse=True)
    lines = [f"{name}'s layers, each timed alone on the CPU (forward and backward), against its "
             f"{step:,.0f} ms training step:"]
    lines += [f"  {row['ms']:8,.1f} ms {row['ms'] / step:6.1%}  {row['layer']}: {row['module']} "
              f"on {'x'.join(map(str, row['input']))}" for row in layers[:shown]]
    if len(layers) > shown:
        rest = sum(row["ms"] for row in layers[shown:])
        lines.append(f"  {rest:8,.1f} ms {rest / step:6.1%}  the other {len(layers) - shown} layers")
    total = sum(row["ms"] for row in layers)
    lines.append(f"  {total:8,.1f} ms {total / step:6.1%}  all {len(layers)} layers, timed alone")
    return lines


if __name__ == "__main__":
    main()
