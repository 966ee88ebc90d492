"""Shared fixtures: a tiny classifier using the mixin, tiny data, quiet Trainers."""

from __future__ import annotations

import tempfile
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import TricksMixin

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*litlogger.*")
warnings.filterwarnings("ignore", ".*GPU available.*")


class TinyNet(TricksMixin, pl.LightningModule):
    """Conv1d + linear classifier over (N, 1, 16) inputs, 4 classes; AdamW with optional lr groups."""

    def __init__(self, lr: float = 0.05, group_lrs: tuple[float, float] | None = None, num_classes: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))

    def configure_optimizers(self) -> Any:
        if self.hparams.group_lrs:
            a, b = self.hparams.group_lrs
            groups = [{"params": self.conv.parameters(), "lr": a}, {"params": self.head.parameters(), "lr": b}]
            return torch.optim.AdamW(groups)
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def make_data(n: int = 64, seed: int = 0, num_classes: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = torch.randn(n, 1, 16, generator=g) + y.float().view(-1, 1, 1)
    return TensorDataset(x, y)


def loader(n: int = 64, batch_size: int = 8, seed: int = 0, shuffle: bool = False) -> DataLoader:
    return DataLoader(make_data(n, seed), batch_size=batch_size, shuffle=shuffle)


class MetricsRecorder(Logger):
    """A logger that keeps every ``log_metrics`` call: what a callback logged, seen the way a user's logger sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))

    def history(self, key: str = "grad/norm") -> list[dict[str, float]]:
        """The logged dicts that hold ``key``, in order."""
        return [m for _, m in self.records if key in m]

    def steps(self, key: str = "grad/norm") -> list[int | None]:
        """The logger steps of those dicts."""
        return [step for step, m in self.records if key in m]


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tempfile.mkdtemp(prefix="lt-test-"),  # reports and checkpoints never land in the checkout
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class LrRecorder(pl.Callback):
    """Records (global_step, [lr of every group]) at each optimizer step, just before it is applied."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.lrs: list[list[float]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.steps.append(trainer.global_step)
        self.lrs.append([g["lr"] for g in optimizer.param_groups])


@pytest.fixture(autouse=True)
def _seed() -> None:
    pl.seed_everything(0, verbose=False)
