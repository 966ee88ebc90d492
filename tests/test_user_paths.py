"""Paths a new user takes with their own model, data and loss: each trains right or fails with a clear message."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import (
    EarlyStopping,
    LabelSmoothing,
    Mixup,
    TrainingDoctor,
    TricksMixin,
    WarmupCosine,
    adamw,
    recipe,
)
from tests.conftest import TinyNet, loader, quiet_trainer


# ------------------------------------------------------------------------------- early stopping's mode
class RisingAcc(TinyNet):
    """val_acc rises every epoch (0.136 -> 0.539): the last epoch is the best."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", 0.136 + 0.08 * self.current_epoch, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.last = [p.detach().clone() for p in self.parameters()]


def test_recipe_early_stopping_on_accuracy_maximises_it() -> None:
    """Regression: `recipe(early_stopping="val_acc")` kept mode="min" and restored the epoch-0 weights."""
    callbacks = recipe(early_stopping="val_acc", mixup=None, label_smoothing=0, doctor=False, monitor=False)
    stopper = next(cb for cb in callbacks if isinstance(cb, EarlyStopping))
    assert stopper.mode == "max"
    model = RisingAcc()
    quiet_trainer(max_epochs=6, limit_val_batches=1, callbacks=callbacks).fit(model, loader(), loader(8))
    assert stopper.best_epoch == 5
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model.last))


def test_an_ambiguous_metric_takes_lightnings_default_mode() -> None:
    assert EarlyStopping("score").mode == "min"  # Lightning's default, as its own class (a drop-in)
    assert EarlyStopping("score", mode="max").mode == "max"
    assert EarlyStopping("val/f1").mode == "max" and EarlyStopping("train_loss_epoch").mode == "min"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: EarlyStopping("val_loss", patience=-1), r"`patience` must be in \[0, inf\], got -1"),
        (lambda: recipe(patience=-3), r"`patience` must be in \[0, inf\], got -3"),
        (lambda: recipe(mixup=-1), r"`mixup` must be in \[0.0, inf\], got -1"),
        (lambda: recipe(label_smoothing=1.5), r"`label_smoothing` must be in \[0.0, 1.0\), got 1.5"),
        (lambda: WarmupCosine(warmup=1.5), r"an int: warmup=500 is 500 steps\), got 1.5"),
    ],
)
def test_bad_arguments_are_named(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------------------- own loss, other targets
class OwnBCE(TricksMixin, pl.LightningModule):
    """A user's own loss in training_step, without tricks_loss."""

    num_classes = 4

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 4)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        target = y if y.is_floating_point() else F.one_hot(y, 4).float()  # multi-hot targets, as a user has them
        return F.binary_cross_entropy_with_logits(self.lin(x.flatten(1)), target)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_mixed_batch_that_skips_tricks_loss_is_an_error() -> None:
    """Regression: with its own loss and recipe(), 229 of 256 inputs were mixed while the targets stayed unmixed."""
    with pytest.raises(RuntimeError, match=r"Mixup: the training loss must go through `self.tricks_loss\(logits, y\)`.*"
                                           r"this step's loss did not"):
        quiet_trainer(max_steps=2, callbacks=recipe(label_smoothing=0)).fit(OwnBCE(), loader())


def test_without_tricks_loss_label_smoothing_is_not_silently_dropped() -> None:
    """Label smoothing alone changes no input, but a loss that skips tricks_loss would train unsmoothed: an error."""
    with pytest.raises(RuntimeError, match=r"LabelSmoothing: the training loss must go through"):
        quiet_trainer(max_steps=1, callbacks=[LabelSmoothing(0.1)]).fit(OwnBCE(), loader())


def test_own_loss_with_callbacks_that_do_not_need_the_seam_trains() -> None:
    callbacks = recipe(label_smoothing=0, mixup=None, early_stopping=None)
    trainer = quiet_trainer(max_epochs=2, callbacks=callbacks)
    trainer.fit(OwnBCE(), loader())
    assert trainer.global_step == 16


class OneOutput(TinyNet):
    def __init__(self) -> None:
        super().__init__(num_classes=1)


def test_one_logit_with_float_targets_is_refused_by_the_default_loss() -> None:
    """Regression: a 1-output model with (N, 1) float targets trained with train_loss 0.0, train_acc 1.0."""
    data = DataLoader(TensorDataset(torch.randn(16, 1, 16), torch.rand(16, 1)), batch_size=8)
    with pytest.raises(ValueError, match=r"logits with at least 2 classes, got shape \(8, 1\).*For regression"):
        quiet_trainer(max_steps=1).fit(OneOutput(), data)


def test_multi_label_targets_are_not_soft_targets() -> None:
    """Regression: multi-label 0/1 rows were trained as soft targets with a softmax cross-entropy."""
    model = TinyNet()
    rows = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"one sums to 2: multi-label 0/1 targets are not class probabilities"):
        model.tricks_loss(torch.randn(2, 4), rows)
    soft = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])  # real distributions are fine
    torch.testing.assert_close(TinyNet().tricks_loss(torch.zeros(2, 4), soft), torch.tensor(4.0).log())


def test_out_of_range_labels_name_the_head_size() -> None:
    data = DataLoader(TensorDataset(torch.randn(8, 1, 16), torch.full((8,), 11)), batch_size=4)
    with pytest.raises(ValueError, match=r"target class 11 is out of range for logits of 4 classes"):
        quiet_trainer(max_steps=1).fit(TinyNet(), data)  # no trick: the default loss
    with pytest.raises(ValueError, match=r"target class 11 is out of range for logits of 4 classes"):
        quiet_trainer().validate(TinyNet(), data, verbose=False)  # validation


def test_a_head_smaller_than_the_class_count_is_named() -> None:
    class Small(TinyNet):
        num_classes = 5  # the data has 5 classes, the head outputs 4

    with pytest.raises(ValueError, match=r"Small.num_classes = 5, but the logits have 4 classes"):
        quiet_trainer(max_steps=1, callbacks=[LabelSmoothing(0.1)]).fit(Small(), loader())


def test_valid_soft_targets_from_the_data_train_with_mixup() -> None:
    g = torch.Generator().manual_seed(0)
    soft = torch.softmax(torch.randn(32, 4, generator=g), dim=-1)
    data = DataLoader(TensorDataset(torch.randn(32, 1, 16, generator=g), soft), batch_size=8)
    trainer = quiet_trainer(max_steps=4, callbacks=[Mixup(0.4), LabelSmoothing(0.1)])
    trainer.fit(TinyNet(), data)
    assert trainer.global_step == 4 and torch.isfinite(trainer.callback_metrics["train_loss_epoch"])


# ------------------------------------------------------------------------------- two optimizers (a GAN)
class GAN(TricksMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.g, self.d = nn.Linear(4, 16), nn.Linear(16, 1)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        x, _ = batch
        fake = self.g(torch.randn(x.shape[0], 4))
        d_loss = F.softplus(self.d(fake.detach())).mean() + F.softplus(-self.d(x.flatten(1))).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = F.softplus(-self.d(fake)).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.g.parameters(), lr=1e-3), torch.optim.Adam(self.d.parameters(), lr=4e-3)


def test_two_optimizers_under_manual_optimization_follow_the_whole_schedule() -> None:
    """Regression: the schedule planned 66 steps while global_step advanced 2 per batch: lr 0 from batch 33 of 66."""
    from lightning_tricks.functional import warmup_cosine

    seen: list[tuple[float, float]] = []

    class Lr(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            seen.append(tuple(opt.param_groups[0]["lr"] for opt in trainer.optimizers))

    schedule = WarmupCosine(warmup=0.1)
    trainer = quiet_trainer(max_epochs=3, callbacks=[schedule, Lr()])
    trainer.fit(GAN(), loader(176, 8))
    assert trainer.global_step == 2 * 66 and schedule.planned_total == 66 and len(seen) == 66
    for batch, (lr_g, lr_d) in enumerate(seen):
        factor = warmup_cosine(batch, total_steps=66, warmup_steps=7)
        assert lr_g == pytest.approx(1e-3 * factor, abs=1e-15) and lr_d == pytest.approx(4e-3 * factor, abs=1e-15)
    assert seen[40][0] > 0.2e-3  # past the middle, not 0


def test_two_optimizers_with_max_steps_need_a_total_in_batches() -> None:
    with pytest.raises(ValueError, match=r"per training batch with 2 optimizers.*`max_steps=20`.*total_steps="):
        quiet_trainer(max_steps=20, callbacks=[WarmupCosine()]).fit(GAN(), loader())


# ------------------------------------------------------------------------------- adamw with lazy modules
class Lazy(TricksMixin, pl.LightningModule):
    """The README's quick start: Flatten + LazyLinear, adamw()."""

    num_classes = 4

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.LazyLinear(16), nn.LayerNorm(16), nn.ReLU(), nn.LazyLinear(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> Any:
        return adamw(self, lr=1e-3, weight_decay=0.5)


def test_adamw_decays_the_weights_of_lazy_layers() -> None:
    """Regression: uninitialised parameters report ndim 1, so every weight landed in the no-decay group."""
    model = Lazy()
    opt = model.configure_optimizers()
    decay, no_decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert decay == {id(model.net[1].weight), id(model.net[4].weight)}
    assert no_decay == {id(model.net[1].bias), id(model.net[2].weight), id(model.net[2].bias), id(model.net[4].bias)}
    trainer = quiet_trainer(max_steps=3)
    trainer.fit(model, loader())
    weights, groups = trainer.optimizers[0].param_groups[0]["params"], trainer.optimizers[0].param_groups
    assert weights[0].shape == (16, 16) and groups[0]["weight_decay"] == 0.5 and groups[1]["weight_decay"] == 0.0


# ------------------------------------------------------------------------------- the doctor and the schedule
def test_the_doctor_does_not_blame_the_lr_the_schedule_set() -> None:
    """Regression: 3-epoch recipe runs reported loss_not_falling with evidence lr = 0 and advised 'lr too small'."""
    callbacks = [WarmupCosine(0.1), TrainingDoctor()]
    quiet_trainer(max_epochs=3, callbacks=callbacks).fit(TinyNet(lr=1e-6), loader(64, 8), loader(32))
    doctor = callbacks[1]
    finding = next(f for f in doctor.findings if f.code == "loss_not_falling")  # lr 1e-6: it does not fall
    assert "lr" not in finding.evidence and finding.evidence["peak_lr"] == pytest.approx(1e-6)
    assert finding.evidence["lr_now"] == 0.0 and "max_update_ratio" not in finding.evidence
    # no update ratio to say which way: the advice names the peak lr and sends to the range test, no direction
    assert finding.advice[0].startswith("is the peak lr (1e-06) right?") and "lr_find" in finding.advice[0]


def test_a_run_that_ends_inside_warmup_says_so() -> None:
    callbacks = [WarmupCosine(warmup=100, total_steps=200), TrainingDoctor()]
    quiet_trainer(max_epochs=3, callbacks=callbacks).fit(TinyNet(), loader(64, 8), loader(32))
    codes = [f.code for f in callbacks[1].findings]
    assert "ended_in_warmup" in codes and "loss_not_falling" not in codes
    finding = next(f for f in callbacks[1].findings if f.code == "ended_in_warmup")
    assert finding.evidence["optimizer_steps"] == 24 and finding.evidence["warmup_steps"] == 100



class NoCount(TricksMixin, pl.LightningModule):
    """A module that says nothing about its class count."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_class_count_from_the_callback_argument() -> None:
    trainer = quiet_trainer(max_steps=3, callbacks=[Mixup(0.4, num_classes=4), LabelSmoothing(0.1)])
    trainer.fit(NoCount(), loader())
    assert trainer.global_step == 3


def test_distillation_alone_needs_no_class_count() -> None:
    from lightning_tricks import Distillation

    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    trainer = quiet_trainer(max_steps=3, callbacks=[Distillation(teacher)])
    trainer.fit(NoCount(), loader())  # no batch trick: the soft targets come from the current logits
    assert "distill/soft" in trainer.callback_metrics


def test_ema_with_a_lazy_module() -> None:
    from lightning_tricks import EMA

    ema = EMA(decay=0.5, warmup=False, keep_ema_at_end=False)
    model = Lazy()
    quiet_trainer(max_steps=3, callbacks=[ema]).fit(model, loader())
    assert ema.updates == 3 and ema.averaged_state_dict()["net.1.weight"].shape == (16, 16)


# ------------------------------------------------------------------------------- errors that name the right thing
def test_a_finetune_that_freezes_everything_says_so() -> None:
    """Regression: ended in torch's 'element 0 of tensors does not require grad'."""
    from lightning_tricks import Finetune

    with pytest.raises(ValueError, match=r"Finetune: the backbone \(\['conv', 'head'\]\) holds every parameter of "
                                         r"TinyNet, so nothing would train"):
        quiet_trainer(max_epochs=1, callbacks=[Finetune(backbone=["conv", "head"])]).fit(TinyNet(), loader())


def test_a_teacher_that_cannot_take_the_inputs_is_named() -> None:
    """Regression: a matmul shape error from inside transform_loss, without a word about the teacher."""
    from lightning_tricks import Distillation

    teacher = nn.Sequential(nn.Flatten(), nn.Linear(10, 4))  # the student's inputs have 16 features
    with pytest.raises(ValueError, match=r"Distillation's teacher \(Sequential\) failed on the student's inputs of "
                                         r"shape \(8, 1, 16\)"):
        quiet_trainer(max_steps=1, callbacks=[Distillation(teacher)]).fit(TinyNet(), loader())


class Transitions(pl.LightningModule):
    """An RL-shaped module: 5-tuple batches (state, action, reward, done, next state) and an MSE loss."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        state, action, reward, done, next_state = batch
        value = self.q(state).gather(1, action.unsqueeze(1)).squeeze(1)
        target = reward + 0.9 * self.q(next_state).max(1).values.detach() * (1 - done)
        return F.mse_loss(value, target)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class MixinTransitions(TricksMixin, Transitions):
    pass


def transitions() -> DataLoader:
    n = 16
    return DataLoader(TensorDataset(torch.randn(n, 4), torch.randint(0, 2, (n,)), torch.randn(n),
                                    torch.zeros(n), torch.randn(n, 4)), batch_size=4)


def test_an_rl_batch_under_the_recipe_is_told_to_leave_the_loss_tricks_out() -> None:
    """Regression: told to override tricks_unpack, where the fix is to leave label smoothing and mixup out."""
    with pytest.raises(ValueError, match=r"Mixup mixes the training inputs.*or leave Mixup out"):
        quiet_trainer(max_steps=1, callbacks=recipe(early_stopping=None)).fit(MixinTransitions(), transitions())
    with pytest.raises(RuntimeError, match=r"LabelSmoothing: the training loss must go through.*For regression.*"
                                           r"recipe\(label_smoothing=0, mixup=None\)"):
        quiet_trainer(max_steps=1, callbacks=recipe(mixup=None, early_stopping=None)).fit(MixinTransitions(),
                                                                                          transitions())
    trainer = quiet_trainer(max_steps=2, callbacks=recipe(label_smoothing=0, mixup=None, early_stopping=None))
    trainer.fit(MixinTransitions(), transitions())  # what the errors advise trains
    assert trainer.global_step == 2
