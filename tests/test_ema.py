"""EMA against timm's ModelEmaV3 and Lightning's EMAWeightAveraging, through a real Trainer."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision

from lightning_tricks import EMA, EarlyStopping, LabelSmoothing, Mixup, recipe
from lightning_tricks.functional.averaging import decay_from_half_life, ema_decay
from tests.conftest import TinyNet, loader, quiet_trainer


class Weights(pl.Callback):
    """The module's weights after every optimizer step (recorded before EMA's hook: put it first)."""

    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []
        self._step = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step > self._step:
            self._step = trainer.global_step
            self.after_step.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def _assert_equals_timm(ema: EMA, states: list[dict[str, torch.Tensor]], decay: float, warmup: bool) -> None:
    """Our average equals timm's ModelEmaV3 fed the same weights, update by update."""
    from timm.utils import ModelEmaV3

    reference = ModelEmaV3(TinyNet(), decay=decay, use_warmup=warmup)
    for n, state in enumerate(states, start=1):
        snapshot = TinyNet()
        snapshot.load_state_dict(state)
        reference.update(snapshot, step=n)
    ours = ema.averaged_state_dict()
    for key, value in reference.module.state_dict().items():
        torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=0)


def test_decay_schedule_is_timms_and_half_life() -> None:
    from timm.utils import ModelEmaV3

    timm_ema = ModelEmaV3(torch.nn.Linear(2, 2), decay=0.999, use_warmup=True)
    for n in (1, 2, 3, 10, 100, 5000, 100000):
        assert ema_decay(n, 0.999, warmup=True) == pytest.approx(timm_ema.get_decay(n), abs=1e-12)
    assert ema_decay(1, 0.9, warmup=False) == 0.0 and ema_decay(7, 0.9, warmup=False) == 0.9
    assert decay_from_half_life(100) ** 100 == pytest.approx(0.5)
    assert EMA(half_life=10).decay == pytest.approx(0.5 ** 0.1)


@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize(("precision", "accumulate"), [("32", 1), ("32", 3), ("bf16-mixed", 2), ("16-mixed", 1)])
def test_equals_timm_model_ema_v3(warmup: bool, precision: str, accumulate: int) -> None:
    weights, ema = Weights(), EMA(decay=0.9, warmup=warmup, keep_ema_at_end=False)
    kw: dict[str, Any] = ({"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
                          if precision == "16-mixed" else {"precision": precision})
    model = TinyNet()
    trainer = quiet_trainer(max_steps=12, accumulate_grad_batches=accumulate, callbacks=[weights, ema], **kw)
    trainer.fit(model, loader(128, 4))
    assert ema.updates == len(weights.after_step) == 12  # one update per optimizer step
    _assert_equals_timm(ema, weights.after_step, decay=0.9, warmup=warmup)


def test_equals_lightnings_ema_weight_averaging() -> None:
    results = []
    for callback in (EMA(decay=0.9, warmup=False), EMAWeightAveraging(decay=0.9)):
        pl.seed_everything(4, verbose=False)
        model = TinyNet()
        quiet_trainer(max_steps=15, accumulate_grad_batches=2, callbacks=[callback]).fit(model, loader(128, 4))
        results.append(model.state_dict())  # both leave the average in the module at the end
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], atol=1e-6, rtol=0)


class SeesWeights(TinyNet):
    """Records the weights each validation and each training step sees."""

    def __init__(self) -> None:
        super().__init__()
        self.in_validation: list[dict[str, torch.Tensor]] = []

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 0:
            self.in_validation.append({k: v.detach().clone() for k, v in self.state_dict().items()})
        return super().validation_step(batch, batch_idx)


class AverageAtValidation(pl.Callback):
    def __init__(self, ema: EMA) -> None:
        self.ema = ema
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.seen.append({k: v.clone() for k, v in self.ema.averaged_state_dict().items()})


def test_validation_runs_on_the_average_and_training_on_the_raw_weights() -> None:
    ema = EMA(decay=0.8, keep_ema_at_end=False)
    pl.seed_everything(1, verbose=False)
    model, probe = SeesWeights(), AverageAtValidation(ema)
    trainer = quiet_trainer(max_epochs=3, num_sanity_val_steps=1, callbacks=[ema, probe])
    trainer.fit(model, loader(64, 8), loader(16, 8))
    assert len(model.in_validation) == 4  # the sanity check (before any update) and one per epoch
    for seen, average in zip(model.in_validation[1:], probe.seen):
        for key in average:
            torch.testing.assert_close(seen[key], average[key])
    pl.seed_everything(1, verbose=False)
    plain = SeesWeights()
    quiet_trainer(max_epochs=3, num_sanity_val_steps=1).fit(plain, loader(64, 8), loader(16, 8))
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)  # the raw training never saw the average
    assert not torch.equal(model.in_validation[-1]["head.weight"], plain.in_validation[-1]["head.weight"])


def test_resume_gives_the_uninterrupted_average(tmp_path: Any) -> None:
    pl.seed_everything(2, verbose=False)
    full = EMA(decay=0.9, keep_ema_at_end=False)
    quiet_trainer(max_steps=16, callbacks=[full]).fit(TinyNet(), loader(64, 8))
    pl.seed_everything(2, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1, filename="{step}")
    quiet_trainer(max_steps=8, enable_checkpointing=True, callbacks=[EMA(decay=0.9), ckpt]).fit(TinyNet(),
                                                                                                  loader(64, 8))
    resumed = EMA(decay=0.9, keep_ema_at_end=False)
    quiet_trainer(max_steps=16, callbacks=[resumed]).fit(TinyNet(), loader(64, 8),
                                                          ckpt_path=str(tmp_path / "step=8.ckpt"))
    assert resumed.updates == full.updates == 16
    a, b = full.averaged_state_dict(), resumed.averaged_state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    state = torch.load(tmp_path / "step=8.ckpt", weights_only=False)
    assert set(state["state_dict"]) == set(TinyNet().state_dict())  # a plain module's keys; the average is apart


class _SameOnRanks(pl.Callback):
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        flat = torch.cat([v.flatten() for v in ema.averaged_state_dict().values()])
        both = trainer.strategy.all_gather(flat)
        assert ema.updates == 8 and torch.equal(both[0], both[1])


def test_ddp_two_cpu_processes() -> None:
    trainer = quiet_trainer(devices=2, strategy="ddp_fork", max_epochs=2, accumulate_grad_batches=2,
                            callbacks=[EMA(decay=0.9), Mixup(0.2), LabelSmoothing(0.1), _SameOnRanks()])
    trainer.fit(TinyNet(), loader(64, 4))
    assert trainer.state.finished


class Rising(TinyNet):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", [0.5, 0.9, 0.6, 0.7][self.current_epoch], sync_dist=True)


def test_early_stopping_keeps_the_evaluated_average() -> None:
    ema = EMA(decay=0.8)
    stopper = EarlyStopping("val_acc", patience=5, restore_best_weights=True)

    class AtBest(pl.Callback):
        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.current_epoch == 1:
                self.best = copy.deepcopy(ema.averaged_state_dict())

    at_best = AtBest()
    model = Rising()
    quiet_trainer(max_epochs=4, limit_val_batches=1, callbacks=[ema, at_best, stopper]).fit(model, loader(), loader(8))
    assert stopper.best_epoch == 1
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, at_best.best[key])  # the average that scored best, not the raw weights


def test_recipe_option_and_start_step() -> None:
    callbacks = recipe(ema=0.99, early_stopping=None, doctor=False)
    ema = next(cb for cb in callbacks if isinstance(cb, EMA))
    assert ema.decay == 0.99
    late = EMA(decay=0.5, warmup=False, start_step=6, keep_ema_at_end=False)
    weights = Weights()
    quiet_trainer(max_steps=8, callbacks=[weights, late]).fit(TinyNet(), loader(64, 8))
    assert late.updates == 2  # after steps 7 and 8; the first copies step 7's weights
    for key, value in late.averaged_state_dict().items():
        want = 0.5 * weights.after_step[6][key] + 0.5 * weights.after_step[7][key]
        torch.testing.assert_close(value, want)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(decay=1.0), ValueError, r"`decay` must be in \[0.0, 1.0\), got 1.0"),
        (dict(decay=-0.1), ValueError, r"`decay` must be in \[0.0, 1.0\), got -0.1"),
        (dict(half_life=0), ValueError, r"`half_life` must be in \(0.0, inf\], got 0"),
        (dict(decay=0.99, half_life=10), ValueError, r"give `decay` \(0.99\) or `half_life` \(10\), not both"),
        (dict(start_step=-1), ValueError, "`start_step`"),
        (dict(update_every=0), ValueError, "`update_every`"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        EMA(**kwargs)


def test_a_start_after_the_run_is_refused() -> None:
    with pytest.raises(ValueError, match=r"EMA\(start_step=100\) starts after the end of the run \(8 optimizer steps"):
        quiet_trainer(max_steps=8, callbacks=[EMA(start_step=100)]).fit(TinyNet(), loader())


def test_with_distillation() -> None:
    from lightning_tricks import Distillation

    torch.manual_seed(3)
    teacher = TinyNet()
    ema, weights = EMA(decay=0.9, warmup=False, keep_ema_at_end=False), Weights()
    trainer = quiet_trainer(max_steps=6, callbacks=[weights, Distillation(teacher), Mixup(0.2), ema])
    trainer.fit(TinyNet(), loader(64, 8))
    assert ema.updates == 6 and "distill/soft" in trainer.callback_metrics
    want = weights.after_step[0]
    for step in weights.after_step[1:]:
        want = {k: 0.9 * want[k] + 0.1 * step[k] for k in want}
    for key, value in ema.averaged_state_dict().items():
        torch.testing.assert_close(value, want[key], atol=1e-6, rtol=0)


class BuffersAgree(pl.Callback):
    """After EMA (and EarlyStopping) finished the fit: every rank holds the same BatchNorm statistics."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bn = pl_module.net[1]
        for buf in (bn.running_mean, bn.running_var):
            both = trainer.strategy.all_gather(buf.detach().clone())
            assert torch.equal(both[0], both[1])
        self.checked = True


@pytest.mark.parametrize("stop", [False, True])
def test_ddp_ranks_end_with_the_same_batchnorm_statistics(stop: bool) -> None:
    """Regression: the last BatchNorm update is rank-local, so EMA's average (and EarlyStopping's restored weights)
    ended with different running statistics on each rank."""
    from tests.test_swa import BNNet

    check = BuffersAgree()
    callbacks: list[pl.Callback] = [EMA(0.9)]
    if stop:
        callbacks.append(EarlyStopping("val_loss", restore_best_weights=True, checkpoint_on_stop=False))
    trainer = quiet_trainer(devices=2, strategy="ddp_fork", max_epochs=2, callbacks=[*callbacks, check])
    trainer.fit(BNNet(), loader(64, 8, shuffle=True), loader(32, 8))
    assert trainer.state.finished


class OddSteps(EMA):
    """Averages after the optimizer steps of odd index only: the public extension point."""

    def should_update(self, step: int | None = None, epoch: int | None = None) -> bool:
        return step is not None and step % 2 == 1


def test_should_update_chooses_the_averaged_steps() -> None:
    weights, ema = Weights(), OddSteps(decay=0.9, keep_ema_at_end=False)
    quiet_trainer(max_steps=10, callbacks=[weights, ema]).fit(TinyNet(), loader(128, 4))
    assert len(weights.after_step) == 10 and ema.updates == 5
    _assert_equals_timm(ema, weights.after_step[1::2], decay=0.9, warmup=True)  # steps of index 1, 3, 5, 7, 9


def test_an_average_in_host_memory_equals_the_one_beside_the_weights() -> None:
    # On this CPU-only machine both live in host memory; tests/test_gpu.py runs the cross-device case.
    results = []
    for device in (None, "cpu"):
        torch.manual_seed(0)
        ema = EMA(decay=0.9, device=device, keep_ema_at_end=False)
        quiet_trainer(max_steps=8, callbacks=[ema]).fit(TinyNet(), loader(128, 4))
        results.append(ema.averaged_state_dict())
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], atol=0, rtol=0)
    assert EMA(device="cpu").device == torch.device("cpu")


def test_checkpoint_weights_average_saves_the_average_and_resumes_from_the_trained_weights(tmp_path: Any) -> None:
    pl.seed_everything(2, verbose=False)
    full, full_model = EMA(decay=0.9, keep_ema_at_end=False), TinyNet()
    quiet_trainer(max_steps=16, callbacks=[full]).fit(full_model, loader(64, 8))
    pl.seed_everything(2, verbose=False)
    weights, first = Weights(), EMA(decay=0.9, checkpoint_weights="average")
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1, filename="{step}")
    quiet_trainer(max_steps=8, enable_checkpointing=True, callbacks=[weights, first, ckpt]).fit(TinyNet(),
                                                                                              loader(64, 8))
    state = torch.load(tmp_path / "step=8.ckpt", weights_only=False)
    average = first.averaged_state_dict()  # no update after step 8
    assert set(state["state_dict"]) == set(average) == set(state["trained_state_dict"])
    for key in average:
        torch.testing.assert_close(state["state_dict"][key], average[key], atol=0, rtol=0)
        torch.testing.assert_close(state["trained_state_dict"][key], weights.after_step[-1][key], atol=0, rtol=0)
    assert not torch.equal(state["state_dict"]["head.weight"], state["trained_state_dict"]["head.weight"])
    # a resumed fit trains on from the trained weights (not the average) and continues the average
    resumed, resumed_model = EMA(decay=0.9, keep_ema_at_end=False, checkpoint_weights="average"), TinyNet()
    quiet_trainer(max_steps=16, callbacks=[resumed]).fit(resumed_model, loader(64, 8),
                                                          ckpt_path=str(tmp_path / "step=8.ckpt"))
    assert resumed.updates == full.updates == 16
    a, b = full.averaged_state_dict(), resumed.averaged_state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    for key, value in full_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[key], value, atol=1e-6, rtol=0)


def test_checkpoint_weights_is_checked() -> None:
    with pytest.raises(ValueError, match="checkpoint_weights"):
        EMA(checkpoint_weights="best")
    from lightning_tricks import SWA

    trainer = quiet_trainer(max_epochs=2, callbacks=[EMA(checkpoint_weights="average"),
                                                      SWA(1, checkpoint_weights="average")])
    with pytest.raises(ValueError, match="one average"):
        trainer.fit(TinyNet(), loader(64, 8))
