"""Linear warmup + cosine decay, scheduled on optimizer steps, exactly resumable."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_tricks.functional._checks import check_number
from lightning_tricks.functional.schedules import resolve_start_factor, warmup_cosine
from lightning_tricks.lrs import read_lrs, write_lrs
from lightning_tricks.peers import find_callbacks


class WarmupCosine(pl.Callback):
    r"""Set every parameter group's lr to ``base_lr * warmup_cosine(trainer.global_step)`` before each step.

    The lr is a pure function of ``trainer.global_step`` (optimizer steps), so the curve is the same
    for any ``accumulate_grad_batches``, number of devices, ``limit_train_batches``, ``max_steps`` or
    ``max_epochs``. Every group of every optimizer is scaled from its *own* base lr, so discriminative
    lrs keep their ratios. The lr of the next step is set at the end of each training batch, once the step
    counter has moved (where Lightning steps its own schedulers), and the first one at train start, so
    ``LearningRateMonitor`` logs the lr actually used.

    Args:
        warmup: length of the linear warmup: a fraction of the total optimizer steps (float in [0, 1),
            the guide's 0.1) or a number of steps (int >= 0).
        min_lr_ratio: final lr as a fraction of the base lr, in [0, 1].
        start_factor: factor of the very first update, in [0, 1]. ``None`` (default) uses
            ``1 / (warmup_steps + 1)``: the ramp ``(s + 1) / (W + 1)`` wastes no update, whereas the
            transformers reference (``start_factor=0``) gives the first update lr 0.
        total_steps: length of the schedule in optimizer steps; ``None`` uses
            ``trainer.estimated_stepping_batches``.

    Resume: the base lrs, the warmup and the total are saved in the callback's state (the optimizer's
    restored lr is the last *used* one, not the base). A resumed run continues the saved schedule at
    ``global_step``. If the resumed Trainer would estimate another total (other ``max_steps``/``max_epochs``),
    the saved total is kept and a warning says so; pass ``total_steps=`` explicitly to re-plan (the lr then
    jumps to the new curve, which the warning also says).

    Several optimizers under manual optimization (a GAN): ``global_step`` then counts every optimizer's steps, so the
    schedule runs per training batch instead, the same for every optimizer (the position is in the callback's state).

    Mixed precision: under ``16-mixed``, a step that ``GradScaler`` skips still advances ``global_step``
    in Lightning, so the schedule moves on too (as with any Lightning scheduler). Counting only applied
    updates would need a host read of the scaler every step; this callback does not do it.

    Example::

        trainer = L.Trainer(max_epochs=100, callbacks=[WarmupCosine(warmup=0.1)])
    """

    def __init__(
        self,
        warmup: float | int = 0.1,
        min_lr_ratio: float = 0.0,
        start_factor: float | None = None,
        total_steps: int | None = None,
    ) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, (int, float)):
            raise TypeError(f"`warmup` must be a float fraction in [0, 1) or an int number of steps, got {warmup!r}.")
        if isinstance(warmup, float):
            if not (math.isfinite(warmup) and 0.0 <= warmup < 1.0):
                raise ValueError(
                    f"`warmup` must be a fraction of the run in [0.0, 1.0) (a float) or a number of optimizer steps "
                    f"(an int: warmup=500 is 500 steps), got {warmup!r}."
                )
        else:
            check_number("warmup", warmup, low=0, integer=True)
        check_number("min_lr_ratio", min_lr_ratio, low=0.0, high=1.0)
        if start_factor is not None:
            check_number("start_factor", start_factor, low=0.0, high=1.0)
        if total_steps is not None:
            check_number("total_steps", total_steps, low=1, integer=True)
            if isinstance(warmup, int) and warmup >= total_steps:
                raise ValueError(f"`warmup` ({warmup} steps) must be shorter than `total_steps` ({total_steps}).")
        self.warmup = warmup
        self.min_lr_ratio = float(min_lr_ratio)
        self.start_factor = start_factor
        self.total_steps = total_steps
        # Plan of the run, fixed at the first `on_train_start` and kept in the checkpoint.
        self.base_lrs: list[list[float]] | None = None
        self.planned_total: int | None = None
        self.warmup_steps: int | None = None
        #: Training batches done, the schedule's position under manual optimization with several optimizers.
        self.batches_done = 0
        self._per_batch = False

    # ------------------------------------------------------------------ checks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # A new fit starts unplanned; a resumed one gets its plan back from `load_state_dict`, which
        # Lightning calls after `setup`.
        self.base_lrs = self.planned_total = self.warmup_steps = None
        self.batches_done = 0
        if find_callbacks(trainer, GradientAccumulationScheduler):
            raise ValueError(
                "WarmupCosine cannot be used with GradientAccumulationScheduler: Lightning's "
                "`estimated_stepping_batches` ignores it (it estimates 24 steps where 12 run), so the schedule "
                "would be wrong. Use a fixed `Trainer(accumulate_grad_batches=k)` or pass `total_steps=`."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scheduled = {id(cfg.scheduler.optimizer) for cfg in trainer.lr_scheduler_configs}
        for i, opt in enumerate(trainer.optimizers):
            if id(opt) in scheduled:
                raise ValueError(
                    f"optimizer {i} ({type(opt).__name__}) already has an lr scheduler returned by "
                    "`configure_optimizers`; WarmupCosine would fight it. Return only the optimizer."
                )

    def _estimate_total(self, trainer: pl.Trainer) -> int:
        if self.total_steps is not None:
            return self.total_steps
        total = trainer.estimated_stepping_batches
        if total == float("inf") or total is None or total < 1:
            raise ValueError(
                f"WarmupCosine needs a finite run length, but `trainer.estimated_stepping_batches` is {total} "
                "(an iterable dataset or max_epochs=-1 without `max_steps`). Set `Trainer(max_steps=...)` or "
                "pass `total_steps=`."
            )
        return int(total)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Under manual optimization with several optimizers `global_step` counts every optimizer's steps (a GAN
        # advances it twice a batch): the schedule then runs per training batch, the unit Lightning's estimate counts.
        self._per_batch = not pl_module.automatic_optimization and len(trainer.optimizers) > 1
        if self._per_batch and self.total_steps is None and trainer.max_steps != -1:
            raise ValueError(
                f"WarmupCosine runs per training batch with {len(trainer.optimizers)} optimizers under manual "
                f"optimization, but `max_steps={trainer.max_steps}` counts every optimizer's steps: pass "
                "`WarmupCosine(total_steps=<number of training batches>)`, or use `max_epochs`."
            )
        total = self._estimate_total(trainer)
        if self.planned_total is None:  # a fresh run: plan it
            self.base_lrs = read_lrs(trainer.optimizers)
            self._plan(total)
        elif total != self.planned_total:
            if self.total_steps is not None:
                rank_zero_warn(
                    f"WarmupCosine: re-planning the resumed schedule from {self.planned_total} to the explicit "
                    f"total_steps={total} optimizer steps; the lr jumps to the new curve at step {trainer.global_step}."
                )
                self._plan(total)
            else:
                rank_zero_warn(
                    f"WarmupCosine: this Trainer would run {total} optimizer steps but the checkpoint's schedule was "
                    f"planned for {self.planned_total}; keeping {self.planned_total} (the lr stays at "
                    f"min_lr_ratio after it). Pass `WarmupCosine(total_steps=...)` to re-plan."
                )
        assert self.base_lrs is not None
        shapes = [len(opt.param_groups) for opt in trainer.optimizers]
        if shapes != [len(groups) for groups in self.base_lrs]:
            raise ValueError(
                f"WarmupCosine: the optimizers have {shapes} param groups but the saved schedule has "
                f"{[len(g) for g in self.base_lrs]}; the base lrs cannot be matched."
            )
        self._apply(trainer)

    def _plan(self, total: int) -> None:
        warmup = round(self.warmup * total) if isinstance(self.warmup, float) else self.warmup
        if warmup >= total:
            raise ValueError(
                f"`warmup` ({self.warmup!r} -> {warmup} steps) must be shorter than the run ({total} optimizer steps)."
            )
        self.planned_total, self.warmup_steps = total, int(warmup)

    # ------------------------------------------------------------------ the schedule
    def lr_factor(self, step: int) -> float:
        """The factor applied to every base lr at optimizer step ``step``."""
        assert self.planned_total is not None and self.warmup_steps is not None
        return warmup_cosine(
            step,
            total_steps=self.planned_total,
            warmup_steps=self.warmup_steps,
            min_lr_ratio=self.min_lr_ratio,
            start_factor=resolve_start_factor(self.start_factor, self.warmup_steps),
        )

    def _apply(self, trainer: pl.Trainer) -> None:
        if self.base_lrs is None:
            return
        factor = self.lr_factor(self.batches_done if self._per_batch else trainer.global_step)
        write_lrs(trainer.optimizers, self.base_lrs, factor)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The lr of the next step, set as soon as the counter moves (Lightning steps its own schedulers here too):
        # ready before any callback's batch-start hook reads it. ``on_train_start`` sets the first (or resumed) one.
        if self._per_batch:
            self.batches_done += 1
        self._apply(trainer)

    # ------------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": self.base_lrs, "planned_total": self.planned_total, "warmup_steps": self.warmup_steps,
                "batches_done": self.batches_done}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_lrs = state_dict["base_lrs"]
        self.planned_total = state_dict["planned_total"]
        self.warmup_steps = state_dict["warmup_steps"]
        self.batches_done = state_dict.get("batches_done", 0)
