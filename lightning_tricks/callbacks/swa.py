"""Stochastic weight averaging: an equal-weight average of the weights at the end of each epoch from a start epoch."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_tricks.callbacks.warmup_cosine import WarmupCosine
from lightning_tricks.callbacks.weight_average import WeightAverage
from lightning_tricks.functional._checks import check_number
from lightning_tricks.functional.averaging import swa_update_
from lightning_tricks.lrs import read_lrs, write_lrs
from lightning_tricks.peers import find_callback


class SWA(WeightAverage):
    r"""Stochastic weight averaging (Izmailov et al., 2018): the mean of the weights at the end of each epoch from
    ``start`` on, evaluated instead of them, with BatchNorm statistics re-estimated at the end.

    .. math:: \bar w_n = \bar w_{n-1} + (w_n - \bar w_{n-1}) / n

    Args:
        start: the first averaged epoch: an int (0-based epoch) or a float fraction of ``max_epochs`` in (0, 1)
            (``int(start * max_epochs)``, as Lightning's ``StochasticWeightAveraging``).
        swa_lr: the lr of the averaging phase, or ``None`` (default) to leave the lr alone (average over the tail of
            your own schedule, e.g. :class:`WarmupCosine` with a ``min_lr_ratio`` floor). With a value, every
            param group's lr goes from its value at ``start`` to ``swa_lr`` times its ratio to group 0 over
            ``anneal_epochs`` epochs (cosine; 0 jumps at once) and stays there. Not with :class:`WarmupCosine`, which
            sets the lr itself (an error says so).
        anneal_epochs: epochs of that cosine annealing.
        bn_update: at the end of fit, after the average is loaded into the module, re-estimate the BatchNorm running
            statistics over the training data with the averaged weights (as ``torch.optim.swa_utils.update_bn``,
            through the module's own batch unpacking; averaged across ranks).
        evaluate_with_swa: validation and test run on the average once it exists.
        keep_swa_at_end: leave the average in the module at the end of fit.
        device: where the average lives (default: with the weights; ``"cpu"``: in host memory).
        checkpoint_weights: ``"average"`` puts the averaged weights in checkpoints' ``state_dict`` (see
            :class:`WeightAverage`); ``"trained"`` (default) the trained ones.

    Under DDP every rank averages the same weights; under FSDP2 each rank its own shards, written into the
    distributed checkpoint beside the module's and read back on resume.

    Example::

        trainer = L.Trainer(max_epochs=100, callbacks=[SWA(start=0.75, swa_lr=1e-3)])
    """

    def __init__(
        self,
        start: float | int = 0.8,
        *,
        swa_lr: float | None = None,
        anneal_epochs: int = 0,
        bn_update: bool = True,
        evaluate_with_swa: bool = True,
        keep_swa_at_end: bool = True,
        device: torch.device | str | None = None,
        checkpoint_weights: str = "trained",
    ) -> None:
        if isinstance(start, float):
            check_number("start", start, low=0.0, high=1.0, low_open=True, high_open=True)
        else:
            check_number("start", start, low=0, integer=True)
        if swa_lr is not None:
            check_number("swa_lr", swa_lr, low=0.0, low_open=True)
        check_number("anneal_epochs", anneal_epochs, low=0, integer=True)
        super().__init__(evaluate_with_average=evaluate_with_swa, keep_average_at_end=keep_swa_at_end, device=device,
                         checkpoint_weights=checkpoint_weights)
        self.start = start
        self.swa_lr = swa_lr
        self.anneal_epochs = anneal_epochs
        self.bn_update = bn_update
        self.start_epoch: int | None = None
        self._start_lrs: list[list[float]] | None = None
        self._averaged_epoch: int | None = None  # the last epoch whose end is in the average

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        if isinstance(self.start, float):
            if max_epochs is None:
                raise ValueError(f"SWA(start={self.start}) is a fraction of max_epochs, but the Trainer has none: "
                                 "give the start epoch as an int.")
            self.start_epoch = int(self.start * max_epochs)
        else:
            self.start_epoch = self.start
        if max_epochs is not None and self.start_epoch >= max_epochs:
            raise ValueError(f"SWA starts at epoch {self.start_epoch} (start={self.start!r}), after the end of the run "
                             f"(max_epochs={max_epochs}, epochs 0-{max_epochs - 1}): lower `start`.")
        if self.swa_lr is not None and find_callback(trainer, WarmupCosine) is not None:
            raise ValueError(
                "SWA(swa_lr=...) sets the lr from its start epoch, but WarmupCosine sets it at every step too. Use "
                "SWA(swa_lr=None) to average over WarmupCosine's tail (give it a floor: min_lr_ratio), or drop "
                "WarmupCosine."
            )

    # ------------------------------------------------------------------ the lr phase
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.swa_lr is None or self.start_epoch is None or trainer.current_epoch < self.start_epoch:
            return
        if self._start_lrs is None:
            self._start_lrs = read_lrs(trainer.optimizers)
        reference = self._start_lrs[0][0] or 1.0
        if self.anneal_epochs:
            batches = max(1, trainer.num_training_batches) if math.isfinite(trainer.num_training_batches) else 1
            done = (trainer.current_epoch - self.start_epoch) + batch_idx / batches
            t = min(1.0, done / self.anneal_epochs)
        else:
            t = 1.0
        w = 0.5 * (1.0 - math.cos(math.pi * t))  # 0 at the start, 1 once annealed
        swa_lr = self.swa_lr
        write_lrs(trainer.optimizers, [[(1.0 - w) * lr0 + w * swa_lr * lr0 / reference for lr0 in starts]
                                       for starts in self._start_lrs])

    # ------------------------------------------------------------------ the average
    def _epoch_end_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self._averaged_epoch == epoch or not self.should_update(epoch=epoch):
            return
        self._averaged_epoch = epoch
        self._average_in(pl_module, swa_update_)

    @override
    def should_update(self, step: int | None = None, epoch: int | None = None) -> bool:
        """At the end of every epoch from the start epoch on."""
        return epoch is not None and self.start_epoch is not None and epoch >= self.start_epoch

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The epoch's last batch: average now, before Lightning validates this epoch (it validates before
        # on_train_epoch_end), so the epoch's validation sees the average that includes this epoch.
        if batch_idx + 1 == trainer.num_training_batches:
            self._epoch_end_update(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end_update(trainer, pl_module)  # an epoch of unknown length, or cut short by max_steps

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Loads the average, unless EarlyStopping restores its best check (the weights and statistics that were
        # evaluated): then neither the average nor a BatchNorm re-estimate, whichever callback comes first.
        if self._load_average_at_end(trainer, pl_module) and self.bn_update and _has_batchnorm(pl_module):
            update_bn(trainer, pl_module)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._averaged_epoch = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "start_lrs": self._start_lrs, "averaged_epoch": self._averaged_epoch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._start_lrs = state_dict.get("start_lrs")
        self._averaged_epoch = state_dict.get("averaged_epoch")


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def update_bn(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Re-estimate BatchNorm running statistics over the training data with the module's current weights.

    As ``torch.optim.swa_utils.update_bn``: statistics reset, momentum ``None`` (a cumulative mean over the batches),
    a forward pass per training batch in train mode without gradients; inputs taken by the module's
    ``tricks_unpack`` when it has one (``TricksMixin``), else the batch's first element. Under several processes the
    statistics are then averaged across ranks (each rank saw its own shard of the data).
    """
    norms = [m for m in pl_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = pl_module.training
    pl_module.train()
    loaders = trainer.train_dataloader
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    unpack = getattr(pl_module, "tricks_unpack", None)
    with torch.no_grad():
        for loader in loaders:
            for batch in loader:
                batch = trainer.strategy.batch_to_device(batch)
                x = unpack(batch)[0] if unpack is not None else (batch[0] if isinstance(batch, (list, tuple))
                                                                  else batch)
                pl_module(x)
    for m in norms:
        m.momentum = momenta[m]
        if trainer.world_size > 1:
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    buf.copy_(trainer.strategy.reduce(buf, reduce_op="mean"))
    pl_module.train(was_training)
    rank_zero_info(f"SWA: BatchNorm statistics re-estimated over the training data ({len(norms)} layers).")
