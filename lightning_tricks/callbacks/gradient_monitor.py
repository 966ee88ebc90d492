"""Gradient monitoring and a NaN guard with no host-device sync between logging intervals."""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_tricks.functional._checks import check_choice, check_number
from lightning_tricks.functional.gradients import GradientLayout, grad_stats, group_norms

ACTIONS = ("warn", "stop", "raise")


class NonFiniteGradientError(RuntimeError):
    """Raised by :class:`GradientMonitor` with ``on_nonfinite="raise"``."""


class GradientMonitor(pl.Callback):
    r"""Log gradient statistics and guard against non-finite gradients, cheaply enough to leave on.

    Reads the gradients in ``on_before_optimizer_step``: once per optimizer step whatever
    ``accumulate_grad_batches`` is, unscaled under ``16-mixed`` (Lightning unscales first; for optimizers
    that unscale themselves, such as fused AdamW, the callback divides by the loss scale), and already
    all-reduced under DDP (no extra collective). Per step it launches a few fused kernels
    (``torch._foreach_norm`` and one ``index_add_`` over a group index built once) and keeps running
    sums on the device; the host reads them in **one** transfer per logging interval.

    Logged (through any Lightning logger, at the Trainer's logging steps):

    * ``grad/norm`` (global 2-norm of this step), ``grad/norm_max`` and ``grad/norm_mean`` (over the interval),
      ``grad/max_abs``, ``grad/norm/<group>`` per group;
    * ``grad/update_ratio/<group>`` (``lr * |g| / |w|``) when ``log_update_ratio``; ``param/norm/<group>``
      when ``log_param_norm``;
    * ``grad/nonfinite_steps`` (steps in the interval with a NaN/inf gradient);
    * with ``gradient_clip_val``: ``grad/norm_clipped`` (after clipping) and ``grad/clip_fraction``;
    * under ``16-mixed``: ``amp/loss_scale`` and ``amp/skipped_steps`` (inf gradients that GradScaler skips
      are normal there: they are counted, not flagged, unless most steps of an interval are skipped);
    * ``grad/vanishing/<group>`` / ``grad/exploding/<group>`` = 1 while a group's interval-mean norm stays
      below ``vanish_ratio`` or above ``explode_ratio`` times its own level over the first
      ``baseline_steps`` steps for ``patience`` intervals in a row (a warning says so once).

    Args:
        log_every_n_steps: logging interval in optimizer steps; ``None`` uses the Trainer's.
        group_by: ``"module"`` (top-level submodules, default), ``"parameter"``, or an int module depth.
        log_update_ratio: log the update-to-weight ratio per group.
        log_param_norm: log parameter norms per group.
        on_nonfinite: ``"warn"``, ``"stop"`` (end training cleanly, save a checkpoint, say where it started)
            or ``"raise"`` (:class:`NonFiniteGradientError`).
        baseline_steps: steps that define each group's early-run level.
        vanish_ratio: a group below this fraction of its early level counts as vanishing.
        explode_ratio: a group above this multiple of its early level counts as exploding.
        patience: consecutive intervals a group must stay out of range before it is flagged.

    Detection latency of non-finite gradients: on the CPU the flag is read right away, before the optimizer
    step, so ``"stop"`` skips the bad update and the checkpoint holds the last finite weights. On an
    accelerator the flag is copied to pinned host memory without blocking and read when the copy has
    landed, usually at the next step (1-2 steps late), so the bad update may already be applied; the
    checkpoint is still written and the message says whether its weights are finite. Under DDP the flag is
    read at logging steps only (every rank at the same step, so all ranks stop together).
    """

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

    # ------------------------------------------------------------------ setup
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.layout = GradientLayout.from_module(pl_module, self.group_by)
        device = pl_module.device
        self._index = self.layout.index_on(device)
        self._device = device
        groups = len(self.layout.names)
        zeros = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)  # noqa: E731
        self._sum_norm, self._max_norm = zeros(()), zeros(())
        self._bad_steps = zeros(())
        self._clipped = zeros(())
        self._group_sum = zeros(groups)
        self._baseline = zeros(groups)
        self._baseline_n = 0
        self._first_bad_step = torch.full((), -1.0, device=device)
        self._bad_groups = torch.zeros(groups, dtype=torch.bool, device=device)
        self._steps = 0
        self._out_of_range = [0] * groups
        self._warned: set[str] = set()
        # A pinned host mirror of the "non-finite seen" flag, read without a sync (see the class docstring).
        pinned = device.type == "cuda"
        self._flag_host = torch.zeros(1, dtype=torch.float32, pin_memory=pinned)
        self._flag_view = self._flag_host.numpy()  # numpy view made once; reading it is no tensor op
        self._flag_event: Any = None
        self._last_pre_clip: Tensor | None = None
        self.stopped_step = self.stop_message = self.checkpoint_path = None
        self._flagged: set[str] = set()
        # On the CPU the running count itself is readable through a numpy view made once (no tensor op per step).
        self._bad_view = self._bad_steps.numpy() if device.type == "cpu" else None
        self._opt_group_of_param = self._optimizer_groups(trainer)
        self._self_unscaling = any(getattr(o, "_step_supports_amp_scaling", False) for o in trainer.optimizers)

    def _optimizer_groups(self, trainer: pl.Trainer) -> list[tuple[int, int]]:
        """For each monitor group, the (optimizer, param group) of its first parameter: where its lr lives."""
        where = {}
        for oi, opt in enumerate(trainer.optimizers):
            for gi, g in enumerate(opt.param_groups):
                for p in g["params"]:
                    where[id(p)] = (oi, gi)
        first: dict[int, tuple[int, int]] = {}
        for p, g in zip(self.layout.params, self.layout.group_of):
            first.setdefault(g, where.get(id(p), (0, 0)))
        return [first.get(g, (0, 0)) for g in range(len(self.layout.names))]

    def _interval(self, trainer: pl.Trainer) -> int:
        return self.log_every_n_steps or trainer.log_every_n_steps

    def _is_logging_step(self, trainer: pl.Trainer) -> bool:
        # Same rule as Lightning's logger connector: the count of optimizer steps after this one.
        return (trainer.global_step + 1) % self._interval(trainer) == 0

    def _scaler(self, trainer: pl.Trainer) -> Any:
        return getattr(trainer.precision_plugin, "scaler", None)

    # ------------------------------------------------------------------ per step (device only)
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if optimizer is not trainer.optimizers[0]:
            return  # one record per step: gradients of all optimizers are read at the first one's step
        self._check_flag(trainer, pl_module)  # the previous step's flag, if its copy has landed
        if self.stopped_step is not None:
            return
        grads = [p.grad for p in self.layout.params if p.grad is not None]
        if not grads:
            return
        index = self._index
        if len(grads) != len(self.layout.params):
            keep = [i for i, p in enumerate(self.layout.params) if p.grad is not None]
            index = self._index[torch.tensor(keep, device=self._device)]
        g_norm, _ = group_norms(grads, index, len(self.layout.names))
        scaler = self._scaler(trainer)
        if self._self_unscaling and scaler is not None:
            g_norm = g_norm / scaler._scale.to(g_norm.device)
        total = g_norm.square().sum().sqrt()
        bad = ~torch.isfinite(total)
        self._steps += 1
        self._sum_norm += torch.nan_to_num(total, nan=0.0, posinf=0.0)
        self._max_norm = torch.maximum(self._max_norm, torch.nan_to_num(total, nan=0.0, posinf=0.0))
        self._bad_steps += bad
        self._bad_groups |= ~torch.isfinite(g_norm)
        self._first_bad_step = torch.where(bad & (self._first_bad_step < 0), float(trainer.global_step),
                                           self._first_bad_step)
        finite_groups = torch.nan_to_num(g_norm, nan=0.0, posinf=0.0)
        self._group_sum += finite_groups
        if self._baseline_n < self.baseline_steps:
            self._baseline += finite_groups
            self._baseline_n += 1
        clip = trainer.gradient_clip_val
        if clip:
            self._clipped += total > float(clip)
            self._last_pre_clip = total
        if trainer.world_size == 1:
            if self._device.type == "cpu":  # a CPU flag costs nothing to read: act before the optimizer step
                if self._bad_view is not None and self._bad_view[()] > 0 and scaler is None:
                    self._handle_nonfinite(trainer, pl_module, before_update=True)
            else:
                self._flag_host.copy_(self._bad_steps.reshape(1), non_blocking=True)
                self._flag_event = torch.cuda.Event()
                self._flag_event.record()
        if self._is_logging_step(trainer):
            self._log(trainer, pl_module)

    def _check_flag(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._flag_event is not None and self._flag_event.query():
            self._flag_event = None
            if self._flag_view[0] > 0 and self._scaler(trainer) is None and self.stopped_step is None:
                self._handle_nonfinite(trainer, pl_module, before_update=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._check_flag(trainer, pl_module)

    # ------------------------------------------------------------------ at logging steps (one host read)
    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = self.layout.names
        lrs = [trainer.optimizers[o].param_groups[g]["lr"] for o, g in self._opt_group_of_param]
        scaler = self._scaler(trainer)
        scale = scaler._scale.to(self._device) if (scaler is not None and self._self_unscaling) else None
        stats = grad_stats(self.layout, self._index, lrs, scale)
        n = max(self._steps, 1)
        parts: list[tuple[str, Tensor]] = [
            ("grad/norm", stats["norm"]),
            ("grad/norm_max", self._max_norm),
            ("grad/norm_mean", self._sum_norm / n),
            ("grad/max_abs", stats["max_abs"]),
            ("grad/nonfinite_steps", self._bad_steps),
        ]
        parts += [(f"grad/norm/{k}", v) for k, v in zip(names, stats["group_norm"].unbind())]
        if self.log_update_ratio:
            parts += [(f"grad/update_ratio/{k}", v) for k, v in zip(names, stats["update_ratio"].unbind())]
        if self.log_param_norm:
            parts += [(f"param/norm/{k}", v) for k, v in zip(names, stats["param_norm"].unbind())]
        clip = trainer.gradient_clip_val
        if clip and self._last_pre_clip is not None:
            if trainer.gradient_clip_algorithm in (None, "norm"):
                post = self._last_pre_clip * torch.clamp(float(clip) / (self._last_pre_clip + 1e-6), max=1.0)
            else:
                post = stats["norm"]  # value clipping happens after this hook: reported pre-clip
            parts += [("grad/norm_clipped", post), ("grad/clip_fraction", self._clipped / n)]
        if scaler is not None:
            parts += [("amp/loss_scale", scaler._scale.to(self._device).reshape(())),
                      ("amp/skipped_steps", self._bad_steps)]
        interval_mean = self._group_sum / n
        baseline = self._baseline / max(self._baseline_n, 1)
        values = torch.cat([torch.stack([v.float().reshape(()) for _, v in parts]), interval_mean, baseline,
                            self._bad_groups.float(), self._first_bad_step.reshape(1)])
        host = values.tolist()  # the one device-to-host transfer of the interval
        k = len(parts)
        metrics = {name: float(v) for (name, _), v in zip(parts, host[:k])}
        g = len(names)
        means, base = host[k:k + g], host[k + g:k + 2 * g]
        self._update_health(trainer, metrics, means, base)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        if trainer.world_size > 1 or self._device.type != "cpu":
            bad = metrics["grad/nonfinite_steps"] > 0
            if trainer.world_size > 1:
                bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
            if bad and scaler is None and self.stopped_step is None:
                self._handle_nonfinite(trainer, pl_module, before_update=False)
        if scaler is not None and metrics["amp/skipped_steps"] > 0.5 * n:
            rank_zero_warn(
                f"GradientMonitor: GradScaler skipped {int(metrics['amp/skipped_steps'])} of the last {n} steps "
                f"(loss scale {metrics['amp/loss_scale']:.3g}): the gradients are persistently non-finite, not an "
                "occasional overflow. Lower the lr, clip gradients or check the loss for NaN/inf."
            )
        # the next interval starts from zero
        self._steps = 0
        for t in (self._sum_norm, self._max_norm, self._bad_steps, self._clipped, self._group_sum):
            t.zero_()

    def _update_health(self, trainer: pl.Trainer, metrics: dict[str, float], means: list[float],
                       base: list[float]) -> None:
        if self._baseline_n < self.baseline_steps:
            return
        for i, name in enumerate(self.layout.names):
            level, now = base[i], means[i]
            if level <= 0 or not math.isfinite(now):
                continue
            state = None
            if now < self.vanish_ratio * level:
                state = "vanishing"
            elif now > self.explode_ratio * level:
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
                    f"{now:.3g} vs {level:.3g} over the first {self.baseline_steps} steps "
                    f"({now / level:.2g}x) for {self._out_of_range[i]} logging intervals."
                )

    # ------------------------------------------------------------------ non-finite gradients
    def _handle_nonfinite(self, trainer: pl.Trainer, pl_module: pl.LightningModule, before_update: bool) -> None:
        first = int(self._first_bad_step.reshape(1).tolist()[0])  # exceptional path: a host read is fine here
        bad_groups = [n for n, b in zip(self.layout.names, self._bad_groups.tolist()) if b]
        where = f"at optimizer step {first}" if first >= 0 else "recently"
        msg = (f"GradientMonitor: non-finite gradients {where} in group(s) {', '.join(bad_groups) or '?'} "
               f"(first of them in the model's order: '{bad_groups[0] if bad_groups else '?'}').")
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
        finite = all(bool(torch.isfinite(p).all()) for p in pl_module.parameters())
        self.stop_message = (msg + f" Training stopped (on_nonfinite='stop'); checkpoint: {path} "
                             + ("(finite weights, from before the bad update)." if finite
                                else "(its weights are already non-finite: resume from an earlier checkpoint)."))
        rank_zero_warn(self.stop_message)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"stopped_step": self.stopped_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stopped_step = None  # a resumed run starts watching afresh
