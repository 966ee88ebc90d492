"""The LR range test's sweep: a short fit that grows the lr exponentially from ``min_lr`` to ``max_lr`` and records
the loss of each optimizer step (the curve and its suggestions: :mod:`lightning_tricks.tuning.lr_curve`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_tricks.functional._checks import check_number
from lightning_tricks.lrs import read_lrs, write_lrs
from lightning_tricks.trick import TrickCallback
from lightning_tricks.tuning.lr_curve import LRFinderResult, suggest
from lightning_tricks.weights import restore_weights, take_weights

__all__ = ["check_sweep", "lr_find"]


def check_sweep(min_lr: float, max_lr: float, num_steps: int, beta: float, divergence: float) -> None:
    check_number("min_lr", min_lr, low=0.0, low_open=True)
    check_number("max_lr", max_lr, low=0.0, low_open=True)
    if min_lr >= max_lr:
        raise ValueError(f"`min_lr` ({min_lr!r}) must be smaller than `max_lr` ({max_lr!r}).")
    check_number("num_steps", num_steps, low=5, integer=True)
    check_number("beta", beta, low=0.0, high=1.0, high_open=True)
    check_number("divergence", divergence, low=1.0, low_open=True)


class _Sweep(pl.Callback):
    """Sets the sweep's lrs, records the loss of each optimizer step, stops on divergence, restores the weights."""

    def __init__(self, min_lr: float, max_lr: float, num_steps: int, beta: float, divergence: float) -> None:
        self.min_lr, self.max_lr, self.num_steps = min_lr, max_lr, num_steps
        self.beta, self.divergence = beta, divergence
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.start_lr: float | None = None
        self.smoothed: list[float] = []
        self._pending: torch.Tensor | None = None
        self._avg = 0.0

    def _set(self, trainer: pl.Trainer, k: int) -> None:
        factor = (self.max_lr / self.min_lr) ** (k / max(1, self.num_steps - 1))
        write_lrs(trainer.optimizers, self._base, factor)
        self._current = self._base[0][0] * factor

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        configured = read_lrs(trainer.optimizers)
        reference = configured[0][0] or 1.0
        self.start_lr = float(reference)
        # every group starts at min_lr times its ratio to group 0 of optimizer 0
        self._base = [[self.min_lr * lr / reference for lr in groups] for groups in configured]
        self._saved = take_weights(pl_module)
        self._step = trainer.global_step
        self._set(trainer, 0)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        loss = loss.detach().float()  # divided by accumulate_grad_batches: the micro-batches sum to the step's loss
        self._pending = loss if self._pending is None else self._pending + loss
        if trainer.global_step == self._step:
            return  # accumulating
        self._step = trainer.global_step
        step_loss = float(trainer.strategy.reduce(self._pending, reduce_op="mean"))  # the same on every rank
        self._pending = None
        k = len(self.losses)
        self.lrs.append(self._current)
        self.losses.append(step_loss)
        self._avg = self.beta * self._avg + (1 - self.beta) * step_loss
        smoothed = self._avg / (1 - self.beta ** (k + 1))
        self.smoothed.append(smoothed)
        best = min(self.smoothed)
        if not math.isfinite(smoothed) or (k > 5 and smoothed > self.divergence * best):
            trainer.should_stop = True  # diverged
        else:
            self._set(trainer, k + 1)

    def restore(self, pl_module: pl.LightningModule) -> None:
        restore_weights(pl_module, self._saved, owner="lr_find")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.restore(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if hasattr(self, "_saved"):
            self.restore(pl_module)


def lr_find(
    module: pl.LightningModule,
    train_dataloaders: Any = None,
    *,
    datamodule: pl.LightningDataModule | None = None,
    min_lr: float = 1e-7,
    max_lr: float = 1.0,
    num_steps: int = 100,
    callbacks: Sequence[pl.Callback] = (),
    beta: float = 0.98,
    divergence: float = 4.0,
    **trainer_kwargs: Any,
) -> LRFinderResult:
    """Run the LR range test on ``module`` and return the curve and the suggestions; the module's weights, and the
    state of the given callbacks, come back as they were (from memory: no checkpoint file).

    Args:
        module: the model; its ``configure_optimizers`` builds the optimizer(s) of the sweep (a fresh one).
        train_dataloaders, datamodule: the training data, as for ``Trainer.fit``.
        min_lr, max_lr: the range of group 0's lr (``min_lr < max_lr``, both > 0).
        num_steps: optimizer steps of the sweep (at most; it stops when the smoothed loss exceeds ``divergence``
            times its best).
        callbacks: the run's callbacks; its tricks (``TrickCallback``: label smoothing, mixup, distillation) stay on
            during the sweep, others (schedules, early stopping, averaging) are left out.
        beta: the smoothing of the loss.
        trainer_kwargs: for the sweep's ``Trainer`` (``accelerator``, ``devices``, ``strategy``, ``precision``,
            ``accumulate_grad_batches``, ...): the lr is stepped per optimizer step; under several processes the loss
            of each step is averaged over ranks.
    """
    check_sweep(min_lr, max_lr, num_steps, beta, divergence)
    tricks = [cb for cb in callbacks if isinstance(cb, TrickCallback)]
    saved_states = [cb.state_dict() for cb in tricks]
    sweep = _Sweep(min_lr, max_lr, num_steps, beta, divergence)
    defaults: dict[str, Any] = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                                    max_epochs=-1)
    trainer = pl.Trainer(**{**defaults, **trainer_kwargs, "max_steps": num_steps, "callbacks": [*tricks, sweep]})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*val_dataloader.*|.*validation_step.*")
        trainer.fit(module, train_dataloaders=train_dataloaders, datamodule=datamodule)
    for cb, state in zip(tricks, saved_states):
        cb.load_state_dict(state)
    valley, steep, minimum, clear, notes = suggest(sweep.lrs, sweep.smoothed)
    if not clear:
        rank_zero_warn(f"lr_find: {'; '.join(notes)}. Widen the range (min_lr, max_lr), raise num_steps, or check "
                       "that the model trains at all (overfit_check).")
    return LRFinderResult(sweep.lrs, sweep.losses, sweep.smoothed, valley, steep, minimum, clear, notes,
                          start_lr=sweep.start_lr)
