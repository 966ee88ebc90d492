"""``LRFinder``: the LR range test run at the start of ``trainer.fit``, setting the suggested lr before training."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_tricks._compat import fit_train_dataloader
from lightning_tricks.functional._checks import check_choice
from lightning_tricks.lrs import scale_lrs
from lightning_tricks.peers import find_callbacks
from lightning_tricks.trick import TrickCallback
from lightning_tricks.tuning.lr_curve import CHOICES, LRFinderResult
from lightning_tricks.tuning.lr_sweep import check_sweep, lr_find

__all__ = ["LRFinder"]


class LRFinder(pl.Callback):
    """The LR range test as a callback: at the start of ``trainer.fit`` it runs :func:`lr_find` on the fit's own
    module, data, precision, accumulation and trick callbacks, restores the weights, and sets the suggested lr on the
    fit's optimizers (every param group scaled by one factor, so the ratios between groups stay) before training
    starts. ``WarmupCosine`` then plans its schedule from the new lrs; torch schedulers get new ``base_lrs``.

    Example::

        finder = LRFinder()
        trainer = pl.Trainer(max_epochs=10, callbacks=[finder, *recipe()])
        trainer.fit(model, datamodule=dm)
        finder.result.plot("lr_find.png")   # the curve; finder.lr is the lr that was used

    Args:
        choice: which suggestion to use: ``"steep"`` (the default), ``"valley"`` (fastai's default) or
            ``"minimum"`` (a tenth of the lr at the lowest loss). On the MNIST-1D benchmark in ``docs/results.md``
            ``steep`` lay within 3x of the best lr of a grid on every seed, with or without a schedule; ``valley``
            3-11x below it.
        min_lr, max_lr, num_steps, beta, divergence: as for :func:`lr_find`.

    The sweep runs once per fit: resuming from a checkpoint skips it (the optimizer's state carries the lr). It runs
    in single-process fits; under DDP or FSDP call :func:`lr_find` with the same ``strategy`` and ``devices`` before
    ``trainer.fit`` (its loss is averaged over ranks). If the sweep finds no clear valley it warns and leaves the lrs
    as ``configure_optimizers`` set them.
    """

    def __init__(self, choice: str = "steep", *, min_lr: float = 1e-7, max_lr: float = 1.0, num_steps: int = 100,
                 beta: float = 0.98, divergence: float = 4.0) -> None:
        check_choice("choice", choice, CHOICES)
        check_sweep(min_lr, max_lr, num_steps, beta, divergence)
        self.choice = choice
        self.sweep_kwargs: dict[str, Any] = dict(min_lr=min_lr, max_lr=max_lr, num_steps=num_steps, beta=beta,
                                                 divergence=divergence)
        self.result: LRFinderResult | None = None
        self.lr: float | None = None  # the lr set on param group 0 of optimizer 0 (None: not set)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.result = self.lr = None  # a checkpoint's state, restored after setup, may set the lr
        if trainer.world_size > 1:
            raise RuntimeError(
                f"LRFinder runs its sweep in single-process fits, but this fit has {trainer.world_size} processes "
                f"({type(trainer.strategy).__name__}). Call `lightning_tricks.tuning.lr_find(model, loader, "
                "strategy=..., devices=...)` before `trainer.fit` instead: it averages the loss over the ranks."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lr is not None:
            return  # resumed after the sweep: the restored optimizer state carries the lr
        device = trainer.strategy.root_device
        tricks = find_callbacks(trainer, TrickCallback)
        try:
            self.result = lr_find(
                pl_module, fit_train_dataloader(trainer), callbacks=tricks, **self.sweep_kwargs,
                accelerator=trainer.accelerator, strategy=SingleDeviceStrategy(device),
                precision=trainer.precision, accumulate_grad_batches=trainer.accumulate_grad_batches,
            )
        finally:
            pl_module.trainer = trainer  # the sweep's Trainer attached itself, and its teardown moved the module
            pl_module.to(device)
        if not self.result.clear:
            return
        lr = self.result.suggestion(self.choice)
        factor = lr / trainer.optimizers[0].param_groups[0]["lr"]
        scale_lrs(trainer.optimizers, [c.scheduler for c in trainer.lr_scheduler_configs], factor)
        self.lr = lr
        rank_zero_info(f"LRFinder: lr {lr:.3g} ({self.choice}) set on param group 0; every group scaled by "
                       f"{factor:.3g}. The curve: `finder.result.plot()`.")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "choice": self.choice}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.lr = state_dict["lr"]
