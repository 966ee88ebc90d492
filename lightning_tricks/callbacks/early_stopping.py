"""Lightning's EarlyStopping, plus Keras' ``restore_best_weights``, ``start_from_epoch`` and ``baseline``."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_tricks._compat import EarlyStoppingChecks, writes_sharded_checkpoint
from lightning_tricks._io import checkpoint_dir
from lightning_tricks._sharded_state import add_shards, load_shards
from lightning_tricks._sharding import agree_on_buffers, is_sharded
from lightning_tricks.functional._checks import check_number
from lightning_tricks.peers import ChoosesFinalWeights, EvaluatesOtherWeights, find_callbacks
from lightning_tricks.weights import copy_weights, restore_weights

_MAX_WORDS = ("acc", "f1", "auroc", "auc", "precision", "recall", "iou", "dice", "map")
_MIN_WORDS = ("loss", "error", "err", "mse", "mae", "nll", "perplexity")


def mode_from_name(monitor: str) -> str | None:
    """``"max"`` for accuracy-like metric names, ``"min"`` for loss-like ones, ``None`` when the name does not say."""
    words = [w for w in monitor.lower().replace("/", "_").replace("-", "_").replace(".", "_").split("_") if w]
    says_max = any(w.startswith(_MAX_WORDS) or w.endswith(("acc", "accuracy")) for w in words)
    says_min = any(w in _MIN_WORDS or w.endswith("loss") for w in words)
    if says_max == says_min:
        return None
    return "max" if says_max else "min"


def infer_mode(monitor: str, mode: str | None) -> str:
    """``mode`` if given (``"min"``/``"max"``), else the one the metric's name says, else a clear error."""
    if mode is not None:
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` must be 'min' or 'max', got {mode!r}.")
        return mode
    found = mode_from_name(monitor)
    if found is None:
        raise ValueError(
            f"cannot tell from the metric's name {monitor!r} whether higher or lower is better: pass `mode='max'` "
            "(accuracy-like) or `mode='min'` (loss-like)."
        )
    return found


class EarlyStopping(ChoosesFinalWeights, EarlyStoppingChecks):
    r"""A drop-in for :class:`lightning.pytorch.callbacks.EarlyStopping` that can also keep the best model.

    Every argument of Lightning's class is accepted in the same order and means the same (``monitor``,
    ``min_delta``, ``patience``, ``mode``, ``strict``, ``check_finite``, ``stopping_threshold``,
    ``divergence_threshold``, ``check_on_train_epoch_end``, ``log_rank_zero_only``; the ``state_key``, the any-rank
    DDP decision and resume), except that ``mode`` is inferred from an accuracy-like name (below).
    New, as Keras users know them:

    Args:
        restore_best_weights: when training stops, and at the end of fit, copy the weights of the best check back
            into the module (with :class:`EMA` or :class:`SWA` evaluating on their average, the averaged weights that
            were evaluated). They are kept on the host (CPU copies, no second copy on the device), taken at the same
            checks on every rank (rank 0 decides), and saved in the callback's checkpoint state so a resumed run
            can still restore them (checkpoints grow by one copy of the weights). Under sharded training (FSDP2)
            each rank keeps its own shards (no gather) and restores them; each rank writes them into the distributed
            checkpoint beside the module's shards and reads them back on resume.
        start_from_epoch: no check counts before this epoch (0-based): neither patience nor the best score.
        baseline: the metric must beat this value (by ``min_delta``) to reset the patience: stop if it does not
            within ``patience`` checks. The best weights are still tracked below the baseline (as Keras does).
        checkpoint_on_stop: when it stops training, write a checkpoint (after restoring the best weights, if asked)
            as ``early_stopping-epoch=<E>.ckpt`` in ``checkpoint_dir`` (default: the Trainer's ``log_dir``), so that
            nothing trained is lost even without a ``ModelCheckpoint``; its path is in ``checkpoint_path``.
        checkpoint_dir: where that checkpoint goes.

    ``mode``, when not given, is inferred from the metric's name: names with ``acc``, ``f1``, ``auroc``, ``auc``,
    ``precision``, ``recall``, ``iou``, ``dice`` or ``map`` are maximised; any other name is minimised, Lightning's
    default (an info message says so when the name does not read as a loss: ``loss``, ``error``, ``err``, ``mse``,
    ``mae``, ``nll``, ``perplexity``). The mode used is in ``mode``; a bad one raises Lightning's own error.

    Whenever it stops it says why, with the best score and its epoch (``rank_zero_info``; also in
    ``stopping_reason_message`` and ``summary``).

    Example::

        EarlyStopping("val_loss", patience=10, restore_best_weights=True)
    """

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str | None = None,
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
        baseline: float | None = None,
        checkpoint_on_stop: bool = True,
        checkpoint_dir: str | None = None,
    ) -> None:
        check_number("patience", patience, low=0, integer=True)
        check_number("min_delta", min_delta)
        if mode is None:  # Lightning's default is "min"; an accuracy-like name says "max"
            mode = mode_from_name(monitor)
            if mode is None:
                mode = "min"
                rank_zero_info(f"EarlyStopping: minimising {monitor!r} (Lightning's default mode); pass mode='max' if "
                               "higher is better.")
        super().__init__(
            monitor=monitor,
            min_delta=min_delta,
            patience=patience,
            verbose=verbose,
            mode=mode,
            strict=strict,
            check_finite=check_finite,
            stopping_threshold=stopping_threshold,
            divergence_threshold=divergence_threshold,
            check_on_train_epoch_end=check_on_train_epoch_end,
            log_rank_zero_only=log_rank_zero_only,
        )
        check_number("start_from_epoch", start_from_epoch, low=0, integer=True)
        if baseline is not None:
            check_number("baseline", baseline)
        self.restore_best_weights = restore_best_weights
        self.checkpoint_on_stop = checkpoint_on_stop
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_path: str | None = None
        self.start_from_epoch = start_from_epoch
        self.baseline = None if baseline is None else float(baseline)
        self.best_epoch: int | None = None
        self.best_weights: dict[str, Tensor] | None = None
        self.summary: str | None = None
        self._sharded = False
        self._sharded_checkpoints = False
        self._checkpoint_path: str | Path | None = None

    # ------------------------------------------------------------------ the check
    @override
    def run_check(self, trainer: pl.Trainer) -> None:
        if trainer.current_epoch < self.start_from_epoch:
            return
        previous_best = self.best_score
        was_stopping = trainer.should_stop
        super().run_check(trainer)
        improved = self.best_score is not previous_best  # Lightning rebinds best_score on an improvement
        if trainer.world_size > 1:  # one decision for every rank, so all keep the same weights
            improved = bool(trainer.strategy.broadcast(improved, src=0))
        if improved:
            self.best_epoch = trainer.current_epoch
            if self.restore_best_weights:
                self.best_weights = copy_weights(self._evaluated_state(trainer), "cpu")
        if trainer.should_stop and not was_stopping and self.stopped_epoch == trainer.current_epoch:
            self._on_stop(trainer)

    @override
    def chooses_final_weights(self) -> bool:
        return self.restore_best_weights and self.best_weights is not None

    @staticmethod
    def _evaluated_state(trainer: pl.Trainer) -> dict[str, Tensor]:
        """The weights the monitored metric was measured on: the average of an :class:`EMA`/:class:`SWA` that
        evaluates on it, else the module's own."""
        module = trainer.lightning_module
        for cb in find_callbacks(trainer, EvaluatesOtherWeights):
            weights = cb.evaluated_state_dict(module)
            if weights is not None:
                return weights
        return module.state_dict()

    @override
    def evaluate_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        previous_wait = self.wait_count
        previous_best = self.best_score
        should_stop, reason = super().evaluate_criteria(current)
        improved = self.best_score is not previous_best
        if improved and self.baseline is not None and not self._beats_baseline(current):
            # Keras: a new best that does not beat the baseline does not reset the patience.
            self.wait_count = previous_wait + 1
            if self.wait_count >= self.patience:
                should_stop = True
                self.stopping_reason = type(self.stopping_reason).PATIENCE_EXHAUSTED
                reason = (
                    f"Monitored metric {self.monitor} did not beat the baseline {self.baseline} in the last "
                    f"{self.wait_count} records. Best score: {float(self.best_score):.3f}. Signaling Trainer to stop."
                )
        return should_stop, reason

    def _beats_baseline(self, current: Tensor) -> bool:
        assert self.baseline is not None
        value = float(current) - float(self.min_delta)
        return value > self.baseline if self.mode == "max" else value < self.baseline

    # ------------------------------------------------------------------ stopping and restoring
    def _on_stop(self, trainer: pl.Trainer) -> None:
        best = float(self.best_score)
        where = f" at epoch {self.best_epoch}" if self.best_epoch is not None else ""
        self._restore(trainer)
        saved = ""
        if self.checkpoint_on_stop:
            folder = checkpoint_dir(trainer, self.checkpoint_dir)
            self.checkpoint_path = os.path.join(folder, f"early_stopping-epoch={trainer.current_epoch}.ckpt")
            trainer.save_checkpoint(self.checkpoint_path)  # every rank calls it: the stop decision is reduced
            saved = f" Checkpoint: {self.checkpoint_path}."
        self.summary = (
            f"EarlyStopping stopped training at epoch {trainer.current_epoch}: {self.stopping_reason_message} "
            f"Best {self.monitor} = {best:.4g}{where}."
            + (" The best weights are restored." if self.restore_best_weights and self.best_weights else "")
            + saved
        )
        rank_zero_info(self.summary)

    def _restore(self, trainer: pl.Trainer) -> None:
        if not self.restore_best_weights or self.best_weights is None:
            return
        restore_weights(trainer.lightning_module, self.best_weights, owner="EarlyStopping")
        agree_on_buffers(trainer.lightning_module)  # DDP: the best check's statistics as rank 0 took them

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._sharded_checkpoints = writes_sharded_checkpoint(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sharded = is_sharded(list(pl_module.parameters()))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # At the end of fit the module holds the best weights, whether or not this callback stopped it.
        if self.restore_best_weights and self.best_weights is not None:
            self._restore(trainer)
            if self.summary is None:
                rank_zero_info(
                    f"EarlyStopping: training ended at epoch {trainer.current_epoch}; restored the weights of the best "
                    f"check, {self.monitor} = {float(self.best_score):.4g} at epoch {self.best_epoch}."
                )

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["best_epoch"] = self.best_epoch
        if self.restore_best_weights and not self._sharded:
            state["best_weights"] = self.best_weights
        elif self.restore_best_weights and self.best_weights is not None and self._sharded_checkpoints:
            state["best_weights_in_shards"] = True  # each rank's shards: see on_save_checkpoint
        return state

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Sharded: every rank writes its shards of the best weights beside the module's (Lightning writes the rest
        # of a callback's state from rank 0 only)
        if self.restore_best_weights and self.best_weights is not None and self._sharded and \
                self._sharded_checkpoints:
            add_shards(checkpoint, self.state_key, self.best_weights, pl_module.state_dict())

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._checkpoint_path = trainer.ckpt_path

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_epoch = state_dict.get("best_epoch")
        self._shards_pending = self.restore_best_weights and bool(state_dict.get("best_weights_in_shards"))
        if self.restore_best_weights:
            self.best_weights = state_dict.get("best_weights")
        if self.best_weights is None and self.restore_best_weights and not self._shards_pending and \
                math.isfinite(float(self.best_score)):
            rank_zero_warn(
                "EarlyStopping(restore_best_weights=True) resumed from a checkpoint without best weights (written "
                "without restore_best_weights, or under sharded training without a distributed checkpoint): the best "
                "weights from before the resume cannot be restored; only a check that beats the restored best score "
                "will be."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.__dict__.pop("_shards_pending", False):  # after the restore on every strategy; every rank together
            like = pl_module.state_dict()
            assert self._checkpoint_path is not None  # set by on_load_checkpoint
            loaded = load_shards(self._checkpoint_path, self.state_key, list(like), like)
            self.best_weights = copy_weights(loaded, "cpu")


