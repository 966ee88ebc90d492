r"""The LR range test (guide section 3): grow the lr exponentially, watch the loss, pick the lr before it blows up.

Step :math:`k` of :math:`N` uses the lr multiplier :math:`f_k = (l_{max}/l_{min})^{k/(N-1)}`: group 0 of optimizer 0
goes from :math:`l_{min}` to :math:`l_{max}` and every other param group keeps its ratio to it (discriminative lrs
survive).
The loss of each optimizer step (the sum over its micro-batches, averaged over ranks) is smoothed with an
exponential moving average with bias correction, :math:`\hat L_k = m_k / (1 - \beta^{k+1})`,
:math:`m_k = \beta m_{k-1} + (1 - \beta) L_k`. Suggestions, on the smoothed curve without its first 10 % and last
5 % of points:

* ``valley``: fastai's default: the stretch of points, as long as the loss's longest decreasing subsequence, that ends
  where that subsequence ends; the suggestion lies half way along it;
* ``steep``: the steepest descent of the loss against :math:`\log_{10}` lr;
* ``minimum / 10``: a tenth of the lr at the lowest loss.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_tricks._compat import fit_train_dataloader
from lightning_tricks._sharding import local
from lightning_tricks.callbacks._base import TrickCallback
from lightning_tricks.functional._checks import check_choice, check_number
from lightning_tricks.groups import scale_lrs

__all__ = ["LRFinder", "LRFinderResult", "lr_find", "suggest"]

CHOICES = ("valley", "steep", "minimum")


@dataclass
class LRFinderResult:
    """The sweep (group 0's lr and the loss of each optimizer step) and the suggestions."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    valley: float | None
    steep: float | None
    minimum: float | None  # a tenth of the lr at the lowest smoothed loss
    clear: bool  # False when the curve shows no clear valley (a warning said so)
    notes: list[str] = field(default_factory=list)
    #: group 0's lr as the optimizer was configured when the sweep began (the sweep scales every group by one factor)
    start_lr: float | None = None

    def suggestion(self, choice: str = "steep") -> float:
        check_choice("choice", choice, CHOICES)
        value = getattr(self, choice)
        if value is None:
            raise RuntimeError(f"no '{choice}' suggestion: the sweep recorded too few points ({len(self.lrs)}).")
        return float(value)

    def apply(self, module: pl.LightningModule, choice: str = "steep") -> float:
        """Scale the module's ``lr`` (an attribute or a hyper-parameter) by the sweep's chosen factor and return the
        new value; the next ``configure_optimizers`` (e.g. ``adamw(self, lr=self.hparams.lr)``) uses it.

        The sweep moves every param group by one factor, and the suggestion is group 0's lr. With layer-wise groups
        (``adamw(self, lr, layer_decay=0.5)``: group 0 is the bottom layer) the module's ``lr`` is not group 0's, so
        it is scaled by ``suggestion / start_lr`` rather than replaced: every group lands where the sweep chose, as
        :class:`LRFinder` sets them.
        """
        suggestion = self.suggestion(choice)
        has_hparam = "lr" in getattr(module, "hparams", {})
        if not has_hparam and not hasattr(module, "lr"):
            raise AttributeError(f"{type(module).__name__} has no `lr` attribute or hyper-parameter: pass the "
                                 f"suggestion ({suggestion:.3g}, group 0's lr) to your optimizer yourself.")
        current = float(module.hparams["lr"] if has_hparam else module.lr)  # type: ignore[union-attr]
        lr = suggestion if not self.start_lr else current * suggestion / self.start_lr
        if has_hparam:
            module.hparams["lr"] = lr
        if hasattr(module, "lr"):
            module.lr = lr
        return lr

    def plot(self, path: str | None = None) -> Any:
        """The loss against the lr (log scale) with the suggestions marked; saved to ``path`` when given."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(self.lrs, self.losses, color="0.75", lw=0.8, label="loss")
        ax.plot(self.lrs, self.smoothed, color="tab:blue", label="smoothed")
        for name, colour in (("valley", "tab:green"), ("steep", "tab:orange"), ("minimum", "tab:red")):
            value = getattr(self, name)
            if value is not None:
                ax.axvline(value, color=colour, ls="--", label=f"{name} {value:.2g}")
        ax.set(xscale="log", xlabel="learning rate (param group 0)", ylabel="training loss", title="LR range test")
        finite = [v for v in self.smoothed if math.isfinite(v)]
        if finite:
            ax.set_ylim(min(finite) - 0.05 * abs(min(finite)), finite[0] * 1.5 if finite[0] > 0 else None)
        ax.legend(fontsize=8)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig


def suggest(lrs: Sequence[float], smoothed: Sequence[float]) -> tuple[float | None, float | None, float | None, bool,
                                                                      list[str]]:
    """``(valley, steep, minimum / 10, clear, notes)`` from a sweep's lrs and smoothed losses (see the module)."""
    lr, loss = np.asarray(lrs, dtype=float), np.asarray(smoothed, dtype=float)
    keep = np.isfinite(loss)
    lr, loss = lr[keep], loss[keep]
    n = len(loss)
    start, stop = int(0.1 * n), n - max(1, int(0.05 * n))
    lr, loss = lr[start:stop], loss[start:stop]
    if len(loss) < 5:
        return None, None, None, False, ["too few points for a suggestion"]
    minimum = float(lr[int(np.argmin(loss))] / 10)
    steep = float(lr[int(np.argmin(np.gradient(loss, np.log10(lr))))])
    # fastai's valley: run[i] is the length of the longest decreasing subsequence ending at point i; the valley is the
    # stretch of that many points ending at the longest one's end (not at its first element, which may sit far back
    # on a plateau that barely falls), and the suggestion half way along it
    m = len(loss)
    run = [1] * m
    for i in range(m):
        for j in range(i):
            if loss[j] > loss[i] and run[j] + 1 > run[i]:
                run[i] = run[j] + 1
    end = int(np.argmax(run))
    begin = max(0, end - run[end])
    third = (end - begin) / 3
    valley = float(lr[begin + int(third) + int(third / 2)])
    notes = []
    fall = (loss[0] - loss.min()) / abs(loss[0]) if loss[0] else 0.0
    if run[end] < max(5, 0.1 * m):
        notes.append(f"the loss decreases over only {run[end]} of {m} points: no clear valley")
    if fall < 0.05:
        notes.append(f"the loss falls by only {100 * fall:.1f} % over the sweep: no clear valley")
    return valley, steep, minimum, not notes, notes


def _check_sweep(min_lr: float, max_lr: float, num_steps: int, beta: float, divergence: float) -> None:
    check_number("min_lr", min_lr, low=0.0, low_open=True)
    check_number("max_lr", max_lr, low=0.0, low_open=True)
    if min_lr >= max_lr:
        raise ValueError(f"`min_lr` ({min_lr!r}) must be smaller than `max_lr` ({max_lr!r}).")
    check_number("num_steps", num_steps, low=5, integer=True)
    check_number("beta", beta, low=0.0, high=1.0, high_open=True)
    check_number("divergence", divergence, low=1.0, low_open=True)


class _Sweep(pl.Callback):
    """Sets the sweep's lrs, records the loss of each optimizer step, stops on divergence, restores the weights."""

    def __init__(self, min_lr: float, max_lr: float, num_steps: int, beta: float, divergence: float) -> None:
        self.min_lr, self.max_lr, self.num_steps = min_lr, max_lr, num_steps
        self.beta, self.divergence = beta, divergence
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.start_lr: float | None = None
        self.smoothed: list[float] = []
        self._pending: torch.Tensor | None = None
        self._avg = 0.0

    def _set(self, trainer: pl.Trainer, k: int) -> None:
        factor = (self.max_lr / self.min_lr) ** (k / max(1, self.num_steps - 1))
        for opt, base in zip(trainer.optimizers, self._base):
            for group, b in zip(opt.param_groups, base):
                group["lr"] = b * factor
        self._current = trainer.optimizers[0].param_groups[0]["lr"]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reference = trainer.optimizers[0].param_groups[0]["lr"] or 1.0
        self.start_lr = float(reference)
        # every group starts at min_lr times its ratio to group 0 of optimizer 0
        self._base = [[self.min_lr * g["lr"] / reference for g in opt.param_groups] for opt in trainer.optimizers]
        self._saved = [local(v).detach().clone() for v in pl_module.state_dict().values()]
        self._step = trainer.global_step
        self._set(trainer, 0)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        loss = loss.detach().float()  # divided by accumulate_grad_batches: the micro-batches sum to the step's loss
        self._pending = loss if self._pending is None else self._pending + loss
        if trainer.global_step == self._step:
            return  # accumulating
        self._step = trainer.global_step
        step_loss = float(trainer.strategy.reduce(self._pending, reduce_op="mean"))  # the same on every rank
        self._pending = None
        k = len(self.losses)
        self.lrs.append(self._current)
        self.losses.append(step_loss)
        self._avg = self.beta * self._avg + (1 - self.beta) * step_loss
        smoothed = self._avg / (1 - self.beta ** (k + 1))
        self.smoothed.append(smoothed)
        best = min(self.smoothed)
        if not math.isfinite(smoothed) or (k > 5 and smoothed > self.divergence * best):
            trainer.should_stop = True  # diverged
        else:
            self._set(trainer, k + 1)

    def restore(self, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            for target, value in zip(pl_module.state_dict().values(), self._saved):
                local(target).copy_(value)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.restore(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if hasattr(self, "_saved"):
            self.restore(pl_module)


def lr_find(
    module: pl.LightningModule,
    train_dataloaders: Any = None,
    *,
    datamodule: pl.LightningDataModule | None = None,
    min_lr: float = 1e-7,
    max_lr: float = 1.0,
    num_steps: int = 100,
    callbacks: Sequence[pl.Callback] = (),
    beta: float = 0.98,
    divergence: float = 4.0,
    **trainer_kwargs: Any,
) -> LRFinderResult:
    """Run the LR range test on ``module`` and return the curve and the suggestions; the module's weights, and the
    state of the given callbacks, come back as they were (from memory: no checkpoint file).

    Args:
        module: the model; its ``configure_optimizers`` builds the optimizer(s) of the sweep (a fresh one).
        train_dataloaders, datamodule: the training data, as for ``Trainer.fit``.
        min_lr, max_lr: the range of group 0's lr (``min_lr < max_lr``, both > 0).
        num_steps: optimizer steps of the sweep (at most; it stops when the smoothed loss exceeds ``divergence``
            times its best).
        callbacks: the run's callbacks; its tricks (``TrickCallback``: label smoothing, mixup, distillation) stay on
            during the sweep, others (schedules, early stopping, averaging) are left out.
        beta: the smoothing of the loss.
        trainer_kwargs: for the sweep's ``Trainer`` (``accelerator``, ``devices``, ``strategy``, ``precision``,
            ``accumulate_grad_batches``, ...): the lr is stepped per optimizer step; under several processes the loss
            of each step is averaged over ranks.
    """
    _check_sweep(min_lr, max_lr, num_steps, beta, divergence)
    tricks = [cb for cb in callbacks if isinstance(cb, TrickCallback)]
    saved_states = [cb.state_dict() for cb in tricks]
    sweep = _Sweep(min_lr, max_lr, num_steps, beta, divergence)
    defaults: dict[str, Any] = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                                    max_epochs=-1)
    trainer = pl.Trainer(**{**defaults, **trainer_kwargs, "max_steps": num_steps, "callbacks": [*tricks, sweep]})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*val_dataloader.*|.*validation_step.*")
        trainer.fit(module, train_dataloaders=train_dataloaders, datamodule=datamodule)
    for cb, state in zip(tricks, saved_states):
        cb.load_state_dict(state)
    valley, steep, minimum, clear, notes = suggest(sweep.lrs, sweep.smoothed)
    if not clear:
        rank_zero_warn(f"lr_find: {'; '.join(notes)}. Widen the range (min_lr, max_lr), raise num_steps, or check "
                       "that the model trains at all (overfit_check).")
    return LRFinderResult(sweep.lrs, sweep.losses, sweep.smoothed, valley, steep, minimum, clear, notes,
                          start_lr=sweep.start_lr)


class LRFinder(pl.Callback):
    """The LR range test as a callback: at the start of ``trainer.fit`` it runs :func:`lr_find` on the fit's own
    module, data, precision, accumulation and trick callbacks, restores the weights, and sets the suggested lr on the
    fit's optimizers (every param group scaled by one factor, so the ratios between groups stay) before training
    starts. ``WarmupCosine`` then plans its schedule from the new lrs; torch schedulers get new ``base_lrs``.

    Example::

        finder = LRFinder()
        trainer = pl.Trainer(max_epochs=10, callbacks=[finder, *recipe()])
        trainer.fit(model, datamodule=dm)
        finder.result.plot("lr_find.png")   # the curve; finder.lr is the lr that was used

    Args:
        choice: which suggestion to use: ``"steep"`` (the default), ``"valley"`` (fastai's default) or
            ``"minimum"`` (a tenth of the lr at the lowest loss). On the MNIST-1D benchmark in ``docs/results.md``
            ``steep`` lay within 3x of the best lr of a grid on every seed, with or without a schedule; ``valley``
            3-11x below it.
        min_lr, max_lr, num_steps, beta, divergence: as for :func:`lr_find`.

    The sweep runs once per fit: resuming from a checkpoint skips it (the optimizer's state carries the lr). It runs
    in single-process fits; under DDP or FSDP call :func:`lr_find` with the same ``strategy`` and ``devices`` before
    ``trainer.fit`` (its loss is averaged over ranks). If the sweep finds no clear valley it warns and leaves the lrs
    as ``configure_optimizers`` set them.
    """

    def __init__(self, choice: str = "steep", *, min_lr: float = 1e-7, max_lr: float = 1.0, num_steps: int = 100,
                 beta: float = 0.98, divergence: float = 4.0) -> None:
        check_choice("choice", choice, CHOICES)
        _check_sweep(min_lr, max_lr, num_steps, beta, divergence)
        self.choice = choice
        self.sweep_kwargs: dict[str, Any] = dict(min_lr=min_lr, max_lr=max_lr, num_steps=num_steps, beta=beta,
                                                 divergence=divergence)
        self.result: LRFinderResult | None = None
        self.lr: float | None = None  # the lr set on param group 0 of optimizer 0 (None: not set)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.result = self.lr = None  # a checkpoint's state, restored after setup, may set the lr
        if trainer.world_size > 1:
            raise RuntimeError(
                f"LRFinder runs its sweep in single-process fits, but this fit has {trainer.world_size} processes "
                f"({type(trainer.strategy).__name__}). Call `lightning_tricks.tuning.lr_find(model, loader, "
                "strategy=..., devices=...)` before `trainer.fit` instead: it averages the loss over the ranks."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lr is not None:
            return  # resumed after the sweep: the restored optimizer state carries the lr
        device = trainer.strategy.root_device
        tricks = [cb for cb in trainer.callbacks if isinstance(cb, TrickCallback)]
        try:
            self.result = lr_find(
                pl_module, fit_train_dataloader(trainer), callbacks=tricks, **self.sweep_kwargs,
                accelerator=trainer.accelerator, strategy=SingleDeviceStrategy(device),
                precision=trainer.precision, accumulate_grad_batches=trainer.accumulate_grad_batches,
            )
        finally:
            pl_module.trainer = trainer  # the sweep's Trainer attached itself, and its teardown moved the module
            pl_module.to(device)
        if not self.result.clear:
            return
        lr = self.result.suggestion(self.choice)
        factor = lr / trainer.optimizers[0].param_groups[0]["lr"]
        scale_lrs(trainer.optimizers, [c.scheduler for c in trainer.lr_scheduler_configs], factor)
        self.lr = lr
        rank_zero_info(f"LRFinder: lr {lr:.3g} ({self.choice}) set on param group 0; every group scaled by "
                       f"{factor:.3g}. The curve: `finder.result.plot()`.")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "choice": self.choice}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.lr = state_dict["lr"]
