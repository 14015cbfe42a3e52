"""fit trains, repeats, resumes exactly, stops on divergence; History and plots work."""

import dataclasses
from pathlib import Path

import matplotlib.figure
import pytest
import torch
from torch import nn

from dataset import CIFAR10Dataset, make_loaders, synthetic_cifar10
from model import Net
from transforms import test_transforms as eval_transforms
from transforms import train_transforms
from utils import (
    History,
    NonFiniteLossError,
    TrainConfig,
    confusion_matrix,
    fit,
    format_table,
    get_device,
    load_weights,
    misclassified,
    per_class_accuracy,
    plot_confusion_matrix,
    plot_history,
    plot_lr_schedule,
    plot_misclassified,
    seed_everything,
    show_samples,
)

CONFIG = TrainConfig(batch_size=32, max_lr=0.05, log_every=2)


def loaders(n_train: int = 320, n_test: int = 100):
    images, labels = synthetic_cifar10(n_train + n_test, seed=0)
    train = CIFAR10Dataset(images[:n_train], labels[:n_train], train_transforms())
    test = CIFAR10Dataset(images[n_train:], labels[n_train:], eval_transforms())
    return make_loaders(train, test, batch_size=CONFIG.batch_size, workers=0, seed=CONFIG.seed)


def recipe(epochs: int) -> TrainConfig:
    return dataclasses.replace(CONFIG, epochs=epochs)


def train(epochs: int, **kwargs) -> History:
    seed_everything(0)
    return fit(Net(), *loaders(), device="cpu", config=recipe(epochs), progress=False, **kwargs)


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


def test_resume_ends_with_the_same_history_as_an_uninterrupted_run(tmp_path: Path) -> None:
    seed_everything(0)
    full = fit(InterruptAt(), *loaders(), device="cpu", config=recipe(3), progress=False)
    seed_everything(0)
    with pytest.raises(KeyboardInterrupt):
        fit(InterruptAt(n=10 + 5), *loaders(), device="cpu", config=recipe(3),
            checkpoint_dir=tmp_path, progress=False)
    assert History.load(tmp_path / "history.json").epochs == 1
    seed_everything(123)  # a new session does not share the interrupted one's RNG state
    resumed = fit(InterruptAt(), *loaders(), device="cpu", config=recipe(3),
                  checkpoint_dir=tmp_path, resume=True, progress=False)
    assert resumed.epochs == 3
    assert resumed.train_loss == pytest.approx(full.train_loss, rel=1e-6)
    assert resumed.test_acc == full.test_acc
    assert resumed.batch_lr == pytest.approx(full.batch_lr)
    assert History.load(tmp_path / "history.json") == resumed


def test_resume_refuses_a_checkpoint_from_a_different_recipe(tmp_path: Path) -> None:
    train(epochs=1, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="different recipe.*epochs"):
        train(epochs=2, checkpoint_dir=tmp_path, resume=True)


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
    with pytest.raises(NonFiniteLossError, match="epoch 2, batch 4"):
        fit(model, *loaders(), device="cpu", config=recipe(3),
            checkpoint_dir=tmp_path, progress=False)
    assert History.load(tmp_path / "history.json").epochs == 1
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())


def test_checkpoints_load_with_weights_only(tmp_path: Path) -> None:
    history = train(epochs=2, checkpoint_dir=tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"last.pt", "best.pt", "history.json"}
    model = load_weights(Net(), tmp_path / "best.pt")
    _, test_loader = loaders()
    matrix = confusion_matrix(model, test_loader, "cpu")
    assert 100.0 * matrix.trace() / matrix.sum() == pytest.approx(max(history.test_acc))


def test_history_round_trips_through_json(tmp_path: Path) -> None:
    history = History(train_loss=[2.0, 1.5], train_acc=[20.0, 40.0], test_loss=[1.9, 1.4],
                      test_acc=[30.0, 86.0], lr=[0.1, 0.01], seconds=[1.0, 1.1], batch_lr=[0.1])
    history.save(tmp_path / "h.json")
    assert History.load(tmp_path / "h.json") == history
    assert history.first_epoch_reaching(85.0) == 2 and history.first_epoch_reaching(90.0) is None
    assert history.best_test_acc == 86.0


def test_reports_and_plots(tmp_path: Path) -> None:
    history = train(epochs=1)
    model = Net().eval()
    _, test_loader = loaders()
    records = misclassified(model, test_loader, "cpu")
    assert records and all(r.true != r.predicted for r in records)
    assert [r.confidence for r in records] == sorted((r.confidence for r in records), reverse=True)
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
