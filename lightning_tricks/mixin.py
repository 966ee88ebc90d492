"""``TricksMixin``: the seam through which callbacks change the training batch and the loss.

Write ``class Net(TricksMixin, L.LightningModule)``. The mixin gives

* a training-time batch seam: after the batch reaches the device, every trick callback (mixup, ...)
  may transform the inputs, in a fixed order, only while fitting the training batches (never in the
  sanity check, validation, test or predict);
* :meth:`TricksMixin.tricks_loss`: cross-entropy against the targets as the tricks transformed them
  (label smoothing, mixing), computed in float32 whatever the precision. With no trick attached it is
  exactly ``F.cross_entropy(logits, target)``;
* default ``training_step``/``validation_step``/``test_step`` for ``(x, y)`` classification batches,
  logging ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``test_loss`` and ``test_acc``.

A user may override any step and still call ``self.tricks_loss(logits, y)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import RunningStage
from torch import Tensor

from lightning_tricks.functional.targets import _soft_ce_rows, soft_cross_entropy, to_soft_targets

if TYPE_CHECKING:
    from lightning_tricks.callbacks._base import TrickCallback

__all__ = ["TricksMixin"]


class _Plan(NamedTuple):
    """The trick callbacks of one Trainer's callback list, by kind, each in seam order."""

    callbacks: list[Any]  # the Trainer's callback list this plan was made from (by identity, with its length)
    size: int
    batch: list[TrickCallback]
    target: list[TrickCallback]
    target_rest: list[TrickCallback]  # target[1:], for when the first one built the soft targets from indices
    loss: list[TrickCallback]
    eager: bool  # every target trick depends on the batch alone: soft targets may be built in the seam
    tables: dict[Any, Tensor]  # (num_classes, device) -> identity table: one-hot rows by one gather


# The plan lives on the Trainer (the seam and the loss read it every training step), not on the module, so that deep
# copies and pickles of the module (EMA, SWA) do not carry the callbacks.
_PLAN_ATTR = "_lightning_tricks_plan"
_TRAINING = RunningStage.TRAINING  # a module constant: an Enum member lookup costs a metaclass call each time
# Per stage of the default steps: the logged keys, and whether it is an evaluation stage (progress bar, synced).
_STEP_KEYS = {"train": ("train_loss", "train_acc", False), "val": ("val_loss", "val_acc", True),
              "test": ("test_loss", "test_acc", True)}


def _make_plan(trainer: Any) -> _Plan:
    """Sort ``trainer.callbacks``' tricks by kind and keep the plan on the Trainer."""
    from lightning_tricks.callbacks._base import TrickCallback

    callbacks = trainer.callbacks
    tricks = sorted((cb for cb in callbacks if isinstance(cb, TrickCallback)), key=lambda cb: cb.order)
    target = [cb for cb in tricks if cb.transforms_target]
    plan = _Plan(callbacks, len(callbacks), [cb for cb in tricks if cb.transforms_batch], target, target[1:],
                 [cb for cb in tricks if cb.transforms_loss],
                 any(cb.transforms_target for cb in tricks)
                 and all(cb.targets_before_forward for cb in tricks if cb.transforms_target), {})
    trainer.__dict__[_PLAN_ATTR] = plan
    return plan


def _gather_rows(table: Tensor, target: Tensor) -> Tensor:
    try:
        return table.index_select(0, target)
    except (IndexError, RuntimeError):
        return to_soft_targets(target, table.shape[0], None)  # raises its clear out-of-range error


class TricksMixin:
    """Mix into a ``LightningModule`` (put it first: ``class Net(TricksMixin, L.LightningModule)``).

    Attributes:
        ignore_index: index targets equal to it are left out of the loss and the accuracy; ``None`` (the
            default) means every sample counts (without tricks the loss is then ``F.cross_entropy``, which still
            ignores PyTorch's default ``-100``). Set it for padding, e.g. ``ignore_index = -100``.
    """

    ignore_index: int | None = None
    #: Show the step's ``train_loss`` in the progress bar. Off by default: Lightning converts progress-bar values
    #: with ``.item()`` on every step, a host-device sync per step on a GPU.
    tricks_progress_bar_loss: bool = False
    #: Set by :meth:`tricks_loss`: the effective targets (indices or float32 soft targets) and, when known without
    #: an argmax, the dominant class of each (an index tensor; ``None`` otherwise).
    tricks_targets: Tensor
    tricks_hard_targets: Tensor | None = None

    # ----------------------------------------------------------------------------------- helpers
    def _train_plan(self) -> _Plan | None:
        """The cached plan while fitting a training batch, else ``None``."""
        trainer = self.__dict__.get("_trainer")
        # `trainer.training and not trainer.sanity_checking`, by identity: those properties compare through a
        # Python-level StrEnum __eq__, and this runs twice per step. The TRAINING stage is never the sanity check.
        if trainer is None or trainer.state.stage is not _TRAINING:
            return None
        # The plan for `trainer.callbacks`, remade when the list is replaced or changes length.
        plan = trainer.__dict__.get(_PLAN_ATTR)
        callbacks = trainer.callbacks
        if plan is None or plan.callbacks is not callbacks or plan.size != len(callbacks):
            plan = _make_plan(trainer)
        return plan

    def tricks_unpack(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Split a batch into ``(inputs, targets)``. Override for other batch layouts."""
        if isinstance(batch, (list, tuple)) and len(batch) == 2:
            return batch[0], batch[1]
        if isinstance(batch, dict) and {"x", "y"} <= batch.keys():
            return batch["x"], batch["y"]
        shape = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else "")
        raise ValueError(
            f"the default steps of TricksMixin expect a batch `(x, y)` (a list/tuple of 2 tensors) or a dict with "
            f"keys 'x' and 'y', got a {shape}; override `tricks_unpack`/`tricks_pack` or the steps."
        )

    def tricks_pack(self, batch: Any, x: Tensor, y: Tensor) -> Any:
        """Put transformed ``(x, y)`` back into a batch of the same layout as ``batch``."""
        if isinstance(batch, dict):
            return {**batch, "x": x, "y": y}
        return type(batch)((x, y)) if isinstance(batch, tuple) else [x, y]

    # ----------------------------------------------------------------------------------- the seam
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Run the trick callbacks' batch transforms (training batches of ``fit`` only).

        When there are batch tricks and every target trick depends on the batch alone (label smoothing, mixing),
        the soft targets are built here too, right after the batch transforms: the gathers and blends run while
        those kernels are warm (on a CPU the first call of a kernel in a step costs 5-10x the next one).
        :meth:`tricks_loss` takes them when it gets this batch's target tensor and the class count matches.
        """
        batch = super().on_after_batch_transfer(batch, dataloader_idx)  # type: ignore[misc]
        plan = self._train_plan()
        if plan is None:
            return batch
        state = self.__dict__
        state.pop("_tricks_eager", None)  # never a previous batch's
        if not plan.batch:  # (label smoothing alone gains nothing here, and leaves the batch layout free)
            return batch
        x, y = self.tricks_unpack(batch)
        for cb in plan.batch:
            x = cb.tricks_transform_batch(self, x, y)
        num_classes = state.get("_tricks_num_classes")  # from the previous batch's logits
        if plan.eager and num_classes is not None:
            state["_tricks_eager"] = (y, num_classes, *self._tricks_soft_targets(plan, y, num_classes))
        return self.tricks_pack(batch, x, y)

    def _tricks_soft_targets(self, plan: _Plan, target: Tensor, num_classes: int) -> tuple[Tensor, Tensor | None]:
        """The target tricks' float32 soft targets for ``target`` and, when known without an argmax, their dominant
        classes."""
        soft = None
        indices = self.ignore_index is None and not target.is_floating_point() and target.ndim == 1
        if indices:
            # the first trick may build its soft targets straight from the indices (label smoothing: 1 gather)
            soft = plan.target[0].tricks_soft_from_indices(self, target, num_classes)
        rest = plan.target if soft is None else plan.target_rest
        if soft is None and indices:  # one-hot rows by one gather from a cached identity table
            table = plan.tables.get((num_classes, target.device))
            if table is None:
                table = plan.tables[(num_classes, target.device)] = torch.eye(num_classes, device=target.device)
            soft = _gather_rows(table, target)
        elif soft is None:
            soft = to_soft_targets(target, num_classes, self.ignore_index)
        for cb in rest:
            soft = cb.tricks_transform_target(self, soft)
        # The dominant class of each effective target, when every trick can say it without an argmax.
        hard: Tensor | None = target if indices else None
        for cb in plan.target:
            if hard is None:
                break
            hard = cb.tricks_dominant_class(self, hard, num_classes)
        return soft, hard

    def tricks_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy of ``logits`` against ``target`` as the attached tricks transform it.

        While fitting the training batches, trick callbacks turn ``target`` (class indices or soft
        targets) into float32 soft targets (smoothing, mixing) and the loss is
        :func:`~lightning_tricks.functional.soft_cross_entropy` in float32; loss tricks (distillation) then
        combine it with their own term. Otherwise, and whenever no trick is attached, it is
        ``F.cross_entropy(logits, target)``, exactly what a plain module computes. The effective targets are
        kept in ``self.tricks_targets`` for metrics, and their dominant classes in ``self.tricks_hard_targets``
        (class indices, or ``None`` where only an argmax of ``tricks_targets`` can tell).
        """
        plan = self._train_plan()
        # Set through __dict__: nn.Module.__setattr__ looks through parameters, buffers and submodules first.
        state = self.__dict__
        if plan is not None and plan.target:
            num_classes = logits.shape[-1]
            eager = state.pop("_tricks_eager", None)
            if eager is not None and eager[0] is target and eager[1] == num_classes:
                soft, hard = eager[2], eager[3]
            else:
                soft, hard = self._tricks_soft_targets(plan, target, num_classes)
            state["_tricks_num_classes"] = num_classes
            state["tricks_targets"] = soft
            state["tricks_hard_targets"] = hard
            if self.ignore_index is None and logits.ndim == 2 and soft.shape[0] == logits.shape[0]:
                # the soft targets are the plan's own float32 (N, K) rows: the unchecked per-step form
                loss = _soft_ce_rows(logits if logits.dtype is torch.float32 else logits.float(), soft)
            else:
                loss = soft_cross_entropy(logits, soft, self.ignore_index)
        else:
            state["tricks_targets"] = target
            if target.is_floating_point():
                state["tricks_hard_targets"] = None
                loss = soft_cross_entropy(logits, target, self.ignore_index)
            else:
                state["tricks_hard_targets"] = target
                if self.ignore_index is None:
                    loss = F.cross_entropy(logits, target)
                else:
                    loss = F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        if plan is not None and plan.loss:
            for cb in plan.loss:
                loss = cb.tricks_transform_loss(self, logits, state["tricks_targets"], loss)
        return loss

    # ----------------------------------------------------------------------------------- default steps
    def _tricks_step(self, batch: Any, stage: str) -> Tensor:
        x, y = self.tricks_unpack(batch)
        logits = self(x)  # type: ignore[operator]
        loss = self.tricks_loss(logits, y)
        # Accuracy against the dominant class of the effective (possibly mixed) target: said by the tricks when
        # they can (no argmax over the soft targets), else the argmax.
        hard = self.tricks_hard_targets
        if hard is None:
            target = self.tricks_targets
            hard = target.argmax(dim=-1) if target.is_floating_point() else target
        correct = (logits.argmax(dim=-1) == hard).float()
        if self.ignore_index is None:
            acc = correct.mean()
        else:
            active = hard != self.ignore_index
            acc = (correct * active).sum() / active.sum().clamp_min(1)
        loss_key, acc_key, evaluating = _STEP_KEYS[stage]  # (constants: this runs every step)
        n = x.shape[0]
        self.log(loss_key, loss, prog_bar=evaluating or self.tricks_progress_bar_loss, on_step=not evaluating,
                 on_epoch=True, sync_dist=evaluating, batch_size=n)  # type: ignore[attr-defined]
        self.log(acc_key, acc, prog_bar=evaluating, on_step=False, on_epoch=True, sync_dist=evaluating,
                 batch_size=n)  # type: ignore[attr-defined]
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Forward, :meth:`tricks_loss`, log ``train_loss`` and ``train_acc``."""
        return self._tricks_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Forward, plain cross-entropy, log ``val_loss`` and ``val_acc`` (synced across ranks)."""
        return self._tricks_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Forward, plain cross-entropy, log ``test_loss`` and ``test_acc`` (synced across ranks)."""
        return self._tricks_step(batch, "test")
