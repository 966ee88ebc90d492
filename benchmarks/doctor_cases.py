"""TrainingDoctor on training runs whose fault is known by construction: a table of case, truth, findings, verdict.

Each case is a short CPU run (scikit-learn's digits or MNIST-1D, made locally) with `GradientMonitor` and
`TrainingDoctor` attached as a user of `recipe()` has them. The doctor is right on a case when its first finding
(the report's order: errors, then warnings, then information) is one of the case's accepted findings; a faulty run
must never be called `healthy`; a healthy run must get no warning; and no finding may advise raising the lr on a run
whose loss rose or whose gradients grew.

Usage::

    python benchmarks/doctor_cases.py                 # every case, the table on stdout
    python benchmarks/doctor_cases.py --cases lr_too_large_sgd healthy_mlp_adam
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import GradientMonitor, TrainingDoctor, TricksMixin, recipe
from lightning_tricks.demo.data import digits, mnist1d_splits

LR_TOO_LARGE = {"rising_loss", "diverging_loss", "nonfinite_loss", "exploding_growth", "exploding_gradients",
                "unstable_loss"}


@dataclass
class Case:
    name: str
    truth: str
    accepted: set[str]
    make: Callable[[], pl.LightningModule]
    data: Callable[[], tuple[DataLoader, DataLoader]]
    epochs: int = 12
    callbacks: Callable[[], list[pl.Callback]] = field(default=lambda: [])
    monitor: bool = True


class Net(TricksMixin, pl.LightningModule):
    """A classifier over any ``net`` with the mixin's default steps and a given optimizer."""

    def __init__(self, net: nn.Module, optimizer: Callable[[Any], torch.optim.Optimizer]) -> None:
        super().__init__()
        self.net, self.make_optimizer = net, optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.parameters())


class OwnKeys(Net):
    """Logs `loss` and `val/loss`, not the keys the doctor watches by default."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))


def mlp(inputs: int = 64, hidden: int = 64, depth: int = 1, act: type[nn.Module] = nn.ReLU,
        classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = inputs
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), act()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, classes))


def cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 10))


def digit_loaders(batch: int = 64, corrupt: Callable[[TensorDataset], TensorDataset] | None = None,
                  train_size: int | None = None) -> tuple[DataLoader, DataLoader]:
    train, _ = digits()
    x, y = train.tensors
    val = TensorDataset(x[:300], y[:300])
    rest = TensorDataset(x[300:] if train_size is None else x[300:300 + train_size],
                         y[300:] if train_size is None else y[300:300 + train_size])
    if corrupt is not None:
        rest = corrupt(rest)
    g = torch.Generator().manual_seed(0)
    return DataLoader(rest, batch_size=batch, shuffle=True, generator=g), DataLoader(val, batch_size=300)


def mnist1d_loaders(batch: int = 100) -> tuple[DataLoader, DataLoader]:
    train, val, _ = mnist1d_splits()
    g = torch.Generator().manual_seed(0)
    return DataLoader(train, batch_size=batch, shuffle=True, generator=g), DataLoader(val, batch_size=500)


def shuffled_labels(data: TensorDataset) -> TensorDataset:
    x, y = data.tensors
    return TensorDataset(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))])


def nan_inputs(data: TensorDataset) -> TensorDataset:
    x, y = data.tensors
    x = x.clone()
    x[700, 0, 3, 3] = float("nan")  # one bad pixel in one image
    return TensorDataset(x, y)


def deep(depth: int, act: type[nn.Module], std: float | None = None, inputs: int = 64) -> nn.Sequential:
    net = mlp(inputs, 64, depth, act)
    if std is not None:
        for m in net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
    return net


def adam(lr: float) -> Callable[[Any], torch.optim.Optimizer]:
    return lambda params: torch.optim.Adam(params, lr=lr)


def sgd(lr: float, momentum: float = 0.9) -> Callable[[Any], torch.optim.Optimizer]:
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


CASES = [
    Case("healthy_mlp_adam", "healthy", {"healthy"}, lambda: Net(mlp(), adam(1e-3)), digit_loaders),
    Case("healthy_cnn_sgd", "healthy", {"healthy"}, lambda: Net(cnn(), sgd(0.05)), digit_loaders),
    Case("healthy_recipe_adamw", "healthy", {"healthy"},
         lambda: Net(mlp(40, 128, 2), lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.01)),
         mnist1d_loaders, epochs=15,
         callbacks=lambda: recipe(early_stopping=None, doctor=False, monitor=False)),
    Case("lr_far_too_small", "lr too small", {"loss_not_falling"}, lambda: Net(mlp(), adam(1e-7)), digit_loaders),
    Case("lr_far_too_large_sgd", "lr too large", LR_TOO_LARGE, lambda: Net(mlp(), sgd(1.0)), digit_loaders),
    Case("lr_far_too_large_adam", "lr too large", LR_TOO_LARGE, lambda: Net(mlp(), adam(1.0)), digit_loaders),
    Case("labels_independent_of_inputs", "labels do not match inputs", {"no_learning", "loss_not_falling"},
         lambda: Net(mlp(), adam(1e-3)), lambda: digit_loaders(corrupt=shuffled_labels)),
    Case("nan_in_the_data", "NaN in the data", {"nonfinite_data"}, lambda: Net(cnn(), adam(1e-3)),
         lambda: digit_loaders(corrupt=nan_inputs), epochs=4),
    Case("overfitting", "overfitting", {"overfitting"}, lambda: Net(mlp(64, 512, 2), adam(3e-3)),
         lambda: digit_loaders(batch=16, train_size=48), epochs=40),
    Case("too_little_capacity", "model too small", {"underfitting"},
         lambda: Net(nn.Sequential(nn.Flatten(), nn.Linear(40, 10)), adam(1e-2)), mnist1d_loaders, epochs=15),
    Case("exploding_gradients_deep_no_norm", "exploding gradients", LR_TOO_LARGE,
         lambda: Net(deep(12, nn.ReLU, std=0.3), sgd(0.01)), digit_loaders, epochs=6),
    Case("vanishing_gradients_deep_sigmoid", "vanishing gradients", {"vanishing_gradients", "loss_not_falling"},
         lambda: Net(deep(12, nn.Sigmoid), sgd(0.05)), digit_loaders),
    Case("unstable_without_warmup", "instability (no warmup, high lr)", LR_TOO_LARGE,
         lambda: Net(cnn(), adam(3e-2)), digit_loaders),
    Case("metrics_under_other_keys", "nothing watched was logged", {"unknown"},
         lambda: OwnKeys(mlp(), adam(1e-3)), digit_loaders, epochs=4),
]


@dataclass
class Outcome:
    case: Case
    codes: list[str]
    advice_raises_lr: bool
    seconds: float

    @property
    def right(self) -> bool:
        return bool(self.codes) and self.codes[0] in self.case.accepted

    @property
    def flaws(self) -> list[str]:
        out = []
        healthy_truth = self.case.truth == "healthy"
        if not healthy_truth and "healthy" in self.codes:
            out.append("healthy on a faulty run")
        if healthy_truth and any(c not in ("healthy", "overfit_check_passed") for c in self.codes):
            out.append("a warning on a healthy run")
        if self.advice_raises_lr and self.case.accepted & LR_TOO_LARGE:
            out.append("advises raising the lr")
        return out


def run(case: Case, root: Path) -> Outcome:
    pl.seed_everything(0, verbose=False)
    train, val = case.data()
    doctor = TrainingDoctor()
    callbacks = [*case.callbacks(), *([GradientMonitor()] if case.monitor else []), doctor]
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=case.epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, log_every_n_steps=5, default_root_dir=str(root / case.name),
                         callbacks=callbacks)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(case.make(), train, val)
    seconds = time.perf_counter() - start
    codes = [f.code for f in doctor.ordered_findings()]
    raises = any(("raise" in a.lower() or "too small" in a.lower()) and "lr" in a.lower()
                 for f in doctor.findings for a in f.advice)
    return Outcome(case, codes, raises, seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=None, choices=[c.name for c in CASES])
    args = ap.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="doctor-cases-"))
    outcomes = [run(c, root) for c in CASES if args.cases is None or c.name in args.cases]
    print("| case | truth | the doctor's findings (first = verdict) | right | flaws | s |")
    print("|---|---|---|---|---|---|")
    for o in outcomes:
        print(f"| {o.case.name} | {o.case.truth} | {', '.join(o.codes) or '(none)'} | "
              f"{'yes' if o.right else 'NO'} | {'; '.join(o.flaws) or '-'} | {o.seconds:.1f} |")
    right = sum(o.right for o in outcomes)
    flaws = sum(bool(o.flaws) for o in outcomes)
    print(f"\nfirst finding right on {right} of {len(outcomes)} cases; cases with a flaw: {flaws}")


if __name__ == "__main__":
    main()
