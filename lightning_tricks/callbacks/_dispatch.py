"""Lightning plumbing for cheap per-step hooks: skip the unused ones, read the step counter directly."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

# The hooks Lightning calls once per batch or per optimizer step. Checkpoint and state hooks are left alone: Lightning
# calls some of those directly (``callback.on_save_checkpoint(...)``), not through its dispatcher.
PER_BATCH_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_test_batch_start",
    "on_test_batch_end",
    "on_predict_batch_start",
    "on_predict_batch_end",
)


def skip_unused_batch_hooks(callback: pl.Callback) -> None:
    """Hide the per-batch hooks that ``type(callback)`` inherits unchanged from :class:`~lightning.pytorch.Callback`.

    Lightning's dispatcher (``trainer/call.py: _call_callback_hooks``) calls every hook on every callback: for each it
    builds a profiler context and the callback's ``state_key`` even when the hook is the base class's no-op, a few
    microseconds of host time a call, six calls per training step per callback. It skips an attribute that is not
    callable, so an instance attribute ``None`` over each inherited no-op removes those calls: the six recipe
    callbacks went from 36 dispatches a training step to 3 (``tests/test_dispatch.py`` counts them).

    Only the instance is touched: a subclass that overrides a hook keeps it (the check is on ``type(callback)``), and
    ``super().<hook>(...)`` inside such an override still resolves to the class's method.
    """
    cls = type(callback)
    for name in PER_BATCH_HOOKS:
        if getattr(cls, name, None) is getattr(pl.Callback, name):
            setattr(callback, name, None)


def global_step_progress(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    """The progress record whose ``completed`` is ``trainer.global_step``, or ``None`` if it cannot be found.

    ``trainer.global_step`` goes through five properties (loop, module, optimization mode, progress) on every read;
    callbacks that read it every step keep this record from ``on_train_start`` (after a resume's restore, which
    loads into the same record) and read one attribute instead. Checked against ``trainer.global_step`` when taken.
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    try:
        if pl_module.automatic_optimization:
            record = loop.automatic_optimization.optim_progress.optimizer.step.total  # type: ignore[union-attr]
        else:
            record = loop.manual_optimization.optim_step_progress.total  # type: ignore[union-attr]
    except AttributeError:  # another Lightning layout: fall back to the property
        return None
    return record if getattr(record, "completed", None) == trainer.global_step else None
