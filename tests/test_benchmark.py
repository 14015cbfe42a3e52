"""The benchmark's cost measures are right, and Net is cheaper than the net we started from."""

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.baseline import BaselineNet
from benchmarks.bench import _overrides, accuracy_run, multiply_adds, seed_cell, table
from benchmarks.score import score
from benchmarks.variants import DeepNet
from dataset import BATCH_FOLDER, CIFAR10Dataset, eval_loader, load_splits, synthetic_cifar10
from model import Net, check_brief, count_parameters
from transforms import test_transforms as eval_transforms
import utils
from utils import TrainConfig, evaluate, seed_everything

STARTING_NET_MACS = 36_700_000


def test_multiply_adds_of_one_conv_match_the_hand_count() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert multiply_adds(conv) == 3 * 8 * 9 * 32 * 32


def test_net_costs_fewer_multiply_adds_than_the_starting_net() -> None:
    ours, theirs = multiply_adds(Net()), multiply_adds(BaselineNet())
    assert ours < theirs <= STARTING_NET_MACS
    assert count_parameters(Net()) < 200_000


def test_the_rebuilt_starting_net_matches_its_description() -> None:
    net = BaselineNet()
    assert all(row.passed for row in check_brief(net))
    widths = {m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)}
    assert widths == {44}
    assert isinstance(net.head[-1], nn.Linear)


def test_table_puts_both_nets_side_by_side() -> None:
    result = {
        "nets": {
            "Net": {"parameters": 194410, "multiply_adds": 32_564_480, "cpu_train_images_per_s": 802},
            "BaselineNet": {"parameters": 179266, "multiply_adds": 36_659_832, "cpu_train_images_per_s": 690},
        },
        "accuracy": [
            {"net": "Net", "seed": 0, "epochs": 30, "train_images": 4153, "test_images": 1017,
             "final_test_acc": 72.07, "best_test_acc": 72.07, "wall_seconds": 188.0},
        ],
        "data": "a sample",
        "augmentation_images_per_s_one_worker": 11184,
        "device": {"cuda": None},
        "cuda": "skipped: no CUDA device",
    }
    lines = table(result).splitlines()
    assert lines[0] == "| metric | Net | BaselineNet |"
    assert "| multiply-adds / image | 32.56 M | 36.66 M |" in lines
    assert "| test acc, final (%) | 72.07 | - |" in lines
    assert "augmentation, one worker: 11,184 images/s" in lines


def test_seed_cell_lists_each_seed_then_the_mean() -> None:
    runs = [{"acc": 72.07}, {"acc": 70.70}, {"acc": 72.17}]
    assert seed_cell(runs, "acc", ".2f") == "72.07 / 70.70 / 72.17 (mean 71.65)"
    assert seed_cell(runs[:1], "acc", ".2f") == "72.07"
    assert seed_cell([], "acc", ".2f") == "-"


def test_the_deeper_candidate_meets_the_brief_too() -> None:
    assert all(row.passed for row in check_brief(DeepNet()))
    assert multiply_adds(DeepNet()) > multiply_adds(Net())


def test_sweep_options_are_typed_and_refuse_what_they_cannot_mean() -> None:
    types = {"max_lr": float, "nesterov": bool, "batch_size": int}
    assert _overrides(["max_lr=0.4", "nesterov=false", "batch_size=256"], types, "recipe") == {
        "max_lr": 0.4, "nesterov": False, "batch_size": 256
    }
    with pytest.raises(SystemExit, match="'flase' is not a bool"):
        _overrides(["nesterov=flase"], types, "recipe")
    with pytest.raises(SystemExit, match="name one of max_lr, nesterov, batch_size"):
        _overrides(["epochs=3"], types, "recipe")


def test_score_reports_the_saved_weights_on_test_and_training_images(tmp_path: Path) -> None:
    images, labels = synthetic_cifar10(30, seed=1)
    for name, part in (("data_batch_1", slice(0, 20)), ("test_batch", slice(20, 30))):
        batch = {"data": images[part].transpose(0, 3, 1, 2).reshape(-1, 3072),
                 "labels": labels[part].tolist()}
        (tmp_path / BATCH_FOLDER).mkdir(exist_ok=True)
        (tmp_path / BATCH_FOLDER / name).write_bytes(pickle.dumps(batch))
    seed_everything(0)
    model = Net().eval()
    torch.save({"model": model.state_dict()}, tmp_path / "best.pt")

    result = score(tmp_path / "best.pt", str(tmp_path), workers=0)

    def accuracy(part: slice, flip: bool = False) -> float:
        loader = eval_loader(CIFAR10Dataset(images[part], labels[part], eval_transforms()), 8, 0)
        return round(evaluate(model, loader, "cpu", flip=flip)[1], 2)

    assert (result["test_images"], result["train_images"]) == (10, 20)
    assert result["test_acc"] == accuracy(slice(20, 30))
    assert result["test_acc_flip"] == accuracy(slice(20, 30), flip=True)
    assert result["clean_train_acc"] == accuracy(slice(0, 20))


def test_an_interrupted_benchmark_run_continues_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = load_splits(None, limit=(64, 32), synthetic_fallback=True)
    config = TrainConfig(batch_size=32, max_lr=0.05, epochs=2)
    cpu = torch.device("cpu")
    uninterrupted = accuracy_run("Net", data, config, {}, 0, cpu)

    run_epoch = utils._run_epoch

    def stop_in_epoch_2(*args, **kwargs) -> None:
        if args[5] == 2:  # the epoch argument
            raise KeyboardInterrupt
        run_epoch(*args, **kwargs)

    monkeypatch.setattr(utils, "_run_epoch", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        accuracy_run("Net", data, config, {}, 0, cpu, checkpoint_dir=tmp_path)
    epochs_run: list[int] = []

    def record_epoch(*args, **kwargs) -> None:
        epochs_run.append(args[5])
        run_epoch(*args, **kwargs)

    monkeypatch.setattr(utils, "_run_epoch", record_epoch)
    resumed = accuracy_run("Net", data, config, {}, 0, cpu, checkpoint_dir=tmp_path)

    assert epochs_run == [2]  # epoch 1 came from the checkpoint
    assert resumed["test_acc_per_epoch"] == uninterrupted["test_acc_per_epoch"]
    assert resumed["final_clean_train_acc"] == uninterrupted["final_clean_train_acc"]
