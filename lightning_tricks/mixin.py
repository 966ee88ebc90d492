"""``TricksMixin``: the seam through which callbacks change the training inputs and the loss.

Write ``class Net(TricksMixin, L.LightningModule)`` (or ``class Net(TricksMixin, TheirModule)``). The mixin gives

* a batch seam: once a training batch of ``fit`` reaches the device, each trick callback's ``transform_batch`` may
  change the inputs (mixup) and records in a :class:`~lightning_tricks.functional.TargetPlan` what happens to the
  targets in the loss (label smoothing, the mixing partners and weights). **The targets stay the user's**: the
  training step receives them as the loader gave them (same values, dtype and shape), so its own metrics work.
  Nothing happens in the sanity check, validation, test or predict;
* :meth:`TricksMixin.tricks_loss`: the cross-entropy of the logits against the targets under the batch's plan
  (:func:`~lightning_tricks.functional.cross_entropy`: from class indices of any shape torch takes, one
  log-softmax, no ``(N, K)`` target), then each trick's ``transform_loss`` (distillation). With no trick attached it
  is exactly ``F.cross_entropy(logits, target, ignore_index=ignore_index)``;
* default ``training_step``/``validation_step``/``test_step`` for ``(x, y)`` classification batches, logging
  ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``test_loss`` and ``test_acc``, for modules that have
  none: a step defined by a class after the mixin (``TheirModule.training_step``) is the one that runs.

A training batch that a trick acted on and whose loss never reached ``tricks_loss`` is an error (the tricks would be
silently left out).
"""

from __future__ import annotations

from typing import Any, cast

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import RunningStage
from torch import Tensor

from lightning_tricks._compat import attached_trainer
from lightning_tricks.functional.targets import TargetPlan, class_dim_of, cross_entropy
from lightning_tricks.peers import find_callbacks
from lightning_tricks.trick import TrickCallback

__all__ = ["TricksMixin"]

# Per stage of the default steps: the logged keys, and whether it is an evaluation stage (progress bar, synced).
_STEP_KEYS = {"train": ("train_loss", "train_acc", False), "val": ("val_loss", "val_acc", True),
              "test": ("test_loss", "test_acc", True)}
_STEPS = ("training_step", "validation_step", "test_step")
_NO_PLAN = TargetPlan()
_OUT_OF_SCOPE = (
    "The tricks' loss is a softmax cross-entropy over classes (class indices of any shape torch's cross-entropy "
    "takes, or class probabilities). For regression, binary with one logit or multi-label targets, keep your own "
    "loss and leave LabelSmoothing, Mixup and Distillation out (`recipe(label_smoothing=0, mixup=None)`): "
    "WarmupCosine, GradientMonitor, EarlyStopping, EMA/SWA and TrainingDoctor work with any loss."
)


class TricksMixin:
    """Mix into a ``LightningModule`` (put it first: ``class Net(TricksMixin, L.LightningModule)``).

    Attributes:
        num_classes: optional. The class count is read from the logits; when the module says it (an attribute, or
            a ``num_classes`` hyper-parameter), a head with another count is an error.
        ignore_index: index targets equal to it count nowhere (loss and accuracy), as in ``F.cross_entropy``;
            PyTorch's ``-100`` by default; ``None`` makes every target count.
        tricks_progress_bar_loss: show the step's ``train_loss`` in the progress bar. Off by default: Lightning
            reads progress-bar values on the host every step (a host-device sync per step on a GPU).
    """

    num_classes: int | None = None
    ignore_index: int | None = -100
    tricks_progress_bar_loss: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_method_order(cls)
        _adopt_existing_steps(cls)

    # ----------------------------------------------------------------------------------- which tricks
    def tricks_callbacks(self) -> list[TrickCallback]:
        """The trick callbacks of ``trainer.callbacks`` in seam order, while fitting a training batch; else ``[]``."""
        trainer = attached_trainer(self)  # type: ignore[arg-type]
        # `trainer.training and not trainer.sanity_checking`, by identity (those properties compare strings through
        # Lightning's enum __eq__, twice per step here): the training stage is never the sanity check.
        if trainer is None or trainer.state.stage is not RunningStage.TRAINING:
            return []
        return sorted(find_callbacks(trainer, TrickCallback), key=lambda cb: cb.order)

    # ----------------------------------------------------------------------------------- batch layout
    def tricks_unpack(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Split a batch into ``(inputs, targets)``. Override for other batch layouts."""
        if isinstance(batch, (list, tuple)) and len(batch) == 2:
            return batch[0], batch[1]
        if isinstance(batch, dict) and {"x", "y"} <= batch.keys():
            return batch["x"], batch["y"]
        shape = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else "")
        raise ValueError(
            f"TricksMixin expects a batch `(x, y)` (a list/tuple of 2 tensors) or a dict with keys 'x' and 'y', got "
            f"a {shape}. Write your own training_step for it (call `self.tricks_loss(logits, y)` where label "
            "smoothing or distillation should apply), or override `tricks_unpack`/`tricks_pack`; tricks that need "
            "(x, y) samples (Mixup, Distillation) do not fit batches that are not (RL transitions, say): leave them "
            "out (`recipe(label_smoothing=0, mixup=None)`)."
        )

    def tricks_pack(self, batch: Any, x: Tensor, y: Tensor) -> Any:
        """Put transformed inputs ``x`` (and the unchanged ``y``) back into a batch of ``batch``'s layout."""
        if isinstance(batch, dict):
            return {**batch, "x": x, "y": y}
        return type(batch)((x, y)) if isinstance(batch, tuple) else [x, y]

    def tricks_inputs(self) -> Tensor:
        """The inputs of the current training batch, as the model sees them (after the batch tricks)."""
        x = self.__dict__.get("_tricks_x")
        if x is None:
            raise RuntimeError(
                "no training inputs are known for this batch: the batch did not go through TricksMixin's "
                "on_after_batch_transfer as an (x, y) pair (override `tricks_unpack`, and call super() in your "
                "own on_after_batch_transfer)."
            )
        return x

    # ----------------------------------------------------------------------------------- the seam
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Run the trick callbacks' batch transforms on a training batch of ``fit``."""
        batch = super().on_after_batch_transfer(batch, dataloader_idx)  # type: ignore[misc]
        state = self.__dict__  # plain attributes: nn.Module.__setattr__ would look through parameters first
        tricks = self.tricks_callbacks()
        tricks = [cb for cb in tricks if cb.has_batch_transform or cb.has_loss_transform]
        state["_tricks_x"], state["_tricks_plan"], state["_tricks_pending"] = None, _NO_PLAN, bool(tricks)
        state["_tricks_seam"] = True
        if not tricks:
            return batch
        try:
            x, y = self.tricks_unpack(batch)
        except ValueError:
            x, y = None, None  # not an (x, y) pair: tricks that need the inputs say so
        x_in, plan = x, _NO_PLAN
        for cb in tricks:
            if cb.has_batch_transform:
                x, plan = cb.transform_batch(self, x, plan)
        state["_tricks_x"], state["_tricks_plan"] = x, plan
        if x is not x_in:
            return self.tricks_pack(batch, x, y)  # type: ignore[arg-type]
        return batch

    def tricks_check_seam(self, trick: TrickCallback) -> None:
        """Raise if the current training batch did not pass through :meth:`on_after_batch_transfer` (an override
        that does not call ``super()``): the tricks would act on the previous batch's record. Called by the trick
        callbacks at each training batch's start."""
        if not self.__dict__.get("_tricks_seam"):
            raise RuntimeError(
                f"{type(trick).__name__} acts through TricksMixin.on_after_batch_transfer, but this training batch "
                f"did not pass through it: {type(self).__name__}.on_after_batch_transfer must call "
                "`batch = super().on_after_batch_transfer(batch, dataloader_idx)`."
            )

    def tricks_check_consumed(self) -> None:
        """Raise if tricks act on the current training batch and its loss did not go through :meth:`tricks_loss`
        (called by the trick callbacks before backward)."""
        state = self.__dict__
        state["_tricks_seam"] = False  # the next batch must pass through the seam again
        if state.get("_tricks_pending"):
            state["_tricks_pending"] = False
            names = ", ".join(type(cb).__name__ for cb in self.tricks_callbacks()
                              if cb.has_batch_transform or cb.has_loss_transform)
            raise RuntimeError(
                f"{names}: the training loss must go through `self.tricks_loss(logits, y)`, which applies them, but "
                "this step's loss did not, so they would be silently left out (and mixed inputs trained against "
                f"unmixed targets). Compute the loss with `self.tricks_loss(logits, y)` in training_step, or remove "
                f"{names}. {_OUT_OF_SCOPE}"
            )

    # ----------------------------------------------------------------------------------- the loss
    def tricks_loss(self, logits: Tensor, target: Tensor, class_dim: int | None = None) -> Tensor:
        """Cross-entropy of ``logits`` against ``target`` with the tricks of this training batch, then the trick
        callbacks' loss transforms.

        ``target`` is the batch's targets as the loader gave them: class indices of any shape torch's cross-entropy
        takes (``(N,)`` with ``(N, C)`` logits, ``(N, d1, ...)`` with ``(N, C, d1, ...)``, or class-last ``(N, L, C)``
        logits with ``(N, L)`` targets), or class probabilities of the logits' shape. Positions equal to
        ``ignore_index`` count nowhere. Label smoothing and mixing are applied here, computed in float32 from the
        indices (see :func:`~lightning_tricks.functional.cross_entropy`); outside training batches of ``fit`` (and
        with no trick attached) this is ``F.cross_entropy(logits, target, ignore_index=ignore_index)``.

        Args:
            logits: the model's scores.
            target: the targets.
            class_dim: the logits' class dimension, 1 or -1; needed only when both fit (``(N, L, L)`` logits).
        """
        state = self.__dict__
        tricks = self.tricks_callbacks()
        dim = class_dim_of(logits, target, class_dim)
        if logits.shape[dim] < 2:
            raise ValueError(
                f"tricks_loss takes logits with at least 2 classes, got shape {tuple(logits.shape)} (classes on "
                f"dimension {dim}). {_OUT_OF_SCOPE}"
            )
        self._tricks_check_class_count(logits.shape[dim], tricks)
        plan = state.get("_tricks_plan", _NO_PLAN) if tricks else _NO_PLAN
        if target.is_floating_point():
            self._tricks_check_probabilities(target, dim)
        loss = cross_entropy(logits, target, smoothing=plan.smoothing, convention=plan.convention, mix=plan.mix,
                             ignore_index=self.ignore_index, class_dim=dim)
        state["_tricks_pending"] = False
        for cb in tricks:
            if cb.has_loss_transform:
                loss = cb.transform_loss(self, logits, target, loss)
        return loss

    def _tricks_check_class_count(self, found: int, tricks: list[TrickCallback]) -> None:
        """When the module or a trick states the class count, the head must output that many logits."""
        said = [(f"{type(cb).__name__}(num_classes={cb.num_classes})", cb.num_classes)  # type: ignore[attr-defined]
                for cb in tricks if getattr(cb, "num_classes", None) is not None]
        k = self.num_classes
        if k is None:
            hparams = getattr(self, "hparams", None)
            k = hparams.get("num_classes") if hparams is not None and hasattr(hparams, "get") else None
        if k is not None:
            said.append((f"{type(self).__name__}.num_classes = {k}", k))
        for where, count in said:
            if int(count) != found:
                raise ValueError(
                    f"{where}, but the logits have {found} classes: the head's output size and the class count must "
                    "match (the class count is read from the logits; `num_classes` only checks it)."
                )

    def _tricks_check_probabilities(self, target: Tensor, dim: int) -> None:
        """Float targets must be class probabilities: rows that sum to 1, checked once per fit (a host read)."""
        trainer = attached_trainer(self)  # type: ignore[arg-type]
        fit_id = id(trainer)
        if self.__dict__.get("_tricks_rows_checked") == fit_id:
            return
        sums = target.float().sum(dim=dim)
        bad = ((sums - 1.0).abs() > 1e-3) | (target < 0).any(dim=dim)
        if bool(bad.any()):
            worst = float(sums.flatten()[bad.flatten().nonzero()[0, 0]])
            raise ValueError(
                f"float targets must be class probabilities (non-negative, summing to 1 over the classes on dimension "
                f"{dim}), but one sums to {worst:.4g}: multi-label 0/1 targets are not class probabilities. "
                f"{_OUT_OF_SCOPE}"
            )
        self.__dict__["_tricks_rows_checked"] = fit_id

    # ----------------------------------------------------------------------------------- default steps
    def _tricks_step(self, batch: Any, stage: str) -> Tensor:
        x, y = self.tricks_unpack(batch)
        logits = self(x)  # type: ignore[operator]
        loss = self.tricks_loss(logits, y)
        dim = class_dim_of(logits, y)
        hard = y.argmax(dim=dim) if y.is_floating_point() else y
        correct = (logits.argmax(dim=dim) == hard).float()
        if self.ignore_index is None or y.is_floating_point():
            acc = correct.mean()
        else:
            active = hard != self.ignore_index
            acc = (correct * active).sum() / active.sum().clamp_min(1)
        loss_key, acc_key, evaluating = _STEP_KEYS[stage]
        n = x.shape[0]
        log = cast(pl.LightningModule, self).log
        log(loss_key, loss, prog_bar=evaluating or self.tricks_progress_bar_loss, on_step=not evaluating,
            on_epoch=True, sync_dist=evaluating, batch_size=n)
        log(acc_key, acc, prog_bar=evaluating, on_step=False, on_epoch=True, sync_dist=evaluating, batch_size=n)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Forward, :meth:`tricks_loss`, log ``train_loss`` and ``train_acc`` (accuracy against the loader's ``y``)."""
        return self._tricks_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Forward, plain cross-entropy, log ``val_loss`` and ``val_acc`` (synced across ranks)."""
        return self._tricks_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Forward, plain cross-entropy, log ``test_loss`` and ``test_acc`` (synced across ranks)."""
        return self._tricks_step(batch, "test")


def _is_lightning_base(cls: type) -> bool:
    """Lightning's own ``LightningModule`` (and its hook classes): their steps are placeholders, not a user's."""
    return cls.__module__.startswith(("lightning.pytorch.core", "pytorch_lightning.core"))


def _check_method_order(cls: type) -> None:
    """The mixin must come before ``LightningModule`` in the method order, or Lightning's hooks hide its seam."""
    mro = cls.__mro__
    if pl.LightningModule in mro and mro.index(pl.LightningModule) < mro.index(TricksMixin):
        raise TypeError(
            f"{cls.__name__}: TricksMixin must come before LightningModule in the bases (Lightning's own "
            f"on_after_batch_transfer would hide the mixin's): write `class {cls.__name__}(TricksMixin, ...)`, the "
            "mixin first."
        )


def _adopt_existing_steps(cls: type) -> None:
    """Give ``cls`` the steps that a class after the mixin defines (``class Net(TricksMixin, TheirModule)`` runs
    ``TheirModule.training_step``, not the mixin's default). The function itself is taken, so Lightning sees its
    signature (``training_step(self, batch)`` gets no ``batch_idx``)."""
    mro = cls.__mro__
    after = mro[mro.index(TricksMixin) + 1:]
    for name in _STEPS:
        owner = next(k for k in mro if name in vars(k))
        if owner is not TricksMixin:
            continue  # defined before the mixin (by the user's class), or adopted already
        theirs = next((k for k in after if name in vars(k)), None)
        if theirs is not None and not _is_lightning_base(theirs):
            setattr(cls, name, vars(theirs)[name])
