"""What :class:`~lightning_tricks.GradientMonitor` does when gradients are NaN/inf: warn once, raise, or stop the
run cleanly with a checkpoint that says where it is and whether its weights are finite."""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_tricks._io import checkpoint_dir
from lightning_tricks._sharding import local

ACTIONS = ("warn", "stop", "raise")


class NonFiniteGradientError(RuntimeError):
    """Raised by :class:`~lightning_tricks.GradientMonitor` with ``on_nonfinite="raise"``."""


class NonFiniteGuard:
    """One fit's reaction to non-finite gradients (``action``: one of :data:`ACTIONS`)."""

    def __init__(self, action: str, folder: str | None) -> None:
        self.action, self.folder = action, folder
        #: The optimizer step at which ``"stop"`` stopped the run, its checkpoint and the message that says so.
        self.stopped_step: int | None = None
        self.checkpoint_path: str | None = None
        self.stop_message: str | None = None
        self._warned = False

    def handle(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, groups: list[str],
               before_update: bool, skip: Sequence[Tensor]) -> None:
        """React to non-finite gradients first seen at optimizer step ``step`` in ``groups``. ``before_update``: the
        optimizer has not stepped yet, so ``"stop"`` drops the gradients of ``skip`` and the weights stay finite."""
        msg = (f"GradientMonitor: non-finite gradients at optimizer step {step} in group(s) {', '.join(groups)} "
               f"(the first in the model's order: '{groups[0] if groups else '?'}').")
        if self.action == "warn":
            if not self._warned:
                self._warned = True
                rank_zero_warn(msg + " Training goes on (on_nonfinite='warn').")
            return
        if self.action == "raise":
            raise NonFiniteGradientError(msg)
        if before_update:  # skip the bad update (of the optimizer about to step): the weights stay the last finite ones
            for p in skip:
                p.grad = None
        self.stopped_step = step
        trainer.should_stop = True
        path = os.path.join(checkpoint_dir(trainer, self.folder), f"nonfinite-step={step}.ckpt")
        trainer.save_checkpoint(path)
        self.checkpoint_path = path
        nonfinite = any(not bool(torch.isfinite(local(p)).all()) for p in pl_module.parameters())  # exceptional path
        if trainer.world_size > 1:
            nonfinite = trainer.strategy.reduce_boolean_decision(nonfinite, all=False)
        if nonfinite:
            state = "(its weights are already non-finite: resume from an earlier checkpoint)."
        else:
            state = "(finite weights, from before the bad update)." if before_update else "(finite weights)."
        self.stop_message = f"{msg} Training stopped (on_nonfinite='stop'); checkpoint: {path} {state}"
        rank_zero_warn(self.stop_message)
