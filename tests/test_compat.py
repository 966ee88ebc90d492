"""The Lightning internals in ``lightning_tricks/_compat.py`` still mean what we use them for."""

from __future__ import annotations

import inspect
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping
from lightning.pytorch.plugins import MixedPrecision

from lightning_tricks._compat import (
    EarlyStoppingChecks,
    attached_trainer,
    fit_train_dataloader,
    logger_step,
    loss_scale,
    silence_module_hook_notice,
    unscales_itself,
    writes_sharded_checkpoint,
)
from tests.conftest import TinyNet, loader, quiet_trainer


class StepProbe(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.seen.append((logger_step(trainer), trainer.global_step))


def test_logger_step_counts_the_batches_that_stepped() -> None:
    probe = StepProbe()
    quiet_trainer(max_steps=4, accumulate_grad_batches=2, callbacks=[probe]).fit(TinyNet(), loader(64, 8))
    # Lightning increments it after on_train_batch_end of each stepping batch: it lags global_step there by one
    # on stepping batches and equals it in between.
    assert probe.seen == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (3, 3), (3, 4)]


def test_loss_scale_is_the_scalers_tensor() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = quiet_trainer(max_steps=2, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(TinyNet(), loader())
    scale = loss_scale(trainer.precision_plugin.scaler)
    assert isinstance(scale, torch.Tensor) and float(scale) == scaler.get_scale()


def test_early_stopping_check_methods_exist_and_run() -> None:
    run = inspect.signature(LightningEarlyStopping._run_early_stopping_check)
    evaluate = inspect.signature(LightningEarlyStopping._evaluate_stopping_criteria)
    assert list(run.parameters) == ["self", "trainer"]
    assert list(evaluate.parameters) == ["self", "current"]
    calls: list[str] = []

    class Counting(EarlyStoppingChecks):
        def run_check(self, trainer: pl.Trainer) -> None:
            calls.append("check")
            super().run_check(trainer)

        def evaluate_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
            calls.append("evaluate")
            return super().evaluate_criteria(current)

    quiet_trainer(max_epochs=3, callbacks=[Counting("val_loss", patience=10)]).fit(TinyNet(), loader(), loader(16))
    assert calls == ["check", "evaluate"] * 3


def test_attached_trainer_and_self_unscaling_optimizers() -> None:
    model = TinyNet()
    assert attached_trainer(model) is None
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(model, loader())
    assert attached_trainer(model) is trainer is model.trainer
    fused = torch.optim.AdamW(model.parameters(), fused=True)
    assert unscales_itself(fused) and not unscales_itself(torch.optim.AdamW(model.parameters()))


class EarlyLoader(pl.Callback):
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert trainer.train_dataloader is None  # not loaded yet at on_fit_start (why the helper exists)
        self.early = fit_train_dataloader(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.used = trainer.train_dataloader


def test_fit_train_dataloader_loads_the_fits_loader_once() -> None:
    probe, data = EarlyLoader(), loader()
    quiet_trainer(max_steps=1, callbacks=[probe]).fit(TinyNet(), data)
    assert probe.early is data and probe.used is data  # the same loader; the fit loop did not load it again


def test_the_distributed_checkpoint_flag_of_model_parallel_strategy() -> None:
    """ModelParallelStrategy keeps `save_distributed_checkpoint` as `_save_distributed_checkpoint`; other strategies
    never write distributed checkpoints."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    for flag in (True, False):
        trainer = quiet_trainer(strategy=ModelParallelStrategy(save_distributed_checkpoint=flag))
        assert writes_sharded_checkpoint(trainer) is flag
    assert writes_sharded_checkpoint(quiet_trainer()) is False


def test_the_silenced_notice_is_the_one_lightning_gives() -> None:
    """Lightning's selector of the module's or the DataModule's hook warns with exactly the text we mark as given."""
    import warnings

    from lightning.pytorch.trainer.connectors import data_connector

    class Hooked(TinyNet):
        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            return batch

    selector = data_connector._DataHookSelector(Hooked(), pl.LightningDataModule())
    silence_module_hook_notice("on_after_batch_transfer")
    marked = {m for m in data_connector.warning_cache if "on_after_batch_transfer" in m}
    data_connector.warning_cache.difference_update(marked)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert selector.get_instance("on_after_batch_transfer") is selector.model
    assert len(marked) == 1 and [str(w.message) for w in caught] == list(marked)
    silence_module_hook_notice("on_after_batch_transfer")  # marked as given again: silent now
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        selector.get_instance("on_after_batch_transfer")
    assert caught == []
