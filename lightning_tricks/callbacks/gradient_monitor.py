"""Gradient monitoring with no host-device sync between logging intervals.

Its health flags are in :mod:`~lightning_tricks.callbacks.gradient_health`, its NaN guard in
:mod:`~lightning_tricks.callbacks.nonfinite_guard`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_tricks._compat import loss_scale, unscales_itself
from lightning_tricks._io import log_to_loggers
from lightning_tricks._sharding import ShardSum, is_sharded, local
from lightning_tricks.callbacks.gradient_health import GradientHealth
from lightning_tricks.callbacks.nonfinite_guard import ACTIONS, NonFiniteGuard
from lightning_tricks.functional._checks import check_choice, check_number
from lightning_tricks.functional.gradients import GradientLayout


class GradientMonitor(pl.Callback):
    r"""Log gradient statistics and guard against non-finite gradients, cheaply enough to leave on.

    Reads the gradients in ``on_before_optimizer_step``: once per optimizer step whatever
    ``accumulate_grad_batches`` is, unscaled under ``16-mixed`` (Lightning unscales first; for optimizers
    that unscale themselves, such as fused AdamW, the callback divides by the loss scale), and already
    all-reduced under DDP (no extra collective). Per step it computes the squared norm of every parameter's gradient
    with one fused ``torch._foreach_norm`` and writes them into a row of a small device buffer (one row per optimizer
    step of the logging interval). At a logging step the buffer comes to the host in **one** transfer and everything
    else (group sums, totals, maxima, means, clipping, non-finite steps, vanishing/exploding groups) is computed there.

    Sharded training (FSDP2 through ``ModelParallelStrategy``): each rank holds a slice of each gradient. The squared
    norms of the local slices are summed across the shard group (not across HSDP replicas) once per logging interval,
    in one collective over the whole buffer, so ``grad/norm`` is the norm of the full gradient and every rank takes
    the same decisions at the same step.

    Logged (through any Lightning logger, at the Trainer's logging steps):

    * ``grad/norm`` (global 2-norm of this step), ``grad/norm_max`` and ``grad/norm_mean`` (over the interval,
      finite steps), ``grad/max_abs``, ``grad/norm/<group>`` per group;
    * ``grad/update_ratio/<group>`` (``lr * |g| / |w|``) when ``log_update_ratio``; ``param/norm/<group>``
      when ``log_param_norm``;
    * ``grad/nonfinite_steps`` (steps in the interval with a NaN/inf gradient);
    * with ``gradient_clip_val`` (norm clipping): ``grad/norm_clipped`` (after clipping) and
      ``grad/clip_fraction`` (steps of the interval that were clipped);
    * under ``16-mixed``: ``amp/loss_scale`` and ``amp/skipped_steps``. Inf gradients that GradScaler skips
      are normal there: they are counted, not flagged, unless most steps of an interval are skipped;
    * ``grad/vanishing/<group>`` / ``grad/exploding/<group>`` = 1 while a group's interval-mean norm stays
      below ``vanish_ratio`` or above ``explode_ratio`` times its own mean over the first ``baseline_steps``
      steps for ``patience`` intervals in a row (0 once when it recovers; a warning says so once).

    Args:
        log_every_n_steps: logging interval in optimizer steps; ``None`` uses the Trainer's.
        group_by: ``"module"`` (top-level submodules, default), ``"parameter"``, or an int module depth.
        log_update_ratio: log the update-to-weight ratio per group.
        log_param_norm: log parameter norms per group.
        on_nonfinite: ``"warn"``, ``"stop"`` (end training cleanly, save a checkpoint, say at which step and in
            which groups it started) or ``"raise"`` (:class:`NonFiniteGradientError`).
        baseline_steps: steps that define each group's early-run level.
        vanish_ratio: a group below this fraction of its early level counts as vanishing.
        explode_ratio: a group above this multiple of its early level counts as exploding.
        patience: consecutive intervals a group must stay out of range before it is flagged.

        checkpoint_dir: where ``on_nonfinite="stop"`` writes its checkpoint (default: the Trainer's ``log_dir``).

    When non-finite gradients are seen:

    * CPU, one process: the step's row is host memory, read before the optimizer step, so ``"stop"`` skips the bad
      update and the checkpoint holds the last finite weights.
    * GPU, or several processes: at the logging step (every rank at the same step, so all ranks stop together); the
      bad updates may already be applied, so the message says whether the checkpoint's weights are finite.
    """

    def __getstate__(self) -> dict[str, Any]:
        # The NumPy view of the buffer is remade at the next fit start (a deepcopy or a spawn after a fit).
        return {k: v for k, v in vars(self).items() if k != "_host_rows"}

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        group_by: str | int = "module",
        log_update_ratio: bool = True,
        log_param_norm: bool = False,
        on_nonfinite: str = "warn",
        baseline_steps: int = 20,
        vanish_ratio: float = 1e-3,
        explode_ratio: float = 1e3,
        patience: int = 3,
        checkpoint_dir: str | None = None,
    ) -> None:
        if log_every_n_steps is not None:
            check_number("log_every_n_steps", log_every_n_steps, low=1, integer=True)
        check_choice("on_nonfinite", on_nonfinite, ACTIONS)
        check_number("baseline_steps", baseline_steps, low=1, integer=True)
        check_number("vanish_ratio", vanish_ratio, low=0.0, high=1.0, low_open=True, high_open=True)
        check_number("explode_ratio", explode_ratio, low=1.0, low_open=True)
        check_number("patience", patience, low=1, integer=True)
        if not (group_by in ("module", "parameter") or (isinstance(group_by, int) and group_by >= 1)):
            raise ValueError(f"`group_by` must be 'module', 'parameter' or an int depth >= 1, got {group_by!r}.")
        self.log_every_n_steps = log_every_n_steps
        self.group_by = group_by
        self.log_update_ratio = log_update_ratio
        self.log_param_norm = log_param_norm
        self.on_nonfinite = on_nonfinite
        self.baseline_steps = baseline_steps
        self.vanish_ratio = vanish_ratio
        self.explode_ratio = explode_ratio
        self.patience = patience
        self.checkpoint_dir = checkpoint_dir
        self._guard = NonFiniteGuard(on_nonfinite, checkpoint_dir)

    # ------------------------------------------------------------------ setup (once per fit)
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every parameter, frozen ones included: a backbone that Finetune unfreezes later is monitored from then on.
        self.layout = GradientLayout.from_module(pl_module, self.group_by, include_frozen=True)
        params = self.layout.params
        self._device = pl_module.device
        self._every = self.log_every_n_steps or trainer.log_every_n_steps  # type: ignore[attr-defined]
        # The norm of each parameter's (local) gradient, one row per training batch that stepped an optimizer.
        self._norms = torch.zeros(self._every, len(params), dtype=torch.float32, device=self._device)
        self._row_steps: list[int] = []
        self._row_open = False
        self._group_of = np.asarray(self.layout.group_of)
        self._sharded = is_sharded(params)
        self._shard_sum = ShardSum(params)
        # Which columns (parameters) each optimizer steps: each optimizer step reads its own parameters' gradients
        # (two optimizers, as a GAN's, each at its own step). A parameter in no optimizer keeps a norm of 0.
        column = {id(p): i for i, p in enumerate(params)}
        self._columns = [sorted({column[id(p)] for g in opt.param_groups for p in g["params"] if id(p) in column})
                         for opt in trainer.optimizers]
        self._whole_rows = len(trainer.optimizers) == 1 and self._columns[0] == list(range(len(params)))
        self._column_index = [torch.tensor(c, dtype=torch.long, device=self._device) for c in self._columns]
        # made once: the per-step work reads these, with no per-parameter Python on the hot path
        self._params_of = [[params[c] for c in cols] for cols in self._columns]
        self._host_columns = [slice(None) if self._whole_rows else np.asarray(c, dtype=np.int64)
                              for c in self._columns]
        self._max_abs: list[Tensor | None] = [None] * len(trainer.optimizers)  # several optimizers: each one's last
        # per optimizer: which of its parameters had a gradient last time, and that as an index tensor
        self._present: dict[int, tuple[tuple[int, ...], Tensor]] = {}
        # One process on the CPU: the buffer is host memory (a NumPy view of it), so each step is judged before its
        # update; elsewhere at logging steps, with no per-step host read.
        single_cpu = trainer.world_size == 1 and self._device.type == "cpu"
        self._host_rows = self._norms.numpy() if single_cpu else None
        self._health = GradientHealth(self.layout.names, self.baseline_steps, self.vanish_ratio, self.explode_ratio,
                                      self.patience)
        self._guard = NonFiniteGuard(self.on_nonfinite, self.checkpoint_dir)
        self._lr_of_group = self._lr_locations(trainer)
        # Optimizers that unscale inside step() (fused AdamW under 16-mixed) get scaled gradients here.
        self._self_unscaling = any(unscales_itself(o) for o in trainer.optimizers)

    def _lr_locations(self, trainer: pl.Trainer) -> list[tuple[int, int]]:
        """For each monitor group, the (optimizer, param group) of its first parameter: where its lr lives."""
        where = {id(p): (oi, gi) for oi, opt in enumerate(trainer.optimizers)
                 for gi, g in enumerate(opt.param_groups) for p in g["params"]}
        first: dict[int, tuple[int, int]] = {}
        for p, g in zip(self.layout.params, self.layout.group_of):
            first.setdefault(g, where.get(id(p), (0, 0)))
        return [first.get(g, (0, 0)) for g in range(len(self.layout.names))]

    @staticmethod
    def _scaler(trainer: pl.Trainer) -> Any:
        return getattr(trainer.precision_plugin, "scaler", None)

    # ------------------------------------------------------------------ per step: device work only
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._row_open = False  # the batch's first optimizer step opens its row

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.stopped_step is not None:
            return
        index = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), None)
        if index is None or not self._columns[index]:
            return
        if not self._row_open:
            if len(self._row_steps) == self._every:  # a full interval not yet logged (several optimizers)
                self._log(trainer, pl_module)
            self._row_open = True
            self._row_steps.append(trainer.global_step)
        row = len(self._row_steps) - 1
        params = self._params_of[index]
        grads: list[Tensor | None] = [p.grad for p in params]
        if self._sharded:
            grads = [None if g is None else local(g) for g in grads]
        target = self._norms[row]
        present = tuple(i for i, g in enumerate(grads) if g is not None)
        if len(present) == len(grads):  # every parameter has a gradient (the usual case): one fused norm
            norms = torch.stack(torch._foreach_norm(cast(list[Tensor], grads)))
        else:  # some got none this step (frozen, e.g. by Finetune): their norm is 0
            norms = torch.zeros(len(grads), dtype=torch.float32, device=self._norms.device)
            if present:
                known = self._present.get(index)
                if known is None or known[0] != present:  # remade only when the set changes (unfreezing)
                    known = self._present[index] = (present, torch.tensor(present, device=norms.device))
                found = torch.stack(torch._foreach_norm([cast(Tensor, grads[i]) for i in present])).float()
                norms.index_copy_(0, known[1], found)
        if self._whole_rows:
            target.copy_(norms)
        else:
            target.index_copy_(0, self._column_index[index], norms.float())
        if len(trainer.optimizers) > 1:  # logged after the batch, when the optimizers may have dropped the gradients
            with_grad = [g for g in grads if g is not None]
            if with_grad:
                self._max_abs[index] = torch.stack(torch._foreach_norm(with_grad, ord=float("inf"))).float().max()
        scaler = self._scaler(trainer)
        if self._self_unscaling and scaler is not None:
            target[self._column_index[index]] = target[self._column_index[index]] / loss_scale(scaler).to(
                target.device)
        if self._host_rows is not None and scaler is None and \
                not np.isfinite(self._host_rows[row, self._host_columns[index]].sum()):
            self._handle_nonfinite(trainer, pl_module, self._group_squares(np.square(self._host_rows[: row + 1])),
                                   before_update=True, skip=params)
            if self.stopped_step is not None:
                return
        if len(trainer.optimizers) == 1 and ((trainer.global_step + 1) % self._every == 0 or row + 1 == self._every):
            self._log(trainer, pl_module)  # one optimizer: at its step, before the update (pre-clip gradients)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Several optimizers: the row is complete once the batch's steps are all taken.
        if (len(trainer.optimizers) > 1 and self._row_open and self.stopped_step is None
                and (trainer.global_step % self._every == 0 or len(self._row_steps) == self._every)):
            self._log(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._row_steps and self.stopped_step is None:  # a last, partial interval: report, no logging
            sq = self._interval_squares()
            if not np.isfinite(sq).all() and self._scaler(trainer) is None and self.on_nonfinite == "warn":
                self._handle_nonfinite(trainer, pl_module, sq, before_update=False)

    # ------------------------------------------------------------------ at logging steps: one host read
    def _interval_squares(self, extra: Tensor | None = None) -> np.ndarray:
        """The interval's squared group norms ``(steps, groups)`` (summed over the shard group when sharded), float64
        on the host; ``extra`` ``(rows, params)`` of squares rides along in the same collective and transfer."""
        n = len(self._row_steps)
        values = self._norms[:n].square() if extra is None else torch.cat([self._norms[:n].square(), extra])
        host = np.asarray(self._shard_sum(values).tolist(), dtype=np.float64).reshape(-1, len(self.layout.params))
        return self._group_squares(host)

    def _group_squares(self, per_param: np.ndarray) -> np.ndarray:
        """Per-parameter squares ``(steps, params)`` to squared group norms ``(steps, groups)``; NaN stays put."""
        out = np.zeros((per_param.shape[0], len(self.layout.names)))
        np.add.at(out.T, self._group_of, np.asarray(per_param, dtype=np.float64).T)
        return out

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = len(self._row_steps)
        scaler = self._scaler(trainer)
        params = self.layout.params
        if len(trainer.optimizers) > 1:
            max_abs = torch.stack([m for m in self._max_abs if m is not None]).max()
        else:
            grads = [local(p.grad) for p in params if p.grad is not None]
            max_abs = torch.stack(torch._foreach_norm(grads, ord=float("inf"))).float().max()
        if self._self_unscaling and scaler is not None:
            max_abs = max_abs / loss_scale(scaler).to(max_abs.device)
        max_abs = self._shard_sum.max(max_abs) if self._shard_sum else max_abs
        need_w = self.log_update_ratio or self.log_param_norm
        w_sq = torch.stack(torch._foreach_norm([local(p.detach()) for p in params])).float().square()[None] \
            if need_w else None
        everything = self._interval_squares(w_sq)  # one collective and one transfer
        sq, w_norm = (everything[:n], np.sqrt(everything[n])) if need_w else (everything, None)
        metrics: dict[str, float] = {"grad/max_abs": float(max_abs)}
        if scaler is not None:
            metrics["amp/loss_scale"] = float(loss_scale(scaler))
        totals = np.sqrt(sq.sum(axis=1))
        finite = np.isfinite(totals)
        last = np.sqrt(sq[-1])
        metrics |= {
            "grad/norm": float(totals[-1]),
            "grad/norm_max": float(totals[finite].max()) if finite.any() else float("nan"),
            "grad/norm_mean": float(totals[finite].mean()) if finite.any() else float("nan"),
            "grad/nonfinite_steps": float((~finite).sum()),
        }
        metrics.update({f"grad/norm/{k}": float(v) for k, v in zip(self.layout.names, last)})
        if self.log_update_ratio and w_norm is not None:
            lrs = [trainer.optimizers[o].param_groups[g]["lr"] for o, g in self._lr_of_group]
            metrics.update({f"grad/update_ratio/{k}": float(lr * g / max(w, 1e-12))
                            for k, lr, g, w in zip(self.layout.names, lrs, last, w_norm)})
        if self.log_param_norm and w_norm is not None:
            metrics.update({f"param/norm/{k}": float(v) for k, v in zip(self.layout.names, w_norm)})
        clip = trainer.gradient_clip_val
        if clip and trainer.gradient_clip_algorithm in (None, "norm"):
            metrics["grad/norm_clipped"] = float(min(totals[-1], float(clip)))
            metrics["grad/clip_fraction"] = float((totals > float(clip)).mean())
        if scaler is not None:
            metrics["amp/skipped_steps"] = metrics["grad/nonfinite_steps"]
        metrics |= self._health.update(self._row_steps, np.sqrt(sq), trainer.global_step)
        self._emit(trainer, metrics)

        bad = metrics["grad/nonfinite_steps"] > 0 and scaler is None
        if trainer.world_size > 1:  # the same data on every rank; reduced all the same, as a stop must agree
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad and self.stopped_step is None:
            self._handle_nonfinite(trainer, pl_module, sq, before_update=False)
        if scaler is not None and metrics["amp/skipped_steps"] > 0.5 * n:
            rank_zero_warn(
                f"GradientMonitor: GradScaler skipped {int(metrics['amp/skipped_steps'])} of the last {n} steps "
                f"(loss scale {metrics['amp/loss_scale']:.3g}): the gradients are persistently non-finite, not an "
                "occasional overflow. Lower the lr, clip gradients or check the loss for NaN/inf."
            )
        self._norms.zero_()
        self._row_steps = []
        self._row_open = False

    def _emit(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        """Hand the interval's figures to every logger and to ``trainer.callback_metrics``.

        Straight to the loggers, as Lightning's ``LearningRateMonitor`` does, at the step Lightning uses for the
        batch's own metrics (``self.log`` is not meant for a dozen keys from a callback hook at once). The values go
        into ``callback_metrics`` as CPU tensors so that other callbacks can read them.
        """
        log_to_loggers(trainer, metrics)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    # ------------------------------------------------------------------ non-finite gradients
    def _handle_nonfinite(self, trainer: pl.Trainer, pl_module: pl.LightningModule, sq: np.ndarray,
                          before_update: bool, skip: Sequence[Tensor] | None = None) -> None:
        bad_rows = np.flatnonzero(~np.isfinite(sq).all(axis=1))
        groups = [n for n, v in zip(self.layout.names, sq[bad_rows[0]]) if not math.isfinite(v)]
        self._guard.handle(trainer, pl_module, self._row_steps[bad_rows[0]], groups, before_update,
                           skip if skip is not None else self.layout.params)

    @property
    def stopped_step(self) -> int | None:
        """The optimizer step at which ``on_nonfinite="stop"`` stopped the run (``None``: it did not)."""
        return self._guard.stopped_step

    @property
    def checkpoint_path(self) -> str | None:
        """The checkpoint ``on_nonfinite="stop"`` wrote."""
        return self._guard.checkpoint_path

    @property
    def stop_message(self) -> str | None:
        """What the stop said: the step, the groups, the checkpoint and whether its weights are finite."""
        return self._guard.stop_message
