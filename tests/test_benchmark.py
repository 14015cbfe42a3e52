"""The benchmark's cost measures are right, and Net is cheaper than the net we started from."""

import hashlib
import inspect
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import benchmarks.bench
import benchmarks.score
import utils
from benchmarks.starting_net import StartingNet
from benchmarks.bench import (
    _overrides, _run_folder, accuracy_run, build_net, chosen_nets, cuda_epoch_seconds,
    layer_lines, layer_milliseconds, loader_epoch_seconds, multiply_adds, seed_cell, table,
)
from benchmarks.score import score
from benchmarks.variants import (
    HighResolutionNet, MixedKernelBlock, MixedKernelNet, ShallowSeparableNet, WideSeparableNet,
    patch_components,
)
from dataset import BATCH_FOLDER, load_splits, synthetic_cifar10
from model import Net, check_brief, count_parameters, receptive_field
from transforms import normalize_images, train_transforms
from transforms import eval_transforms
from utils import History, TrainConfig, seed_everything

STARTING_NET_MACS = 36_700_000


def test_multiply_adds_of_one_conv_match_the_hand_count() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert multiply_adds(conv) == 3 * 8 * 9 * 32 * 32


def test_net_costs_about_the_starting_net_s_multiply_adds_and_the_shallow_net_fewer() -> None:
    shallow, theirs = multiply_adds(ShallowSeparableNet()), multiply_adds(StartingNet())
    assert shallow < theirs <= STARTING_NET_MACS < multiply_adds(Net()) < 1.1 * theirs
    assert count_parameters(Net()) < 200_000


def test_the_rebuilt_starting_net_matches_its_description() -> None:
    net = StartingNet()
    assert all(row.passed for row in check_brief(net))
    widths = {m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)}
    assert widths == {44}
    assert isinstance(net.head[-1], nn.Linear)


def test_table_puts_both_nets_side_by_side() -> None:
    result = {
        "nets": {
            "Net": {"parameters": 194410, "multiply_adds": 32_564_480, "cpu_train_images_per_s": 802},
            "StartingNet": {"parameters": 179266, "multiply_adds": 36_659_832, "cpu_train_images_per_s": 690},
        },
        "accuracy": [
            {"net": "Net", "seed": 0, "epochs": 30, "train_images": 4153, "test_images": 1017,
             "final_test_acc": 72.07, "best_test_acc": 72.07, "wall_seconds": 188.0,
             "final_ema_test_acc": 71.5, "final_test_acc_flip": 73.01, "final_clean_train_acc": 80.25,
             "first_epoch_test_85": None},
        ],
        "data": "a sample",
        "augmentation_images_per_s_one_worker": 11184,
        "device": {"cuda": None},
        "cuda": "skipped: no CUDA device",
    }
    lines = table(result).splitlines()
    assert lines[0] == "| metric | Net | StartingNet |"
    assert "| multiply-adds / image | 32.56 M | 36.66 M |" in lines
    assert "| test acc, final (%) | 72.07 | - |" in lines
    assert "| test acc, final, moving average of weights (%) | 71.50 | - |" in lines
    assert "| test acc, final, test-time flip (%) | 73.01 | - |" in lines
    assert "| training acc, final weights, un-augmented (%) | 80.25 | - |" in lines
    assert "| first epoch with test acc >= 85% | never | - |" in lines
    assert "augmentation, one worker: 11,184 images/s" in lines
    assert "train loader alone" not in table(result)
    result["loader_epoch_seconds"], result["device"]["loader_workers"] = [4.24, 4.33], 2
    assert "the train loader alone, 2 workers, no model: 4.24 and 4.33 s" in table(result)


def test_seed_cell_lists_each_seed_then_the_mean() -> None:
    runs = [{"acc": 72.07}, {"acc": 70.70}, {"acc": 72.17}]
    assert seed_cell(runs, "acc", ".2f") == "72.07 / 70.70 / 72.17 (mean 71.65)"
    assert seed_cell(runs[:1], "acc", ".2f") == "72.07"
    assert seed_cell([], "acc", ".2f") == "-"


def test_the_high_resolution_candidate_meets_the_brief_with_twice_net_s_work() -> None:
    shallow, net, high = ShallowSeparableNet(), Net(), HighResolutionNet()
    assert all(row.passed for row in check_brief(shallow) + check_brief(net) + check_brief(high))
    assert [count_parameters(n) for n in (shallow, net, high)] == [194_410, 184_234, 198_122]
    assert [receptive_field(n) for n in (shallow, net, high)] == [51, 63, 73]
    assert multiply_adds(shallow) < multiply_adds(net) < multiply_adds(high) / 2


@pytest.mark.parametrize(
    "net, total",
    [(ShallowSeparableNet, 6715.061831973027), (Net, 7667.4059495847),
     (HighResolutionNet, 7665.036698440699)],
)
def test_a_seed_draws_the_initial_weights_the_recorded_runs_drew(net: type, total: float) -> None:
    # Pinned from `Net` at commits 1d7fc4d, c48c868 and 7f9ed43: their recorded benchmark
    # commands repeat those runs only if a seed still gives those exact weights.
    torch.manual_seed(0)
    assert sum(p.double().abs().sum().item() for p in net().parameters()) == pytest.approx(
        total, rel=1e-12
    )


def test_the_mixed_kernel_candidate_meets_the_brief_at_32x32_and_16x16_only() -> None:
    net = MixedKernelNet()
    rows = {row.rule: row for row in check_brief(net)}
    assert all(row.passed for row in rows.values())
    assert count_parameters(net) == 196_488
    assert receptive_field(net) == 185  # 3, + 20 for each of three blocks, + 2, + 40 for each of three
    assert "c1.1.depthwise" in rows["a depthwise-separable conv"].measured
    assert net.c4(net.c3(net.c2(net.c1(torch.zeros(1, 3, 32, 32))))).shape[-1] == 16


def test_a_mixed_kernel_block_keeps_its_shape_and_starts_as_its_input_plus_an_update() -> None:
    block = MixedKernelBlock(8).eval()
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        nn.init.zeros_(block.project.weight)
        nn.init.zeros_(block.project.bias)
        assert torch.equal(block(x), x)  # the shortcut's scale starts at 1
    with pytest.raises(ValueError, match="not a multiple of 4"):
        MixedKernelBlock(10)


def test_the_mixed_kernel_gate_stays_finite_in_16_bit_floats() -> None:
    # Large activations: tiniest's tanh(exp(a)) * a gate gives NaN gradients here (exp(a)
    # overflows, and 0 * inf = NaN in the backward pass); Mish(a) does not.
    torch.manual_seed(0)
    block = MixedKernelBlock(8).eval()
    x = (100 * torch.randn(2, 8, 8, 8)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    out.float().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_the_wider_candidate_meets_the_brief_and_is_wider_at_8x8() -> None:
    wide = WideSeparableNet()
    assert all(row.passed for row in check_brief(wide))
    assert count_parameters(wide) == 197_866
    assert wide.head[1].in_channels == 192
    assert Net().head[1].in_channels == 128
    assert multiply_adds(ShallowSeparableNet()) < multiply_adds(wide) < 1.01 * multiply_adds(ShallowSeparableNet())
    assert count_parameters(WideSeparableNet(width=193)) < 200_000 < count_parameters(WideSeparableNet(width=194))


def test_the_whitened_candidate_freezes_filters_that_decorrelate_patches() -> None:
    images = synthetic_cifar10(200, seed=0)[0]
    net = build_net("WhitenedNet", images)
    conv = net.c1[0][0]
    leading = conv.weight[:16]
    assert torch.equal(conv.weight[16:], -leading)
    assert torch.allclose(leading.flatten(1) @ leading.flatten(1).T, torch.eye(16), atol=1e-5)
    assert not conv.weight.requires_grad
    assert count_parameters(net) == count_parameters(Net()) - conv.weight.numel()
    assert all(row.passed for row in check_brief(net))
    # The filters' responses to every 3x3 patch (a conv without padding) are uncorrelated, and
    # their variances are the principal variances, largest first.
    with torch.no_grad():
        responses = nn.functional.conv2d(normalize_images(images), leading)
    covariance = torch.cov(responses.transpose(0, 1).reshape(16, -1))
    variances = patch_components(images)[0][:16]
    assert torch.allclose(covariance.diagonal(), variances, rtol=1e-3)
    assert torch.all(variances[:-1] >= variances[1:])
    off_diagonal = covariance - torch.diag(covariance.diagonal())
    assert off_diagonal.abs().max() < 1e-3 * variances[0]


def test_the_unnormalised_whitened_candidate_scales_its_filters_to_unit_response() -> None:
    images = synthetic_cifar10(200, seed=0)[0]
    net = build_net("UnnormalisedWhitenedNet", images)
    first = net.c1[0]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in first.modules())
    assert not first[0].weight.requires_grad and first[0].bias.requires_grad
    assert not first[0].bias.any()
    assert all(row.passed for row in check_brief(net))
    with torch.no_grad():
        responses = nn.functional.conv2d(normalize_images(images), first[0].weight)  # no padding
    assert torch.allclose(responses.std(dim=(0, 2, 3)), torch.ones(32), atol=0.05)


def test_a_benchmark_run_whitens_with_its_training_images_only(monkeypatch) -> None:
    data = load_splits(None, limit=(64, 32), synthetic_fallback=True, validation=16)
    given = []

    class Built(Exception):
        """Raised in place of building the net, so the run stops before training."""

    def record(name: str, images) -> nn.Module:
        given.append(images)
        raise Built

    monkeypatch.setattr(benchmarks.bench, "build_net", record)
    with pytest.raises(Built):
        accuracy_run("WhitenedNet", data, TrainConfig(epochs=1), {}, 0, torch.device("cpu"))
    assert given[0] is data.train_images and len(data.val_labels) == 16


def test_each_layer_is_timed_on_the_input_it_reads_in_the_net() -> None:
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rows = {row["layer"]: row for row in layer_milliseconds(net, batch_size=4, steps=1)}
    leaves = [name for name, m in net.named_modules() if not any(m.children())]
    assert list(rows) == leaves
    assert all(row["ms"] > 0 for row in rows.values())
    assert rows["c1.0.0"]["input"] == [3, 32, 32]
    assert rows["c4.0.body.0.0"] == {**rows["c4.0.body.0.0"], "input": [128, 8, 8],
                                    "module": "Conv2d 128->128 3x3 dilation 2 groups 128"}
    assert rows["c1.2.0"]["module"] == "Conv2d 32->64 3x3 stride 2"
    assert rows["head.0"]["input"] == [128, 8, 8] and rows["head.1"]["input"] == [128, 1, 1]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "a copy is timed"


def test_each_layer_is_timed_on_an_input_laid_out_as_in_the_net(monkeypatch) -> None:
    # MixedKernelBlock's 7x7 conv reads a channel slice of a channels-last map: not dense.
    strides = []
    conv_forward = nn.Conv2d._conv_forward

    def spy(self, x, weight, bias):
        if self.kernel_size == (7, 7) and self.dilation == (1, 1):
            strides.append(x.stride())
        return conv_forward(self, x, weight, bias)

    monkeypatch.setattr(nn.Conv2d, "_conv_forward", spy)
    layer_milliseconds(MixedKernelNet(), batch_size=2, steps=1)
    # The forward pass runs the six blocks' 7x7 convs; then c1.1.wide is timed 6 times.
    in_net, timed = strides[0], strides[6:12]
    dense = torch.empty(2, 16, 32, 32).contiguous(memory_format=torch.channels_last).stride()
    assert in_net != dense
    assert set(timed) == {in_net}


@pytest.mark.parametrize("name", ["WhitenedNet", "MixedKernelNet", "Net"])
def test_every_kind_of_net_can_be_timed_layer_by_layer(name: str) -> None:
    images, _ = synthetic_cifar10(64, seed=0)
    rows = layer_milliseconds(build_net(name, images), batch_size=2, steps=1)
    assert rows and all(row["ms"] > 0 and row["calls"] == 1 for row in rows)


def test_the_layer_lines_rank_the_slowest_against_the_step() -> None:
    layers = [{"layer": f"l{i}", "module": "ReLU", "input": [8, 4, 4], "ms": float(i)}
              for i in range(1, 11)]
    lines = layer_lines("Tiny", {"cpu_train_step_ms": 100.0, "cpu_layer_ms": layers}, shown=2)
    assert lines[1].split() == ["10.0", "ms", "10.0%", "l10:", "ReLU", "on", "8x4x4"]
    assert lines[2].split()[:4] == ["9.0", "ms", "9.0%", "l9:"]
    assert lines[3].split()[:3] == ["36.0", "ms", "36.0%"] and "the other 8 layers" in lines[3]
    assert lines[4].split()[:3] == ["55.0", "ms", "55.0%"] and "all 10 layers" in lines[4]
    everything = layer_lines("Tiny", {"cpu_train_step_ms": 100.0, "cpu_layer_ms": layers}, shown=10)
    assert len(everything) == 12 and "the other" not in everything[-2]


def test_quick_mode_times_net_unless_other_nets_are_named() -> None:
    assert chosen_nets(None, quick=True) == ["Net"]
    assert chosen_nets(["ShallowSeparableNet"], quick=True) == ["ShallowSeparableNet"]
    assert chosen_nets(None, quick=False) == ["Net", "StartingNet"]


def test_the_cuda_timing_trains_the_named_net_at_the_run_batch_size(monkeypatch) -> None:
    seen = {}

    def fake_fit(model, train_loader, test_loader, config, device, progress) -> History:
        seen.update(net=type(model).__name__, batch=train_loader.batch_size, device=device,
                    images=len(train_loader.dataset),
                    transform=repr(train_loader.dataset.transform))
        return History(seconds=[3.0, 2.0, 2.5])

    monkeypatch.setattr(benchmarks.bench, "fit", fake_fit)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 2**20)
    run = cuda_epoch_seconds(synthetic_cifar10(64, seed=0), "ShallowSeparableNet", 128, True, workers=0,
                             augment={"rotate": 5.0})
    assert seen == {"net": "ShallowSeparableNet", "batch": 128, "device": "cuda", "images": 50_000,
                    "transform": repr(train_transforms(rotate=5.0))}
    assert (run["net"], run["batch_size"], run["steady_epoch_seconds"]) == ("ShallowSeparableNet", 128, 2.0)


def test_the_loader_timing_draws_whole_epochs_with_the_runs_augmentation(monkeypatch) -> None:
    monkeypatch.setattr(benchmarks.bench, "EPOCH_IMAGES", 300)
    loaders, batches = [], []
    original, original_iter = benchmarks.bench.make_loaders, DataLoader.__iter__

    def recording_loaders(*args, **kwargs):
        train, test = original(*args, **kwargs)
        loaders.append(train)
        return train, test

    def counting_iter(loader):
        batches.append(0)
        for batch in original_iter(loader):
            batches[-1] += 1
            yield batch

    monkeypatch.setattr(benchmarks.bench, "make_loaders", recording_loaders)
    monkeypatch.setattr(DataLoader, "__iter__", counting_iter)
    seconds = loader_epoch_seconds(synthetic_cifar10(64, seed=0), batch_size=100, workers=0,
                                   augment={"rotate": 5.0})
    (loader,) = loaders
    assert len(loader.dataset) == 300  # 64 images repeated to one (shrunk) epoch
    assert batches == [3, 3] and len(seconds) == 2 and all(s >= 0 for s in seconds)
    assert repr(loader.dataset.transform) == repr(train_transforms(rotate=5.0))


def test_sweep_options_are_typed_and_refuse_what_they_cannot_mean() -> None:
    types = {"max_lr": float, "nesterov": bool, "batch_size": int}
    assert _overrides(["max_lr=0.4", "nesterov=false", "batch_size=256"], types, "recipe") == {
        "max_lr": 0.4, "nesterov": False, "batch_size": 256
    }
    with pytest.raises(SystemExit, match="'flase' is not a bool"):
        _overrides(["nesterov=flase"], types, "recipe")
    with pytest.raises(SystemExit, match="name one of max_lr, nesterov, batch_size"):
        _overrides(["epochs=3"], types, "recipe")


def write_cifar_folder(root: Path, images, labels, train: slice, test: slice) -> None:
    """A CIFAR-10 python-batch folder with one training batch and the test batch."""
    (root / BATCH_FOLDER).mkdir(parents=True, exist_ok=True)
    for name, part in (("data_batch_1", train), ("test_batch", test)):
        batch = {"data": images[part].transpose(0, 3, 1, 2).reshape(-1, 3072),
                 "labels": labels[part].tolist()}
        (root / BATCH_FOLDER / name).write_bytes(pickle.dumps(batch))


def test_score_reports_the_saved_weights_on_test_and_training_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels = synthetic_cifar10(30, seed=1)
    write_cifar_folder(tmp_path, images, labels, slice(0, 20), slice(20, 30))
    seed_everything(0)
    saved = Net().state_dict()
    torch.save({"model": saved}, tmp_path / "best.pt")
    calls = []

    def spy(model: nn.Module, loader, device, mixed_precision=True, flip=False):
        calls.append((len(loader.dataset), flip))
        assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
        return 0.0, float(len(calls))

    monkeypatch.setattr(benchmarks.score, "evaluate", spy)
    result = score(tmp_path / "best.pt", str(tmp_path), workers=0, device=torch.device("cpu"))

    assert calls == [(10, False), (10, True), (20, False)]  # test, test flipped, training
    assert (result["test_acc"], result["test_acc_flip"], result["clean_train_acc"]) == (1, 2, 3)
    assert (result["test_images"], result["train_images"]) == (10, 20)


def test_score_refuses_a_checkpoint_with_non_finite_weights(tmp_path: Path) -> None:
    # It scored them: 9.38%, as if the net were merely untrained.
    images, labels = synthetic_cifar10(30, seed=1)
    write_cifar_folder(tmp_path, images, labels, slice(0, 20), slice(20, 30))
    weights = Net().state_dict()
    weights["head.1.weight"][3, 7] = float("nan")
    torch.save({"model": weights}, tmp_path / "best.pt")
    with pytest.raises(utils.CheckpointError, match=r"best\.pt holds NaN or infinite values in "
                                                    r"head\.1\.weight"):
        score(tmp_path / "best.pt", str(tmp_path), workers=0, device=torch.device("cpu"))


def test_score_of_a_validation_run_needs_its_split_and_scores_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels = synthetic_cifar10(30, seed=1)
    write_cifar_folder(tmp_path, images, labels, slice(0, 20), slice(20, 30))
    torch.save({"model": Net().state_dict(), "data": {"train_images": 15}}, tmp_path / "best.pt")
    monkeypatch.setattr(benchmarks.score, "evaluate",
                        lambda model, loader, device, flip=False: (0.0, float(len(loader.dataset))))
    with pytest.raises(ValueError, match=r"trained on 15 images, but these splits hold 20 .* "
                                         r"--validation N"):
        score(tmp_path / "best.pt", str(tmp_path), workers=0, device=torch.device("cpu"))
    result = score(tmp_path / "best.pt", str(tmp_path), workers=0, device=torch.device("cpu"),
                   validation=5)
    assert (result["train_images"], result["clean_train_acc"]) == (15, 15)
    assert (result["val_images"], result["val_acc"]) == (5, 5)


class Interrupted(Exception):
    """Stands in for a run killed mid-epoch."""


RUN_EPOCH = inspect.signature(utils._run_epoch)  # read before any test patches it


def epoch_of(call_args: tuple, call_kwargs: dict) -> int:
    """The `epoch` argument of a call to utils._run_epoch."""
    return RUN_EPOCH.bind(*call_args, **call_kwargs).arguments["epoch"]


def test_an_interrupted_benchmark_run_continues_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = load_splits(None, limit=(64, 32), synthetic_fallback=True)
    config = TrainConfig(batch_size=32, max_lr=0.05, epochs=2)
    cpu = torch.device("cpu")
    uninterrupted = accuracy_run("Net", data, config, {}, 0, cpu)
    run_epoch, epochs_run = utils._run_epoch, []

    def stop_in_epoch_2(*args, **kwargs) -> None:
        if epoch_of(args, kwargs) == 2:
            raise Interrupted
        run_epoch(*args, **kwargs)

    def record_epoch(*args, **kwargs) -> None:
        epochs_run.append(epoch_of(args, kwargs))
        run_epoch(*args, **kwargs)

    monkeypatch.setattr(utils, "_run_epoch", stop_in_epoch_2)
    with pytest.raises(Interrupted):
        accuracy_run("Net", data, config, {}, 0, cpu, checkpoint_dir=tmp_path)
    monkeypatch.setattr(utils, "_run_epoch", record_epoch)
    resumed = accuracy_run("Net", data, config, {}, 0, cpu, checkpoint_dir=tmp_path)
    assert epochs_run == [2]  # epoch 1 came from the checkpoint
    assert resumed["resumed"] and not uninterrupted["resumed"]
    assert resumed["test_acc_per_epoch"] == uninterrupted["test_acc_per_epoch"]
    assert resumed["final_clean_train_acc"] == uninterrupted["final_clean_train_acc"]

    epochs_run.clear()  # another sweep row in the same folder starts its own run
    other = accuracy_run("Net", data, config, {"rotate": 5.0}, 0, cpu, checkpoint_dir=tmp_path)
    assert epochs_run == [1, 2] and not other["resumed"]


def test_a_changed_default_keeps_each_run_in_its_own_checkpoint_folder(tmp_path: Path) -> None:
    data = load_splits(None, limit=(64, 32), synthetic_fallback=True)

    def folder(config: TrainConfig) -> Path:
        return _run_folder(tmp_path, "Net", config, {}, data)

    # A default run named before the warm-up became the default (no field changed) keeps its name,
    spec = {"augment": {}, "config": {}, "data": data.source, "images": [64, 0, 32]}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    assert folder(TrainConfig(ema_warmup=False)) == tmp_path / f"Net-seed0-{digest}"
    # and a run with the current default gets a folder of its own.
    assert folder(TrainConfig()) != folder(TrainConfig(ema_warmup=False))


def test_a_benchmark_run_scores_its_final_weights_flipped_and_on_clean_training_images(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    data = load_splits(None, limit=(64, 32), synthetic_fallback=True, validation=16)
    calls = []

    def spy(model: nn.Module, loader, device, mixed_precision=True, flip=False):
        steps = [type(step).__name__ for step in loader.dataset.transform.transforms]
        calls.append((len(loader.dataset), flip, steps))
        return 0.0, 10.0 * len(calls)

    monkeypatch.setattr(benchmarks.bench, "evaluate", spy)
    config = TrainConfig(batch_size=16, max_lr=0.05, epochs=1)
    run = accuracy_run("Net", data, config, {}, 0, torch.device("cpu"))
    assert [call[:2] for call in calls] == [(16, True), (32, True), (48, False)]
    unaugmented = [type(step).__name__ for step in eval_transforms().transforms]
    assert all(call[2] == unaugmented for call in calls)  # training images scored as loaded
    assert (run["final_val_acc_flip"], run["final_test_acc_flip"], run["final_clean_train_acc"]) == (
        10.0, 20.0, 30.0
    )


def test_a_benchmark_given_a_folder_without_cifar10_stops_and_names_the_fix(tmp_path: Path) -> None:
    bench = Path(__file__).parent.parent / "benchmarks" / "bench.py"
    run = subprocess.run([sys.executable, str(bench), "--quick", "--data", str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode != 0
    assert "No CIFAR-10 training batches" in run.stderr and "give --data" in run.stderr
