"""Lightning plumbing for cheap per-step hooks: skip unused ones, group neighbours, read the step counter directly."""

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
    callbacks went from 36 dispatches a training step to 3 (``tests/test_dispatch.py`` counts them), and to 2 with
    :func:`share_train_batch_end`.

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


class SharedBatchEnd:
    """The ``on_train_batch_end`` of a run of this library's callbacks, called by Lightning as one hook.

    Each hook Lightning dispatches costs a profiler context, an f-string and a call through its dispatcher: a few
    microseconds of host time inside a real CPU step (grouping the recipe's two batch-end hooks saved about 6 us a
    step, A/B in ``docs/performance.md``). The hooks run in the callbacks' own order.
    """

    __slots__ = ("hooks",)

    def __init__(self, callbacks: list[pl.Callback]) -> None:
        # (class function, instance) pairs rather than bound methods: a bound method would pickle as a lookup of the
        # instance's attribute, which is this object or None once grouped.
        self.hooks = [(type(cb).on_train_batch_end, cb) for cb in callbacks]

    def __call__(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                 batch_idx: int) -> None:
        for hook, callback in self.hooks:
            hook(callback, trainer, pl_module, outputs, batch, batch_idx)


def share_train_batch_end(trainer: pl.Trainer) -> None:
    """Run the batch-end hooks of neighbouring callbacks of this library through one Lightning dispatch.

    Called from each such callback's ``on_train_start`` (after every ``on_fit_start``, where a callback decides
    whether it needs the hook this fit); idempotent. A callback takes part when its class sets
    ``shares_train_batch_end = True``; its instance attribute ``wants_train_batch_end`` says whether it needs the hook
    this fit. Callbacks are grouped only when no other callback with a batch-end hook sits between them in
    ``trainer.callbacks``, so every hook still runs in the order Lightning would run it; the first of a group calls
    the others'. With a profiler other than Lightning's default no-op one, nothing is grouped (each callback's time
    stays under its own name in the profiler's report).
    """
    from lightning.pytorch.profilers import PassThroughProfiler

    callbacks = list(trainer.callbacks)
    ours = [cb for cb in callbacks if getattr(cb, "shares_train_batch_end", False)]
    our_ids = {id(cb) for cb in ours}
    for cb in ours:  # each back to its own hook first
        if getattr(cb, "wants_train_batch_end", True):
            vars(cb).pop("on_train_batch_end", None)
        else:
            cb.on_train_batch_end = None  # type: ignore[method-assign]
    if not isinstance(trainer.profiler, PassThroughProfiler):
        return
    groups: list[list[pl.Callback]] = [[]]
    for cb in callbacks:
        hook = getattr(cb, "on_train_batch_end", None)
        if id(cb) in our_ids:
            if callable(hook):
                groups[-1].append(cb)
        elif callable(hook) and getattr(hook, "__func__", None) is not pl.Callback.on_train_batch_end:
            groups.append([])  # another callback's hook runs here: a new group after it
    for group in groups:
        if len(group) > 1:
            group[0].on_train_batch_end = SharedBatchEnd(group)  # type: ignore[method-assign]
            for cb in group[1:]:
                cb.on_train_batch_end = None  # type: ignore[method-assign]
