"""Every use of Lightning's (and torch's) private state in lightning-tricks, in one place.

Each is needed for something no public API gives; ``tests/test_compat.py`` fails when Lightning or torch changes one.
Supported Lightning versions are declared in ``pyproject.toml``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping as _LightningEarlyStopping
from torch import Tensor


def logger_step(trainer: pl.Trainer) -> int:
    """The step at which Lightning hands ``self.log`` metrics to the loggers (``_batches_that_stepped``).

    Metrics sent straight to the loggers (as Lightning's ``LearningRateMonitor`` does) use it to line up with the
    module's own logged metrics; ``trainer.global_step`` differs under manual optimization with several optimizers.
    """
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def loss_scale(scaler: Any) -> Tensor:
    """The ``GradScaler``'s current scale as a device tensor. ``scaler.get_scale()`` is public but reads it to the
    host (a sync per call on a GPU)."""
    return scaler._scale


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The Trainer a module is attached to, or ``None`` (the public ``module.trainer`` raises when there is none)."""
    return module.__dict__.get("_trainer")


def unscales_itself(optimizer: Any) -> bool:
    """Whether an optimizer unscales its gradients inside ``step()`` under a ``GradScaler`` (fused AdamW): torch's
    ``_step_supports_amp_scaling`` flag, which makes Lightning skip ``scaler.unscale_``."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class EarlyStoppingChecks(_LightningEarlyStopping):
    """Lightning's ``EarlyStopping`` with its two private check methods named once, as extension points.

    Lightning runs ``_run_early_stopping_check(trainer)`` at each check and ``_evaluate_stopping_criteria(current)``
    inside it; a subclass overrides :meth:`run_check` and :meth:`evaluate_criteria` instead.
    """

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        self.run_check(trainer)

    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        return self.evaluate_criteria(current)

    def run_check(self, trainer: pl.Trainer) -> None:
        """One early-stopping check (Lightning's)."""
        super()._run_early_stopping_check(trainer)

    def evaluate_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        """Whether to stop at ``current``, and why (Lightning's)."""
        return super()._evaluate_stopping_criteria(current)


def fit_train_dataloader(trainer: pl.Trainer) -> Any:
    """The training dataloader(s) of the fit in progress, loaded now if the fit loop has not done it yet.

    ``trainer.train_dataloader`` is public but ``None`` until the fit loop loads the data, after ``on_fit_start``;
    the loop's ``setup_data`` loads it (a no-op when it is loaded already; the fit loop then reuses it).
    """
    trainer.fit_loop.setup_data()
    return trainer.train_dataloader


def writes_sharded_checkpoint(trainer: pl.Trainer) -> bool:
    """Whether the Trainer's checkpoints are distributed checkpoints (a folder of per-rank shards, written by
    ``torch.distributed.checkpoint``): ``ModelParallelStrategy`` with its default ``save_distributed_checkpoint=True``
    (the flag is kept privately). Every rank's shards of ``checkpoint["state_dict"]`` reach the disk then; the rest of
    the checkpoint is written by rank 0 alone."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = trainer.strategy
    return isinstance(strategy, ModelParallelStrategy) and bool(strategy._save_distributed_checkpoint)


def silence_module_hook_notice(hook: str) -> None:
    """Mark Lightning's once-per-process notice "You have overridden `<hook>` in `LightningModule` but have passed in
    a `LightningDataModule`" as given: for a module with :class:`TricksMixin` the module's hook is the intent. Only
    that message, in Lightning's own once-only cache (no warnings filter)."""
    from lightning.pytorch.trainer.connectors import data_connector

    data_connector.warning_cache.add(
        f"You have overridden `{hook}` in `LightningModule` but have passed in a `LightningDataModule`. It will use "
        "the implementation from `LightningModule` instance."
    )
