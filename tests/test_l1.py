"""L1 / elastic net: the functional core against references, both modes through a Trainer, DDP, bad input."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_tricks import L1, Finetune
from lightning_tricks.functional import elastic_net_penalty, elastic_net_prox_
from tests.conftest import TinyNet, loader, quiet_trainer


def test_the_penalty_is_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    want = 0.3 * sum(p.abs().sum() for p in params) + 0.2 * sum((p * p).sum() for p in params)
    torch.testing.assert_close(elastic_net_penalty(params, 0.3, 0.2), want)


@pytest.mark.parametrize(("lr", "l1", "l2"), [(0.1, 0.5, 0.0), (0.1, 0.5, 0.25), (0.05, 0.0, 1.0)])
def test_the_proximal_step_minimises_the_proximal_objective(lr: float, l1: float, l2: float) -> None:
    theta = torch.linspace(-1.0, 1.0, 41, dtype=torch.float64)
    got = theta.clone()
    elastic_net_prox_([got], lr, l1, l2)
    grid = torch.linspace(-1.5, 1.5, 300_001, dtype=torch.float64)  # brute force: argmin over u for each theta
    for t, u in zip(theta, got):
        objective = (grid - t) ** 2 / (2 * lr) + l1 * grid.abs() + l2 * grid**2
        assert float(u) == pytest.approx(float(grid[objective.argmin()]), abs=2e-5)
    assert (got == 0).sum() == (theta.abs() <= lr * l1).sum()  # exact zeros inside the threshold


class SGDNet(TinyNet):
    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def one_step_reference(model: nn.Module, l1: float, l2: float, mode: str) -> dict[str, torch.Tensor]:
    """The weights after one plain SGD step (lr 0.1) on the first batch, written out by hand."""
    ref = copy.deepcopy(model)
    x, y = next(iter(loader(64, 8)))
    F.cross_entropy(ref(x), y).backward()
    out = {}
    with torch.no_grad():
        for name, p in ref.named_parameters():
            weight = not name.endswith("bias")
            if mode == "loss" and weight:
                p.grad += l1 * p.sign() + 2 * l2 * p
            new = p - 0.1 * p.grad
            if mode == "proximal" and weight:
                new = new.sign() * (new.abs() - 0.1 * l1).clamp_min(0) / (1 + 2 * 0.1 * l2)
            out[name] = new
    return out


@pytest.mark.parametrize("mode", ["loss", "proximal"])
def test_one_step_through_the_trainer_matches_the_hand_written_step(mode: str) -> None:
    torch.manual_seed(0)
    model = SGDNet()
    want = one_step_reference(model, 0.05, 0.02, mode)
    quiet_trainer(max_steps=1, callbacks=[L1(0.05, 0.02, mode=mode)]).fit(model, loader(64, 8))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], rtol=1e-5, atol=1e-6)


class Regression(pl.LightningModule):
    """A plain module (no mixin) with its own MSE loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x.flatten(1)).squeeze(-1), y.float())

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_proximal_mode_makes_exact_zeros_with_any_loss_and_logs_sparsity() -> None:
    model, l1 = Regression(), L1(0.5, mode="proximal")
    biases = [model.net[0].bias.detach().clone(), model.net[2].bias.detach().clone()]
    quiet_trainer(max_steps=20, log_every_n_steps=5, callbacks=[l1]).fit(model, loader(64, 8))
    weights = torch.cat([model.net[0].weight.flatten(), model.net[2].weight.flatten()])
    assert l1.sparsity == pytest.approx(float((weights == 0).float().mean())) and l1.sparsity > 0.9
    assert not torch.equal(biases[0], model.net[0].bias)  # biases are trained, not shrunk to zero
    assert (model.net[0].bias != 0).all()


class OwnLoss(TinyNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)


def test_loss_mode_needs_the_loss_seam() -> None:
    with pytest.raises(RuntimeError, match=r"L1\(mode='loss'\) adds its penalty inside `self.tricks_loss"):
        quiet_trainer(max_steps=1, callbacks=[L1(0.01, mode="loss")]).fit(OwnLoss(), loader())
    with pytest.raises(TypeError, match="TricksMixin"):
        quiet_trainer(max_steps=1, callbacks=[L1(0.01, mode="loss")]).fit(Regression(), loader())


def test_loss_mode_logs_its_penalty() -> None:
    model = TinyNet()
    weights = [model.conv.weight.detach().clone(), model.head.weight.detach().clone()]
    trainer = quiet_trainer(max_steps=1, callbacks=[L1(0.01, 0.001, mode="loss")])
    trainer.fit(model, loader())
    want = 0.01 * sum(w.abs().sum() for w in weights) + 0.001 * sum((w * w).sum() for w in weights)
    assert float(trainer.callback_metrics["l1/penalty"]) == pytest.approx(float(want), rel=1e-6)  # before the step


class ConvAt(pl.Callback):
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.conv = pl_module.conv.weight.detach().clone()


def test_frozen_parameters_are_not_shrunk_until_unfrozen() -> None:
    model, at = TinyNet(), ConvAt()
    conv = model.conv.weight.detach().clone()
    # Finetune before L1: the backbone is frozen when L1 collects its parameters, and still penalised once unfrozen
    quiet_trainer(max_epochs=1, callbacks=[Finetune("conv", unfreeze_at=1), L1(0.5), at]).fit(model, loader())
    assert torch.equal(conv, at.conv)  # epoch 0: frozen, untouched
    assert (model.head.weight == 0).float().mean() > 0.2  # the head, which trains, is shrunk
    norms = []
    for extra in ([], [L1(0.5)]):
        torch.manual_seed(0)
        quiet_trainer(max_epochs=2, callbacks=[Finetune("conv", unfreeze_at=1), *extra, at]).fit(TinyNet(), loader())
        norms.append(float(at.conv.abs().sum()))
    assert norms[1] < norms[0] - 0.5  # epoch 1: unfrozen, and shrunk (8 steps of 0.05 x 0.5 on 12 weights)


class SameOnRanks(pl.Callback):
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        both = trainer.strategy.all_gather(flat)
        assert torch.equal(both[0], both[1])
        l1 = next(cb for cb in trainer.callbacks if isinstance(cb, L1))
        assert l1.mode == "loss" or (pl_module.head.weight == 0).any()  # the proximal step made zeros


@pytest.mark.parametrize("mode", ["loss", "proximal"])
def test_ddp_ranks_stay_identical(mode: str) -> None:
    trainer = quiet_trainer(devices=2, strategy="ddp_fork", max_steps=6,
                            callbacks=[L1(0.3 if mode == "proximal" else 1e-3, mode=mode), SameOnRanks()])
    trainer.fit(TinyNet(), loader(64, 8, shuffle=True))
    assert trainer.state.finished


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(l1=-0.1), r"`l1` must be"),
    (dict(l2=-1.0), r"`l2` must be"),
    (dict(l1=0.0, l2=0.0), "both 0"),
    (dict(mode="decay"), r"`mode`"),
])
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        L1(**kwargs)

