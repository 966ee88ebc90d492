"""Base class of the callbacks that act through :class:`~lightning_tricks.TricksMixin`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning.pytorch as pl
from lightning.pytorch.core.datamodule import LightningDataModule
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

if TYPE_CHECKING:
    from lightning_tricks.mixin import TricksMixin


class TrickCallback(pl.Callback):
    """A callback that transforms the training batch and/or the targets through the mixin's seam.

    Subclasses set ``order`` (position in the seam, low first), ``transforms_batch``/``transforms_target``/
    ``transforms_loss`` and implement :meth:`tricks_transform_batch`/:meth:`tricks_transform_target`/
    :meth:`tricks_transform_loss`.
    """

    order: int = 0
    transforms_batch: bool = False
    transforms_target: bool = False
    transforms_loss: bool = False
    #: The target transform depends on the batch alone (not on the forward pass), so the mixin may run it in its
    #: batch seam, before the forward.
    targets_before_forward: bool = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning_tricks.mixin import TricksMixin

        name = type(self).__name__
        if not isinstance(pl_module, TricksMixin):
            raise TypeError(
                f"{name} changes the batch or the loss through TricksMixin, but {type(pl_module).__name__} does not "
                f"use it: declare `class {type(pl_module).__name__}(TricksMixin, L.LightningModule)` and compute the "
                "loss with `self.tricks_loss(logits, y)` (or keep the mixin's default training_step)."
            )
        datamodule = trainer.datamodule
        if (
            self.transforms_batch
            and datamodule is not None
            and is_overridden("on_after_batch_transfer", datamodule, LightningDataModule)
        ):
            # Lightning calls the DataModule's hook *instead of* the module's (it only warns), which would
            # silently skip every batch trick.
            raise RuntimeError(
                f"{name} needs LightningModule.on_after_batch_transfer, but {type(datamodule).__name__} overrides "
                "on_after_batch_transfer, which makes Lightning skip the module's hook. Move that code to the "
                "module's on_after_batch_transfer (call super() there) or to the DataModule's on_before_batch_transfer."
            )

    def tricks_transform_batch(self, pl_module: TricksMixin, x: Tensor, y: Tensor) -> Tensor:
        """Return the new training inputs (targets stay indices; see :meth:`tricks_transform_target`)."""
        return x

    def tricks_transform_target(self, pl_module: TricksMixin, soft_target: Tensor) -> Tensor:
        """Return new float32 ``(N, K)`` soft targets for the current training batch."""
        return soft_target

    def tricks_soft_from_indices(self, pl_module: TricksMixin, target: Tensor, num_classes: int) -> Tensor | None:
        """Optional shortcut, used when this is the first target trick and the targets are class indices with no
        ``ignore_index``: return the float32 soft targets ``tricks_transform_target`` would make of their one-hot
        rows, built directly (fewer kernels), or ``None`` to take the general path."""
        return None

    def tricks_dominant_class(self, pl_module: TricksMixin, hard: Tensor, num_classes: int) -> Tensor | None:
        """Optional: the dominant class of each target after :meth:`tricks_transform_target`, given the dominant
        classes ``hard`` before it (class indices), or ``None`` when only an argmax of the soft targets can tell
        (the default). Lets the default steps compute the training accuracy without that argmax."""
        return None

    def tricks_transform_loss(self, pl_module: TricksMixin, logits: Tensor, target: Tensor, loss: Tensor) -> Tensor:
        """Return the training loss, given the student's logits, the effective targets and the loss so far."""
        return loss
