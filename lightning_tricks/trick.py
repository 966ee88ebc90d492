"""``TrickCallback``: the base class of the callbacks that change the training inputs or loss through
:class:`~lightning_tricks.TricksMixin`, and :class:`TricksModule`, what such a callback needs of the module (the
mixin provides it)."""

from __future__ import annotations

from typing import Any, Protocol, cast, runtime_checkable

import lightning.pytorch as pl
from lightning.pytorch.core.datamodule import LightningDataModule
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from typing_extensions import override

from lightning_tricks._compat import silence_module_hook_notice
from lightning_tricks.functional.targets import TargetPlan

__all__ = ["TrickCallback", "TricksModule"]


@runtime_checkable
class TricksModule(Protocol):
    """The module side of the seam, as :class:`~lightning_tricks.TricksMixin` implements it."""

    def tricks_inputs(self) -> Tensor:
        """The inputs of the current training batch, after the batch tricks."""
        ...

    def tricks_loss(self, logits: Tensor, target: Tensor, class_dim: int | None = None) -> Tensor:
        """The training loss under the tricks of this batch."""
        ...

    def tricks_check_seam(self, trick: TrickCallback) -> None:
        """Raise if the current training batch did not pass through the seam."""
        ...

    def tricks_check_consumed(self) -> None:
        """Raise if the tricks acted on this batch and its loss did not go through ``tricks_loss``."""
        ...


class TrickCallback(pl.Callback):
    """A callback that changes the training inputs and/or the training loss through :class:`TricksMixin`.

    A trick implements at most two methods, called on training batches of ``fit`` only (never in the sanity check,
    validation, test or predict), by trick callbacks in ascending ``order``:

    * :meth:`transform_batch` ``(module, x, plan) -> (x, plan)``: once the batch is on the device, the inputs and
      the :class:`~lightning_tricks.functional.TargetPlan` of what happens to this batch's targets in the loss
      (label smoothing records its ``eps``, mixing its partners and weights). The user's targets are never touched:
      the training step receives them as the loader gave them, and :meth:`TricksMixin.tricks_loss` applies the plan.
      ``x`` is ``None`` when the batch is not an ``(x, y)`` pair (see :meth:`TricksMixin.tricks_unpack`);
    * :meth:`transform_loss` ``(module, logits, target, loss) -> loss``: inside :meth:`TricksMixin.tricks_loss`,
      after the cross-entropy under the plan (distillation, a penalty). The inputs the model saw are
      :meth:`TricksMixin.tricks_inputs`.
    """

    #: Position among the trick callbacks (low first): label smoothing 10, mixing 20, distillation 30, L1 40.
    order: int = 0

    def transform_batch(self, pl_module: TricksModule, x: Tensor | None,
                        plan: TargetPlan) -> tuple[Tensor | None, TargetPlan]:
        """Return the training inputs and the plan for the targets, transformed."""
        return x, plan

    def transform_loss(self, pl_module: TricksModule, logits: Tensor, target: Tensor, loss: Tensor) -> Tensor:
        """Return the training loss, given the logits, the targets ``tricks_loss`` got and the loss so far."""
        return loss

    @property
    def has_batch_transform(self) -> bool:
        """Whether this trick acts on the batch (its class overrides :meth:`transform_batch`)."""
        return type(self).transform_batch is not TrickCallback.transform_batch

    @property
    def has_loss_transform(self) -> bool:
        """Whether this trick changes the loss (its class overrides :meth:`transform_loss`)."""
        return type(self).transform_loss is not TrickCallback.transform_loss

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name = type(self).__name__
        if not isinstance(pl_module, TricksModule):
            raise TypeError(
                f"{name} changes the batch or the loss through TricksMixin, but {type(pl_module).__name__} does not "
                f"use it: declare `class {type(pl_module).__name__}(TricksMixin, L.LightningModule)` and compute the "
                "loss with `self.tricks_loss(logits, y)` (or keep the mixin's default training_step)."
            )
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        if datamodule is not None:
            silence_module_hook_notice("on_after_batch_transfer")  # the module's hook is the seam: the intent
        if datamodule is not None and is_overridden("on_after_batch_transfer", datamodule, LightningDataModule):
            # Lightning calls the DataModule's hook *instead of* the module's (it only warns), which would
            # silently skip every trick.
            raise RuntimeError(
                f"{name} needs LightningModule.on_after_batch_transfer, but {type(datamodule).__name__} overrides "
                "on_after_batch_transfer, which makes Lightning skip the module's hook. Move that code to the "
                "module's on_after_batch_transfer (call super() there) or to the DataModule's on_before_batch_transfer."
            )

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.has_batch_transform or self.has_loss_transform:  # then setup made sure the module has the seam
            cast(TricksModule, pl_module).tricks_check_seam(self)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self.has_batch_transform or self.has_loss_transform:
            cast(TricksModule, pl_module).tricks_check_consumed()
