"""Gradient monitoring and a NaN guard with no host-device sync between logging intervals."""

from __future__ import annotations

import math
import operator
import os
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_tricks.callbacks._dispatch import global_step_progress, share_train_batch_end, skip_unused_batch_hooks
from lightning_tricks.functional._checks import check_choice, check_number
from lightning_tricks.functional.gradients import GradientLayout, group_norms

ACTIONS = ("warn", "stop", "raise")
_grad_of = operator.attrgetter("grad")


class NonFiniteGradientError(RuntimeError):
    """Raised by :class:`GradientMonitor` with ``on_nonfinite="raise"``."""


class GradientMonitor(pl.Callback):
    r"""Log gradient statistics and guard against non-finite gradients, cheaply enough to leave on.

    Reads the gradients in ``on_before_optimizer_step``: once per optimizer step whatever
    ``accumulate_grad_batches`` is, unscaled under ``16-mixed`` (Lightning unscales first; for optimizers
    that unscale themselves, such as fused AdamW, the callback divides by the loss scale), and already
    all-reduced under DDP (no extra collective). Per step it makes two calls: one fused
    ``torch._foreach_norm`` over the gradients and one fused ``_foreach_copy_`` of the per-parameter norms into
    a row of a small device buffer (one row per step of the logging interval). At a logging step the buffer and a few
    extra statistics come to the host in **one** transfer and everything else (squares, group sums, totals,
    maxima, means, clipping, non-finite steps, vanishing/exploding groups) is computed there.

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

    Detection latency of non-finite gradients:

    * CPU, one process: the step's row is read through a NumPy view of the buffer (no copy, no sync) before
      the optimizer step, so ``"stop"`` skips the bad update and the checkpoint holds the last finite weights.
    * GPU, one process: the row is copied to pinned host memory without blocking and read once the copy has
      landed, usually at the next step (1-2 steps late); the bad update may already be applied, so the message
      says whether the checkpoint's weights are finite. At the latest it is caught at the logging step.
    * DDP: read at logging steps only (every rank at the same step, so all ranks stop together).
    """

    #: Its batch-end hook may run inside a neighbour's single Lightning dispatch (see ``share_train_batch_end``).
    shares_train_batch_end = True

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
        self.stopped_step: int | None = None
        self.stop_message: str | None = None
        self.checkpoint_path: str | None = None
        skip_unused_batch_hooks(self)

    # ------------------------------------------------------------------ setup (once per fit)
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.layout = GradientLayout.from_module(pl_module, self.group_by)
        self._device = device = pl_module.device
        self._index = self.layout.index_on(device)
        groups, params = len(self.layout.names), len(self.layout.params)
        capacity = self._interval(trainer)
        # Per-parameter gradient norms, one row per optimizer step of the current logging interval: one fused
        # foreach_norm and one fused copy into the row per step; squaring and grouping wait for the logging step (host).
        self._hist = torch.zeros(capacity, params, dtype=torch.float32, device=device)
        self._copy_into_row = all(p.dtype == torch.float32 for p in self.layout.params)
        self._group_of = np.asarray(self.layout.group_of)
        self._row_steps: list[int] = []
        self._rows = list(self._hist.unbind(0))  # row views made once: a list index per step, not a tensor index
        # ... and the 0-d views of each row's entries, the targets of one fused `_foreach_copy_` of the norms per
        # step (cheaper than `stack(out=row)`, which makes a view of every norm and a cat: 11 against 15 us inside
        # a CPU step; on CUDA one multi-tensor kernel instead of one view per parameter on the host).
        self._row_views = [list(r.unbind(0)) for r in self._rows] if self._copy_into_row else None
        self._cpu_view = self._hist.numpy() if device.type == "cpu" else None
        # memoryviews of the rows, made once: the per-step finite check is then one Python sum over floats
        self._cpu_rows = [memoryview(r) for r in self._cpu_view] if self._cpu_view is not None else None
        # Fixed for the fit, read once here rather than through Trainer properties every step.
        self._every = capacity
        self._single = trainer.world_size == 1
        self._step_scaler = self._scaler(trainer)
        self._first_optimizer: Any = None
        self._progress: Any = None  # the global-step record, from on_train_start
        # The batch-end hook only reads the GPU flag copy: elsewhere `share_train_batch_end` (at train start) hides it
        # from Lightning's dispatcher for this fit.
        self.wants_train_batch_end = device.type == "cuda" and self._single
        if device.type == "cuda" and trainer.world_size == 1:
            self._flag_host = torch.zeros(params, dtype=torch.float32, pin_memory=True)
            self._flag_view = self._flag_host.numpy()  # made once: reading it later is no tensor op
            self._event = torch.cuda.Event()  # one event, re-recorded each step: creating one costs ~0.1 ms of host
        self._flag_event: Any = None
        self._flag_step = -1
        self._baseline_sum = np.zeros(groups)
        self._baseline_n = 0
        self._out_of_range = [0] * groups
        self._flagged: set[str] = set()
        self._warned: set[str] = set()
        self.stopped_step = self.stop_message = self.checkpoint_path = None
        self._lr_of_group = self._lr_locations(trainer)
        self._self_unscaling = any(getattr(o, "_step_supports_amp_scaling", False) for o in trainer.optimizers)

    def __getstate__(self) -> dict[str, Any]:
        # Memoryviews and CUDA events cannot be pickled (a deepcopy or a spawn after a fit); on_fit_start remakes them.
        return {k: v for k, v in vars(self).items() if k not in ("_cpu_rows", "_event")}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._progress = global_step_progress(trainer, pl_module)
        share_train_batch_end(trainer)

    def _lr_locations(self, trainer: pl.Trainer) -> list[tuple[int, int]]:
        """For each monitor group, the (optimizer, param group) of its first parameter: where its lr lives."""
        where = {id(p): (oi, gi) for oi, opt in enumerate(trainer.optimizers)
                 for gi, g in enumerate(opt.param_groups) for p in g["params"]}
        first: dict[int, tuple[int, int]] = {}
        for p, g in zip(self.layout.params, self.layout.group_of):
            first.setdefault(g, where.get(id(p), (0, 0)))
        return [first.get(g, (0, 0)) for g in range(len(self.layout.names))]

    def _interval(self, trainer: pl.Trainer) -> int:
        return self.log_every_n_steps or trainer.log_every_n_steps

    def _scaler(self, trainer: pl.Trainer) -> Any:
        return getattr(trainer.precision_plugin, "scaler", None)

    # ------------------------------------------------------------------ per step: two calls, no host read
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if optimizer is not self._first_optimizer:  # one record per step, at the first optimizer's step
            if optimizer is not trainer.optimizers[0]:
                return
            self._first_optimizer = optimizer
        if self.stopped_step is not None:
            return
        params = self.layout.params
        grads = list(map(_grad_of, params))
        try:  # every parameter has a gradient (the usual case): no per-parameter test in Python
            norms = torch._foreach_norm(grads)
            complete = True
        except (TypeError, RuntimeError):  # some have none this step (or there are none): their norm counts as 0
            grads = [g for g in grads if g is not None]
            if not grads:
                return
            norms = torch._foreach_norm(grads)
            complete = False
        row = len(self._row_steps)
        scaler = self._step_scaler
        if self._self_unscaling and scaler is not None:  # the optimizer unscales inside step(): do it here
            norms = [torch.stack(norms).float() / scaler._scale.to(self._device)]
        if not complete:  # rare: some parameters got no gradient this step (their norm counts as 0)
            keep = torch.tensor([i for i, p in enumerate(params) if p.grad is not None], device=self._device)
            self._rows[row].index_copy_(0, keep, torch.cat([n.reshape(-1).float() for n in norms]))
        elif self._row_views is not None and len(norms) == len(params):
            torch._foreach_copy_(self._row_views[row], norms)
        else:
            self._rows[row].copy_(torch.cat([n.reshape(-1) for n in norms]))
        step = self._progress.completed if self._progress is not None else trainer.global_step
        self._row_steps.append(step)
        if scaler is None and self._single:
            if self._cpu_rows is not None:  # CPU: the buffer is host memory already
                # The sum of a row of norms (all >= 0, summed in float64) is finite exactly when every norm is; a
                # plain Python sum over a memoryview is about 10x cheaper than a numpy call.
                if not math.isfinite(sum(self._cpu_rows[row])):
                    self._handle_nonfinite(trainer, pl_module, self._host_rows(), before_update=True)
                    if self.stopped_step is not None:
                        return
            elif self._device.type == "cuda" and self._flag_event is None:
                # One copy in flight at a time (a step whose copy is skipped is still read at the logging step): the
                # first non-finite step is reported with its own number, and the pinned row is never overwritten
                # while the host may read it.
                self._flag_host.copy_(self._rows[row], non_blocking=True)
                self._event.record()
                self._flag_event = self._event
                self._flag_step = step
        if (step + 1) % self._every == 0 or row + 1 == len(self._rows):
            self._log(trainer, pl_module)

    def _check_flag(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """GPU: read the last copied row if it has landed (``event.query`` never blocks)."""
        if self._flag_event is not None and self._flag_event.query():
            self._flag_event = None
            if not math.isfinite(sum(memoryview(self._flag_view))) and self.stopped_step is None:
                groups = self._groups_of_bad(self._flag_view)
                self._handle_nonfinite(trainer, pl_module, None, before_update=False,
                                       known=(self._flag_step, groups))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.stopped_step is None:
            self._check_flag(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._row_steps and self.stopped_step is None:  # a last, partial interval: report, no logging
            rows = self._host_rows()
            if not np.isfinite(rows).all() and self._scaler(trainer) is None and self.on_nonfinite == "warn":
                self._handle_nonfinite(trainer, pl_module, rows, before_update=False)

    # ------------------------------------------------------------------ at logging steps: one host read
    def _host_rows(self) -> np.ndarray:
        """The interval's squared group norms ``(steps, groups)``, float64 on the host (one transfer)."""
        return self._group_squares(np.asarray(self._hist[: len(self._row_steps)].tolist(), dtype=np.float64))

    def _group_squares(self, per_param: np.ndarray) -> np.ndarray:
        """Per-parameter norms ``(steps, params)`` to squared group norms ``(steps, groups)``; NaN stays put."""
        out = np.zeros((per_param.shape[0], len(self.layout.names)))
        np.add.at(out.T, self._group_of, np.square(per_param).T)
        return out

    def _groups_of_bad(self, per_param: np.ndarray) -> list[str]:
        bad = {int(g) for g in self._group_of[~np.isfinite(per_param)]}
        return [n for i, n in enumerate(self.layout.names) if i in bad]

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n, groups, params = len(self._row_steps), len(self.layout.names), len(self.layout.params)
        scaler = self._scaler(trainer)
        grads = [p.grad for p in self.layout.params if p.grad is not None]
        extras = [torch.stack(torch._foreach_norm(grads, ord=float("inf"))).float().max().reshape(1)]
        need_w = self.log_update_ratio or self.log_param_norm
        if need_w:
            extras.append(group_norms([p.detach() for p in self.layout.params], self._index, groups)[0])
        if scaler is not None:
            extras.append(scaler._scale.to(self._device).float().reshape(1))
        host = torch.cat([self._hist[:n].flatten(), *extras]).tolist()  # the one transfer of the interval
        sq = self._group_squares(np.asarray(host[: n * params], dtype=np.float64).reshape(n, params))
        rest = host[n * params:]
        max_abs, rest = rest[0], rest[1:]
        w_norm, rest = (np.asarray(rest[:groups]), rest[groups:]) if need_w else (None, rest)
        loss_scale = rest[0] if scaler is not None else None
        if self._self_unscaling and loss_scale:
            max_abs /= loss_scale

        totals = np.sqrt(sq.sum(axis=1))
        finite = np.isfinite(totals)
        last = np.sqrt(sq[-1])
        metrics: dict[str, float] = {
            "grad/norm": float(totals[-1]),
            "grad/norm_max": float(totals[finite].max()) if finite.any() else float("nan"),
            "grad/norm_mean": float(totals[finite].mean()) if finite.any() else float("nan"),
            "grad/max_abs": float(max_abs),
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
            metrics["amp/loss_scale"] = float(loss_scale)
            metrics["amp/skipped_steps"] = metrics["grad/nonfinite_steps"]
        self._update_health(trainer, metrics, np.sqrt(sq))
        self._emit(trainer, metrics)

        bad = metrics["grad/nonfinite_steps"] > 0 and scaler is None
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad and self.stopped_step is None:
            self._handle_nonfinite(trainer, pl_module, sq, before_update=False)
        if scaler is not None and metrics["amp/skipped_steps"] > 0.5 * n:
            rank_zero_warn(
                f"GradientMonitor: GradScaler skipped {int(metrics['amp/skipped_steps'])} of the last {n} steps "
                f"(loss scale {loss_scale:.3g}): the gradients are persistently non-finite, not an occasional "
                "overflow. Lower the lr, clip gradients or check the loss for NaN/inf."
            )
        self._hist.zero_()
        self._row_steps = []

    def _emit(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        """Hand the interval's figures to every logger and to ``trainer.callback_metrics``.

        Straight to the loggers, as ``LearningRateMonitor`` does, at the step Lightning uses for the batch's own
        metrics: ``self.log`` costs about 1 ms per key on the host, too much for a dozen keys. The values go into
        ``callback_metrics`` as CPU tensors (no host-to-device copy) so that other callbacks can read them.
        """
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        values = torch.tensor(list(metrics.values())).unbind(0)  # one tensor, one 0-d view per key
        trainer.callback_metrics.update(zip(metrics.keys(), values))

    def _update_health(self, trainer: pl.Trainer, metrics: dict[str, float], norms: np.ndarray) -> None:
        """Vanishing/exploding groups against their own early-run level (host-side, on the interval's rows)."""
        for step, row in zip(self._row_steps, norms):
            if step < self.baseline_steps and np.isfinite(row).all():
                self._baseline_sum += row
                self._baseline_n += 1
        if self._baseline_n == 0 or self._row_steps[0] < self.baseline_steps:
            return
        finite_rows = norms[np.isfinite(norms).all(axis=1)]
        if len(finite_rows) == 0:
            return
        level, now = self._baseline_sum / self._baseline_n, finite_rows.mean(axis=0)
        for i, name in enumerate(self.layout.names):
            if level[i] <= 0:
                continue
            state = None
            if now[i] < self.vanish_ratio * level[i]:
                state = "vanishing"
            elif now[i] > self.explode_ratio * level[i]:
                state = "exploding"
            self._out_of_range[i] = self._out_of_range[i] + 1 if state else 0
            for kind in ("vanishing", "exploding"):
                key = f"grad/{kind}/{name}"
                if state == kind and self._out_of_range[i] >= self.patience:
                    metrics[key] = 1.0  # logged while flagged, 0 once when it recovers: few keys otherwise
                    self._flagged.add(key)
                elif key in self._flagged:
                    metrics[key] = 0.0
                    self._flagged.discard(key)
            if state and self._out_of_range[i] >= self.patience and f"{state}/{name}" not in self._warned:
                self._warned.add(f"{state}/{name}")
                rank_zero_warn(
                    f"GradientMonitor: the gradients of '{name}' are {state} at step {trainer.global_step}: mean norm "
                    f"{now[i]:.3g} vs {level[i]:.3g} over the first {self.baseline_steps} steps "
                    f"({now[i] / level[i]:.2g}x) for {self._out_of_range[i]} logging intervals."
                )

    # ------------------------------------------------------------------ non-finite gradients
    def _handle_nonfinite(self, trainer: pl.Trainer, pl_module: pl.LightningModule, sq: np.ndarray | None,
                          before_update: bool, known: tuple[int, list[str]] | None = None) -> None:
        if known is not None:
            first, groups = known
        else:
            assert sq is not None
            bad_rows = np.flatnonzero(~np.isfinite(sq).all(axis=1))
            first = self._row_steps[bad_rows[0]]
            groups = [n for n, v in zip(self.layout.names, sq[bad_rows[0]]) if not math.isfinite(v)]
        msg = (f"GradientMonitor: non-finite gradients at optimizer step {first} in group(s) {', '.join(groups)} "
               f"(the first in the model's order: '{groups[0] if groups else '?'}').")
        if self.on_nonfinite == "warn":
            if "nonfinite" not in self._warned:
                self._warned.add("nonfinite")
                rank_zero_warn(msg + " Training goes on (on_nonfinite='warn').")
            return
        if self.on_nonfinite == "raise":
            raise NonFiniteGradientError(msg)
        if before_update:  # skip the bad update: the weights stay the last finite ones
            for p in self.layout.params:
                p.grad = None
        self.stopped_step = first
        trainer.should_stop = True
        path = os.path.join(trainer.default_root_dir, f"nonfinite-step={first}.ckpt")
        trainer.save_checkpoint(path)
        self.checkpoint_path = path
        finite = all(bool(torch.isfinite(p).all()) for p in pl_module.parameters())  # exceptional path
        self.stop_message = (msg + f" Training stopped (on_nonfinite='stop'); checkpoint: {path} "
                             + ("(finite weights, from before the bad update)." if finite
                                else "(its weights are already non-finite: resume from an earlier checkpoint)."))
        rank_zero_warn(self.stop_message)
