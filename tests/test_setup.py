"""The notebook's first-run checks: no silent CPU run in Colab, a measured CPU cost, Drive."""

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import utils
from utils import (
    NoGPUError, TrainConfig, check_accelerator, drive_checkpoint_dir, estimate_epoch_seconds
)

CPU = torch.device("cpu")


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)
    )


def never_timed(*args: object) -> float:
    pytest.fail("check_accelerator timed training steps where it should not")


def one_second_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every training step `train_step_seconds` times last exactly one (fake) second."""
    clock = iter(range(10_000))
    monkeypatch.setattr(utils.time, "perf_counter", lambda: float(next(clock)))


def test_colab_without_a_gpu_stops_and_names_the_menu_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(utils, "estimate_epoch_seconds", never_timed)  # it stops before timing
    with pytest.raises(NoGPUError) as error:
        check_accelerator(
            CPU, tiny_net(), TrainConfig(batch_size=8), in_colab=True, allow_cpu=False
        )
    message = str(error.value)
    assert "no GPU" in message
    assert "Runtime → Change runtime type → Hardware accelerator: GPU" in message
    assert "ALLOW_CPU = True" in message


@pytest.mark.parametrize("in_colab", [True, False])
def test_a_cpu_run_that_goes_on_reports_its_measured_cost(
    monkeypatch: pytest.MonkeyPatch, in_colab: bool
) -> None:
    one_second_per_call(monkeypatch)
    message = check_accelerator(
        CPU, tiny_net(), TrainConfig(batch_size=128), in_colab=in_colab, allow_cpu=True
    )
    # 50,000 images at batch 128 are 390 whole batches (the partial last one is dropped) of
    # one second each: 390 s, so 60 epochs are 6.5 h.
    assert message.startswith("CPU: about 390 s per epoch of 50,000 images here")
    assert "60 epochs take about 6.5 h" in message
    assert "S9_SMOKE=1" in message


def test_a_cpu_outside_colab_goes_on_without_allow_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    one_second_per_call(monkeypatch)
    config = TrainConfig(batch_size=100, epochs=2)
    message = check_accelerator(
        CPU, tiny_net(), config, in_colab=False, allow_cpu=False, images=1_000
    )
    assert message.startswith("CPU: about 10 s per epoch of 1,000 images")
    assert "2 epochs take about 1 min" in message


def test_a_gpu_is_named_and_never_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla T4")
    monkeypatch.setattr(utils, "estimate_epoch_seconds", never_timed)
    cuda = torch.device("cuda")
    for in_colab in (True, False):
        message = check_accelerator(
            cuda, tiny_net(), TrainConfig(batch_size=8), in_colab=in_colab, allow_cpu=False
        )
        assert message == "GPU: Tesla T4"


def test_estimate_epoch_seconds_times_real_steps_on_a_copy() -> None:
    net = tiny_net()
    before = [p.detach().clone() for p in net.parameters()]
    seconds = estimate_epoch_seconds(net, TrainConfig(batch_size=4), images=40, device=CPU)
    assert 0 < seconds < 60
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters())), "model untouched"


def test_estimate_epoch_seconds_scales_with_batches_per_epoch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    one_second_per_call(monkeypatch)
    config = TrainConfig(batch_size=128)
    # 1,000 images make 7 whole batches of 128: the train loader drops the partial last one.
    assert estimate_epoch_seconds(tiny_net(), config, images=1_000, device=CPU) == 7.0
    assert estimate_epoch_seconds(tiny_net(), config, images=128, device=CPU) == 1.0


@pytest.mark.parametrize("mixed_precision", [True, False])
def test_the_cost_is_timed_in_the_recipes_precision(
    monkeypatch: pytest.MonkeyPatch, mixed_precision: bool
) -> None:
    timed = []

    def step_seconds(*args: object, mixed_precision: bool) -> float:
        timed.append(mixed_precision)
        return 1.0

    monkeypatch.setattr(utils, "train_step_seconds", step_seconds)
    config = TrainConfig(batch_size=100, mixed_precision=mixed_precision)
    check_accelerator(CPU, tiny_net(), config, in_colab=False, allow_cpu=False, images=1_000)
    assert timed == [mixed_precision]


def test_drive_checkpoint_dir_mounts_drive_in_colab(monkeypatch: pytest.MonkeyPatch) -> None:
    mounted = []
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=mounted.append)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    assert drive_checkpoint_dir() == Path("/content/drive/MyDrive/s9-checkpoints")
    assert mounted == ["/content/drive"]


def test_drive_checkpoint_dir_outside_colab_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "google.colab", None)  # importing it raises ImportError
    with pytest.raises(RuntimeError, match="needs Google Colab.*set USE_DRIVE = False"):
        drive_checkpoint_dir()
