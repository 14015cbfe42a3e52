"""Cost, speed and accuracy of `Net` beside the all-44-channel net we started from.

    python benchmarks/bench.py --seeds 0 1 2   # the README numbers, ~20 min on 2 CPU cores
    python benchmarks/bench.py --quick         # a smoke run of a minute or two (CI)

Prints a readable table and one JSON object (also written to --json). Accuracy runs use the
CIFAR-10 folder named by S9_DATA (python-batch format) and fall back to synthetic data,
which the output says. CUDA timings run only where a GPU is present.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.baseline import BaselineNet  # noqa: E402
from dataset import CIFAR10Dataset, load_splits, make_loaders  # noqa: E402
from model import Net, count_parameters  # noqa: E402
from transforms import seed_transform, test_transforms, train_transforms  # noqa: E402
from utils import TrainConfig, fit, seed_everything  # noqa: E402

NETS = {"Net": Net, "BaselineNet": BaselineNet}
EPOCH_IMAGES = 50_000  # one epoch of full CIFAR-10


def multiply_adds(model: nn.Module) -> int:
    """Multiply-adds of one forward pass on one 3x32x32 image."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    return counter.get_total_flops() // 2


def cpu_train_throughput(model: nn.Module, batch_size: int, steps: int, warmup: int = 3) -> float:
    """Steady-state training images/s on the CPU (forward, backward, SGD step), float32."""
    seed_everything(0)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    images = torch.randn(batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (batch_size,))
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return batch_size * steps / (time.perf_counter() - start)


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


def accuracy_run(
    net_name: str, train: tuple, test: tuple, epochs: int, workers: int, seed: int = 0
) -> dict:
    """Train a fresh net with the default recipe and `seed` on the CPU; the per-epoch curve."""
    config = dataclasses.replace(TrainConfig(), seed=seed)
    seed_everything(config.seed)
    model = NETS[net_name]()
    train_loader, test_loader = make_loaders(
        CIFAR10Dataset(*train, train_transforms()),
        CIFAR10Dataset(*test, test_transforms()),
        batch_size=config.batch_size,
        workers=workers,
        seed=config.seed,
    )
    start = time.perf_counter()
    history = fit(model, train_loader, test_loader, epochs=epochs, device="cpu", config=config,
                  progress=False)
    return {
        "net": net_name,
        "seed": seed,
        "epochs": epochs,
        "train_images": len(train[1]),
        "test_images": len(test[1]),
        "final_test_acc": round(history.test_acc[-1], 2),
        "best_test_acc": round(history.best_test_acc, 2),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "test_acc_per_epoch": [round(a, 2) for a in history.test_acc],
    }


def cuda_epoch_seconds(train: tuple, mixed_precision: bool, workers: int) -> dict:
    """Steady-state seconds for one 50,000-image epoch on CUDA, augmenting in loader workers."""
    repeats = -(-EPOCH_IMAGES // len(train[1]))
    images = np.concatenate([train[0]] * repeats)[:EPOCH_IMAGES]
    labels = np.concatenate([train[1]] * repeats)[:EPOCH_IMAGES]
    config = dataclasses.replace(TrainConfig(), mixed_precision=mixed_precision, log_every=50)
    seed_everything(0)
    train_loader, test_loader = make_loaders(
        CIFAR10Dataset(images, labels, train_transforms()),
        CIFAR10Dataset(images[:config.batch_size], labels[:config.batch_size], test_transforms()),
        batch_size=config.batch_size,
        workers=workers,
    )
    torch.cuda.reset_peak_memory_stats()
    history = fit(Net(), train_loader, test_loader, epochs=3, device="cuda", config=config,
                  progress=False)
    return {
        "mixed_precision": mixed_precision,
        "loader_workers": workers,
        "epoch_seconds": [round(s, 2) for s in history.seconds],
        "steady_epoch_seconds": round(min(history.seconds[1:]), 2),
        "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    }


def main() -> None:
    """Run the benchmark and print the table and the JSON object."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a one-to-two-minute smoke run")
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs,
                        help="epochs of the accuracy runs (default: the recipe's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds of the accuracy runs, one run per net and seed (default: 0)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers")
    parser.add_argument("--json", type=Path, help="also write the JSON object here")
    args = parser.parse_args()

    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    steps, aug_count, epochs = (3, 500, 2) if args.quick else (20, 5000, args.epochs)
    limits = (512, 256) if args.quick else None
    data = load_splits(os.environ.get("S9_DATA"), limit=limits, synthetic_fallback=True)
    train, test = (data.train_images, data.train_labels), (data.test_images, data.test_labels)
    config = TrainConfig()

    result: dict = {
        "device": {"cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
                   "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "torch": torch.__version__,
        "mode": "quick" if args.quick else "full",
        "data": data.source,
        "nets": {},
    }
    for name, cls in NETS.items():
        model = cls()
        result["nets"][name] = {
            "parameters": count_parameters(model),
            "multiply_adds": multiply_adds(model),
            "cpu_train_images_per_s": round(cpu_train_throughput(model, config.batch_size, steps)),
        }
    result["augmentation_images_per_s_one_worker"] = round(augmentation_throughput(train[0], aug_count))
    accuracy_nets = ["Net"] if args.quick else list(NETS)
    result["accuracy"] = [
        accuracy_run(n, train, test, epochs, workers, seed) for n in accuracy_nets for seed in args.seeds
    ]
    if torch.cuda.is_available():
        result["cuda"] = [cuda_epoch_seconds(train, amp, workers) for amp in (True, False)]
    else:
        result["cuda"] = "skipped: no CUDA device"

    print(table(result))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


def seed_cell(runs: list[dict], key: str, spec: str) -> str:
    """One value per seed, then their mean when there are several; '-' when there are none."""
    values = [run[key] for run in runs]
    if not values:
        return "-"
    text = " / ".join(format(value, spec) for value in values)
    return text if len(values) == 1 else f"{text} (mean {sum(values) / len(values):{spec}})"


def table(result: dict) -> str:
    """The headline numbers as a Markdown table, Net beside the baseline."""
    nets = result["nets"]
    runs = {n: [run for run in result["accuracy"] if run["net"] == n] for n in nets}
    rows = [
        ("parameters", lambda n: f"{nets[n]['parameters']:,}"),
        ("multiply-adds / image", lambda n: f"{nets[n]['multiply_adds'] / 1e6:.2f} M"),
        ("CPU training images/s", lambda n: f"{nets[n]['cpu_train_images_per_s']:,}"),
        ("test acc, final (%)", lambda n: seed_cell(runs[n], "final_test_acc", ".2f")),
        ("test acc, best epoch (%)", lambda n: seed_cell(runs[n], "best_test_acc", ".2f")),
        ("accuracy run wall time (s)", lambda n: seed_cell(runs[n], "wall_seconds", ".0f")),
    ]
    lines = ["| metric | " + " | ".join(nets) + " |", "| --- |" + " --- |" * len(nets)]
    lines += [f"| {label} | " + " | ".join(cell(n) for n in nets) + " |" for label, cell in rows]
    run = result["accuracy"][0]
    seeds = ", ".join(str(seed) for seed in sorted({r["seed"] for r in result["accuracy"]}))
    lines.append(
        f"\naccuracy: {run['epochs']} epochs, {run['train_images']:,} train / "
        f"{run['test_images']:,} test images from {result['data']}, seeds {seeds}, CPU"
    )
    lines.append(f"augmentation, one worker: {result['augmentation_images_per_s_one_worker']:,} images/s")
    if isinstance(result["cuda"], list):
        for run in result["cuda"]:
            precision = "mixed precision" if run["mixed_precision"] else "float32"
            lines.append(
                f"CUDA ({result['device']['cuda']}), 50,000-image epoch, {precision}: "
                f"{run['steady_epoch_seconds']} s, peak memory {run['peak_gpu_memory_mib']} MiB"
            )
    else:
        lines.append(f"CUDA: {result['cuda']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
