"""Base class of the callbacks that act through :class:`~lightning_tricks.TricksMixin`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning.pytorch as pl
from lightning.pytorch.core.datamodule import LightningDataModule
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from typing_extensions import override

if TYPE_CHECKING:
    from lightning_tricks.mixin import TricksMixin


class TrickCallback(pl.Callback):
    """A callback that changes the training batch and/or the training loss through :class:`TricksMixin`.

    A trick implements at most two methods, called on training batches of ``fit`` only (never in the sanity check,
    validation, test or predict), by trick callbacks in ascending ``order``:

    * :meth:`transform_batch` ``(module, x, soft_y) -> (x, soft_y)``: after the batch reaches the device, the inputs
      and the float32 ``(N, K)`` soft targets (label smoothing, mixup);
    * :meth:`transform_loss` ``(module, x, logits, soft_y, loss) -> loss``: inside :meth:`TricksMixin.tricks_loss`,
      given the inputs the model saw, its logits, the soft targets and the loss so far (distillation).

    Soft targets are built once, by the mixin, from the class count (see :meth:`TricksMixin.tricks_num_classes`).
    """

    #: Position among the trick callbacks (low first): label smoothing 10, mixing 20, distillation 30.
    order: int = 0

    def transform_batch(self, pl_module: TricksMixin, x: Tensor, soft_y: Tensor) -> tuple[Tensor, Tensor]:
        """Return the training inputs and float32 ``(N, K)`` soft targets, transformed."""
        return x, soft_y

    def transform_loss(self, pl_module: TricksMixin, x: Tensor, logits: Tensor, soft_y: Tensor,
                       loss: Tensor) -> Tensor:
        """Return the training loss, given the inputs the model saw, its logits, the soft targets and the loss."""
        return loss

    @property
    def has_batch_transform(self) -> bool:
        """Whether this trick changes the batch (its class overrides :meth:`transform_batch`)."""
        return type(self).transform_batch is not TrickCallback.transform_batch

    @property
    def has_loss_transform(self) -> bool:
        """Whether this trick changes the loss (its class overrides :meth:`transform_loss`)."""
        return type(self).transform_loss is not TrickCallback.transform_loss

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning_tricks.mixin import TricksMixin

        name = type(self).__name__
        if not isinstance(pl_module, TricksMixin):
            raise TypeError(
                f"{name} changes the batch or the loss through TricksMixin, but {type(pl_module).__name__} does not "
                f"use it: declare `class {type(pl_module).__name__}(TricksMixin, L.LightningModule)` and compute the "
                "loss with `self.tricks_loss(logits, y)` (or keep the mixin's default training_step)."
            )
        pl_module.__dict__.pop("_tricks_rows_checked", None)  # float targets' rows are checked once per fit
        datamodule = trainer.datamodule
        if datamodule is not None and is_overridden("on_after_batch_transfer", datamodule, LightningDataModule):
            # Lightning calls the DataModule's hook *instead of* the module's (it only warns), which would
            # silently skip every trick.
            raise RuntimeError(
                f"{name} needs LightningModule.on_after_batch_transfer, but {type(datamodule).__name__} overrides "
                "on_after_batch_transfer, which makes Lightning skip the module's hook. Move that code to the "
                "module's on_after_batch_transfer (call super() there) or to the DataModule's on_before_batch_transfer."
            )

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        from lightning_tricks.mixin import TricksMixin

        if isinstance(pl_module, TricksMixin):
            pl_module.tricks_check_consumed()
