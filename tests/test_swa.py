"""SWA against Lightning's StochasticWeightAveraging and torch's update_bn, through a real Trainer."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging
from torch import nn
from torch.optim.swa_utils import update_bn

from lightning_tricks import SWA, TricksMixin, WarmupCosine
from tests.conftest import TinyNet, loader, quiet_trainer


class EpochEnds(pl.Callback):
    """The module's weights at the end of each training epoch (put it before SWA)."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def test_the_average_of_the_epoch_ends_and_lightnings_swa() -> None:
    ends, swa = EpochEnds(), SWA(start=0.5, keep_swa_at_end=False)
    pl.seed_everything(3, verbose=False)
    quiet_trainer(max_epochs=6, callbacks=[ends, swa]).fit(TinyNet(), loader(64, 8))
    assert swa.start_epoch == 3 and swa.updates == 3
    for key, value in swa.averaged_state_dict().items():
        want = torch.stack([w[key] for w in ends.weights[3:]]).mean(0)
        torch.testing.assert_close(value, want, atol=1e-6, rtol=0)
    # Lightning's callback on equal settings (its swa_lrs equal to the model's lr: no lr change; no BatchNorm). It
    # averages the weights at the *start* of epochs int(0.5 * 6) - 1 = 2 to 5, i.e. the ends of epochs 1-4, and leaves
    # the last epoch's out: the same as SWA(start=1) over 5 epochs of the same trajectory.
    finals = []
    for callback, epochs in ((SWA(start=1), 5), (StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=0.5), 6)):
        pl.seed_everything(3, verbose=False)
        model = TinyNet(lr=0.05)
        quiet_trainer(max_epochs=epochs, callbacks=[callback]).fit(model, loader(64, 8))
        finals.append(model.state_dict())
    for key in finals[0]:
        torch.testing.assert_close(finals[0][key], finals[1][key], atol=1e-6, rtol=0)


class BNNet(TricksMixin, pl.LightningModule):
    num_classes = 4

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(64, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_batchnorm_statistics_are_re_estimated_as_torch_does() -> None:
    swa = SWA(start=2)
    model = BNNet()
    quiet_trainer(max_epochs=4, callbacks=[swa]).fit(model, loader(64, 8))
    reference = copy.deepcopy(model)
    update_bn(((x,) for x, _ in loader(64, 8)), reference)  # torch's, on the same averaged weights
    bn, ref = model.net[1], reference.net[1]
    torch.testing.assert_close(bn.running_mean, ref.running_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(bn.running_var, ref.running_var, atol=1e-6, rtol=0)
    assert bn.momentum == 0.1  # the layer's own momentum is back


def test_the_swa_lr_phase() -> None:
    lrs: list[tuple[int, float, float]] = []

    class Lr(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt: Any) -> None:
            lrs.append((trainer.current_epoch, opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))

    model = TinyNet(group_lrs=(0.02, 0.04))
    quiet_trainer(max_epochs=5, callbacks=[SWA(start=2, swa_lr=0.005, anneal_epochs=2), Lr()]).fit(model, loader(32))
    per_epoch = {e: [(a, b) for ep, a, b in lrs if ep == e] for e in range(5)}
    assert per_epoch[1][-1] == (0.02, 0.04)  # untouched before the start
    assert per_epoch[2][0] == pytest.approx((0.02, 0.04))  # the annealing starts from the lrs at the start
    assert 0.005 < per_epoch[3][0][0] < 0.02  # half way down the cosine
    assert per_epoch[4][0] == pytest.approx((0.005, 0.01))  # then constant; the groups keep their ratio


def test_swa_lr_with_warmup_cosine_is_refused() -> None:
    with pytest.raises(ValueError, match=r"SWA\(swa_lr=...\) sets the lr.*WarmupCosine.*SWA\(swa_lr=None\)"):
        quiet_trainer(max_epochs=3, callbacks=[WarmupCosine(), SWA(start=1, swa_lr=0.01)]).fit(TinyNet(), loader())


class _SameOnRanks(pl.Callback):
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The parameters (all-reduced gradients: the same on every rank) and, after the end-of-fit re-estimate
        # averaged across ranks, the BatchNorm statistics (each rank saw its own batches) agree on both ranks.
        swa = next(cb for cb in trainer.callbacks if isinstance(cb, SWA))
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()]
                         + [pl_module.net[1].running_mean, pl_module.net[1].running_var])
        both = trainer.strategy.all_gather(flat)
        assert swa.updates == 2 and torch.allclose(both[0], both[1], atol=1e-6)


def test_ddp_two_cpu_processes() -> None:
    trainer = quiet_trainer(devices=2, strategy="ddp_fork", max_epochs=3, callbacks=[SWA(start=1), _SameOnRanks()])
    trainer.fit(BNNet(), loader(64, 8))
    assert trainer.state.finished


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(start=1.0), r"`start` must be in \(0.0, 1.0\), got 1.0"),
        (dict(start=-2), r"`start` must be in \[0, inf\], got -2"),
        (dict(swa_lr=0.0), r"`swa_lr` must be in \(0.0, inf\], got 0.0"),
        (dict(anneal_epochs=-1), "`anneal_epochs`"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SWA(**kwargs)


def test_a_start_after_the_run_is_refused() -> None:
    with pytest.raises(ValueError, match=r"SWA starts at epoch 5 \(start=5\), after the end of the run"):
        quiet_trainer(max_epochs=3, callbacks=[SWA(start=5)]).fit(TinyNet(), loader())


class ValLosses(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.values.append(float(trainer.callback_metrics["val_loss"]))


def test_each_validation_sees_the_average_that_includes_its_epoch() -> None:
    """Regression: validation in epoch e evaluated the average of the epoch ends up to e - 1 (two epochs logged the
    same val_loss; the last logged one was not the final model's)."""
    seen, swa = ValLosses(), SWA(start=1)
    model = TinyNet(lr=0.05)
    trainer = quiet_trainer(max_epochs=4, callbacks=[swa, seen])
    trainer.fit(model, loader(64, 8), loader(32, 8))
    assert len(seen.values) == 4 and len(set(seen.values[1:])) == 3
    final = quiet_trainer().validate(model, loader(32, 8), verbose=False)[0]["val_loss"]
    assert seen.values[-1] == pytest.approx(final, abs=1e-6)


@pytest.mark.parametrize("swa_first", [True, False])
def test_swa_and_early_stopping_end_on_the_same_weights_in_either_order(swa_first: bool) -> None:
    """Regression: with EarlyStopping first, SWA re-estimated BatchNorm on the weights EarlyStopping restored."""
    from lightning_tricks import EarlyStopping

    finals = []
    for first in (swa_first, not swa_first):
        pl.seed_everything(5, verbose=False)
        swa, stop = SWA(start=1), EarlyStopping("val_loss", patience=10, restore_best_weights=True,
                                                checkpoint_on_stop=False)
        model = BNNet()
        quiet_trainer(max_epochs=3, callbacks=[swa, stop] if first else [stop, swa]).fit(
            model, loader(64, 8), loader(32, 8))
        finals.append({k: v.clone() for k, v in model.state_dict().items()})
        assert torch.equal(model.net[1].running_mean, stop.best_weights["net.1.running_mean"])  # the evaluated stats
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), key
