"""Score a checkpoint written by `fit`: test accuracy, with test-time flip, and on its training set.

    python benchmarks/score.py checkpoints/last.pt --data data/cifar10-full
    python benchmarks/score.py runs/best.pt --data data/cifar10-full --validation 5000

Scores the weights as saved, without training: plain test accuracy (what the notebook
reports), test accuracy with test-time flip (the mean logits of each image and its mirror:
two forward passes, and the notebook's scores do not use it, so it is reported apart), and
accuracy on the un-augmented training images. Set beside test accuracy, the last says whether
the net fits its training images much better than unseen ones (a wide gap) or fits neither
well (low training accuracy: underfitting). A checkpoint of a validation run (`best.pt`, or
any run of `bench.py --validation N`) needs the same `--validation N`, so that its
training images are the ones it trained on; it then also scores the validation split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench import NETS, scoring_loader  # noqa: E402
from dataset import load_splits  # noqa: E402
from utils import (  # noqa: E402
    TrainConfig, checkpoint_data, evaluate, get_device, load_weights, memory_format
)


def score(
    checkpoint: Path,
    data_dir: str,
    net: str = "Net",
    workers: int = 2,
    device: torch.device | None = None,
    validation: int = 0,
) -> dict:
    """Accuracies (percent) of the checkpoint's weights on the test and training images."""
    data = load_splits(data_dir, validation=validation)
    device = device or get_device()
    model = load_weights(NETS[net](), checkpoint).to(device, memory_format=memory_format(device))
    trained_on = checkpoint_data(checkpoint)
    if trained_on.get("train_images", len(data.train_labels)) != len(data.train_labels):
        raise ValueError(
            f"{checkpoint} was trained on {trained_on['train_images']:,} images, but these splits "
            f"hold {len(data.train_labels):,} training images: pass the run's validation size "
            "(score.py --validation N), so that training accuracy is measured on the images it "
            "trained on."
        )
    batch_size = TrainConfig().batch_size
    test = scoring_loader(data.test_images, data.test_labels, batch_size, workers)
    train = scoring_loader(data.train_images, data.train_labels, batch_size, workers)
    held_out = {}
    if validation:
        val = scoring_loader(data.val_images, data.val_labels, batch_size, workers)
        held_out = {"val_images": len(data.val_labels),
                    "val_acc": round(evaluate(model, val, device)[1], 2)}
    return {
        "checkpoint": str(checkpoint),
        "net": net,
        "device": str(device),
        "data": data.source,
        "test_images": len(data.test_labels),
        "train_images": len(data.train_labels),
        "test_acc": round(evaluate(model, test, device)[1], 2),
        "test_acc_flip": round(evaluate(model, test, device, flip=True)[1], 2),
        "clean_train_acc": round(evaluate(model, train, device)[1], 2),
        **held_out,
    }


def main() -> None:
    """Score the checkpoint named on the command line; print (and optionally write) JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="a last.pt or best.pt written by fit")
    parser.add_argument("--data", default=os.environ.get("S9_DATA"),
                        help="folder holding cifar-10-batches-py/ (default: $S9_DATA)")
    parser.add_argument("--net", choices=list(NETS), default="Net", help="the checkpoint's network")
    parser.add_argument("--validation", type=int, default=0,
                        help="the run's held-out validation images (bench.py --validation N)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers")
    parser.add_argument("--device", default=None, help="default: CUDA, then MPS, then the CPU")
    parser.add_argument("--json", type=Path, help="also write the JSON object here")
    args = parser.parse_args()
    if args.data is None:
        raise SystemExit("no data folder: pass --data DIR (or set S9_DATA) holding cifar-10-batches-py/")
    device = torch.device(args.device) if args.device else None
    result = score(args.checkpoint, args.data, args.net, args.workers, device, args.validation)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
