"""``TricksMixin``: the seam through which callbacks change the training batch and the loss.

Write ``class Net(TricksMixin, L.LightningModule)``. The mixin gives

* a batch seam: once a training batch of ``fit`` reaches the device, the mixin turns its targets into float32
  ``(N, K)`` soft targets and hands ``(x, soft_y)`` to each trick callback's ``transform_batch`` (label smoothing,
  mixup), in ascending ``order``. The training step then receives ``(x, soft_y)``. Nothing happens in the sanity check,
  validation, test or predict, nor when no trick callback changes the batch;
* :meth:`TricksMixin.tricks_loss`: cross-entropy of the logits against the targets it is given (class indices or soft
  targets), in float32 for soft targets, then each trick's ``transform_loss`` (distillation). With no trick attached
  it is exactly ``F.cross_entropy(logits, target)``;
* default ``training_step``/``validation_step``/``test_step`` for ``(x, y)`` classification batches, logging
  ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``test_loss`` and ``test_acc``.

A user may override any step and still call ``self.tricks_loss(logits, y)``. A training batch that a trick changed
and that never reached ``tricks_loss`` is an error (its targets would be left unmixed).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from lightning.pytorch.trainer.states import RunningStage
from torch import Tensor

from lightning_tricks._compat import attached_trainer
from lightning_tricks.functional.targets import soft_cross_entropy, to_soft_targets

if TYPE_CHECKING:
    from lightning_tricks.callbacks._base import TrickCallback

__all__ = ["TricksMixin"]

# Lightning warns whenever a module that overrides on_after_batch_transfer is fitted with a DataModule, to say that
# the module's hook is used; for the mixin that is the intent (a DataModule that overrides it too is an error raised
# by the trick callbacks, see TrickCallback.setup), so this one message is silenced.
warnings.filterwarnings(
    "ignore", message="You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a"
)

# Per stage of the default steps: the logged keys, and whether it is an evaluation stage (progress bar, synced).
_STEP_KEYS = {"train": ("train_loss", "train_acc", False), "val": ("val_loss", "val_acc", True),
              "test": ("test_loss", "test_acc", True)}
_OUT_OF_SCOPE = (
    "The default loss is a softmax cross-entropy for single-label classification (class indices, or class "
    "probabilities whose rows sum to 1). For regression, binary with one logit or multi-label targets, write your own "
    "training_step with your loss: WarmupCosine, GradientMonitor, EarlyStopping and TrainingDoctor work with any loss; "
    "LabelSmoothing, Mixup and Distillation need tricks_loss."
)


class TricksMixin:
    """Mix into a ``LightningModule`` (put it first: ``class Net(TricksMixin, L.LightningModule)``).

    Attributes:
        num_classes: the class count ``K`` of the soft targets that batch tricks (label smoothing, mixup) need before
            the forward pass. Set it on the module (``self.num_classes = 10``, or a ``num_classes`` hyper-parameter),
            or pass ``num_classes`` to one of those callbacks.
        ignore_index: index targets equal to it are left out of the loss and the accuracy; ``None`` (the default)
            means every sample counts (without tricks the loss is then ``F.cross_entropy``, which still ignores
            PyTorch's default ``-100``). Set it for padding, e.g. ``ignore_index = -100``.
        tricks_progress_bar_loss: show the step's ``train_loss`` in the progress bar. Off by default: Lightning
            reads progress-bar values on the host every step (a host-device sync per step on a GPU).
    """

    num_classes: int | None = None
    ignore_index: int | None = None
    tricks_progress_bar_loss: bool = False

    # ----------------------------------------------------------------------------------- which tricks, which K
    def tricks_callbacks(self) -> list[TrickCallback]:
        """The trick callbacks of ``trainer.callbacks`` in seam order, while fitting a training batch; else ``[]``."""
        from lightning_tricks.callbacks._base import TrickCallback

        trainer = attached_trainer(self)  # type: ignore[arg-type]
        # `trainer.training and not trainer.sanity_checking`, by identity (those properties compare strings through
        # Lightning's enum __eq__, twice per step here): the training stage is never the sanity check.
        if trainer is None or trainer.state.stage is not RunningStage.TRAINING:
            return []
        return sorted((cb for cb in trainer.callbacks if isinstance(cb, TrickCallback)), key=lambda cb: cb.order)

    def tricks_num_classes(self, tricks: list[TrickCallback]) -> int:
        """The class count for the soft targets: a trick's ``num_classes`` argument, else the module's."""
        for cb in tricks:
            if getattr(cb, "num_classes", None) is not None:
                return int(cb.num_classes)  # type: ignore[attr-defined]
        k = self.num_classes
        if k is None:
            hparams = getattr(self, "hparams", {})
            k = hparams.get("num_classes") if hasattr(hparams, "get") else None
        if k is None:
            names = ", ".join(type(cb).__name__ for cb in tricks if cb.has_batch_transform)
            raise ValueError(
                f"{names} build soft targets before the forward pass and need the class count: set `num_classes` on "
                f"the module (`self.num_classes = 10`, or a `num_classes` hyper-parameter) or pass it to the callback "
                "(`LabelSmoothing(0.1, num_classes=10)`). If your loss is not a softmax cross-entropy over classes "
                "(regression, binary with one logit, multi-label), leave them out: `recipe(label_smoothing=0, "
                "mixup=None)`."
            )
        return int(k)

    # ----------------------------------------------------------------------------------- batch layout
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

    # ----------------------------------------------------------------------------------- soft targets
    def tricks_soft_targets(self, target: Tensor, num_classes: int) -> Tensor:
        """The float32 ``(N, K)`` soft targets of ``target`` (class indices, or class probabilities): the one place
        they are built. Rows of ``ignore_index`` are all zero."""
        if target.is_floating_point():
            self._tricks_check_probabilities(target, num_classes)
            return target.float()
        if target.ndim != 1:
            raise ValueError(f"class-index targets must have shape (N,), got {tuple(target.shape)}. {_OUT_OF_SCOPE}")
        return to_soft_targets(target, num_classes, self.ignore_index)

    def _tricks_check_probabilities(self, target: Tensor, num_classes: int) -> None:
        """Float targets must be ``(N, K)`` class probabilities: the shape on every call, the row sums (a host read)
        once per fit (the flag is reset by the trick callbacks' ``setup``)."""
        if target.ndim != 2 or target.shape[-1] != num_classes:
            raise ValueError(
                f"float targets must be class probabilities of shape (N, {num_classes}), got a {target.dtype} tensor "
                f"of shape {tuple(target.shape)}. {_OUT_OF_SCOPE}"
            )
        if self.__dict__.get("_tricks_rows_checked"):
            return
        sums = target.float().sum(dim=-1)
        low = 0.0 if self.ignore_index is not None else 1.0 - 1e-3  # ignored samples are all-zero rows
        bad = (sums < low) | (sums > 1.0 + 1e-3) | (target < 0).any(dim=-1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"float targets must be class probabilities (non-negative rows that sum to 1), but row {row} sums to "
                f"{float(sums[row]):.4g}: multi-label 0/1 targets are not soft targets. {_OUT_OF_SCOPE}"
            )
        self.__dict__["_tricks_rows_checked"] = True

    # ----------------------------------------------------------------------------------- the seam
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Run the trick callbacks' batch transforms on a training batch of ``fit``."""
        batch = super().on_after_batch_transfer(batch, dataloader_idx)  # type: ignore[misc]
        state = self.__dict__  # plain attributes: nn.Module.__setattr__ would look through parameters first
        state["_tricks_x"], state["_tricks_pending"] = None, False
        tricks = self.tricks_callbacks()
        if not tricks:
            return batch
        x, y = self.tricks_unpack(batch)
        state["_tricks_x"] = x  # the inputs the model sees, for the loss transforms
        batch_tricks = [cb for cb in tricks if cb.has_batch_transform]
        if not batch_tricks:
            return batch
        soft_y = self.tricks_soft_targets(y, self.tricks_num_classes(tricks))
        for cb in batch_tricks:
            x, soft_y = cb.transform_batch(self, x, soft_y)
        state["_tricks_x"], state["_tricks_pending"] = x, True
        return self.tricks_pack(batch, x, soft_y)

    def tricks_check_consumed(self) -> None:
        """Raise if the current training batch was changed by a trick and its loss did not go through
        :meth:`tricks_loss` (called by the trick callbacks before backward)."""
        if self.__dict__.get("_tricks_pending"):
            self.__dict__["_tricks_pending"] = False
            names = ", ".join(type(cb).__name__ for cb in self.tricks_callbacks() if cb.has_batch_transform)
            raise RuntimeError(
                f"{names} changed this training batch (its inputs and soft targets), but its loss was not computed "
                "with `self.tricks_loss(logits, y)`: the targets your loss used may not match the mixed inputs. "
                f"Compute the loss with `self.tricks_loss(self(x), y)` in training_step, or remove {names}. "
                f"{_OUT_OF_SCOPE}"
            )

    # ----------------------------------------------------------------------------------- the loss
    def tricks_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy of ``logits`` against ``target``, then the trick callbacks' loss transforms.

        ``target`` is class indices ``(N,)`` (then ``F.cross_entropy(logits, target)``, exactly what a plain module
        computes) or float class probabilities ``(N, K)``, as the batch seam hands them to the training step (then
        the cross-entropy is computed in float32 whatever the precision). While fitting the training batches, loss
        tricks (distillation) then combine it with their own terms.
        """
        if logits.ndim < 2 or logits.shape[-1] < 2:
            raise ValueError(
                f"tricks_loss takes (N, K) logits with K >= 2 classes, got shape {tuple(logits.shape)}. {_OUT_OF_SCOPE}"
            )
        num_classes = logits.shape[-1]
        if target.is_floating_point():
            if target.ndim == 2 and target.shape[0] == logits.shape[0] and target.shape[-1] != num_classes:
                raise ValueError(
                    f"the soft targets have {target.shape[-1]} classes (`num_classes`) but the head outputs "
                    f"{num_classes} logits: they must match."
                )
            self._tricks_check_probabilities(target, num_classes)
            loss = soft_cross_entropy(logits, target, self.ignore_index)
        else:
            loss = soft_cross_entropy(logits, target, self.ignore_index) if self.ignore_index is not None \
                else _index_cross_entropy(logits, target)
        self.__dict__["_tricks_pending"] = False
        tricks = [cb for cb in self.tricks_callbacks() if cb.has_loss_transform]
        if tricks:
            soft_y = target.float() if target.is_floating_point() else self.tricks_soft_targets(target, num_classes)
            x = self.__dict__.get("_tricks_x")
            for cb in tricks:
                loss = cb.transform_loss(self, x, logits, soft_y, loss)
        return loss

    # ----------------------------------------------------------------------------------- default steps
    def _tricks_step(self, batch: Any, stage: str) -> Tensor:
        x, y = self.tricks_unpack(batch)
        logits = self(x)  # type: ignore[operator]
        loss = self.tricks_loss(logits, y)
        # Accuracy against the dominant class of the (possibly mixed) target.
        hard = y.argmax(dim=-1) if y.is_floating_point() else y
        correct = (logits.argmax(dim=-1) == hard).float()
        if self.ignore_index is None:
            acc = correct.mean()
        else:
            active = y.sum(dim=-1) > 0 if y.is_floating_point() else hard != self.ignore_index
            acc = (correct * active).sum() / active.sum().clamp_min(1)
        loss_key, acc_key, evaluating = _STEP_KEYS[stage]
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


def _index_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """``F.cross_entropy(logits, target)``; a target outside the head's classes gets an error that names both."""
    try:
        return F.cross_entropy(logits, target)
    except (IndexError, RuntimeError) as error:
        if target.ndim == 1 and target.numel() and logits.ndim == 2:
            bad = target[(target < 0) | (target >= logits.shape[-1])]
            if bad.numel():
                raise ValueError(
                    f"target class {int(bad[0])} is out of range for logits of {logits.shape[-1]} classes: class "
                    f"indices must be in [0, {logits.shape[-1]}). Does the head have fewer outputs than the data has "
                    "classes?"
                ) from None
        raise error

