"""TrainingDoctor: reads the signs of a training run and says, in plain words, what is wrong and what to try."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_tricks.callbacks.gradient_monitor import GradientMonitor
from lightning_tricks.callbacks.warmup_cosine import WarmupCosine
from lightning_tricks.functional._checks import check_number

SEVERITIES = ("info", "warning", "error")
_CHUNK = 512  # batches per stacked chunk of the per-batch records (bounds the number of live scalar tensors)


@dataclass
class Finding:
    """One diagnosis: what, how bad, the numbers behind it and what to do next."""

    code: str
    severity: str
    title: str
    evidence: dict[str, Any]
    advice: list[str]
    epoch: int
    step: int

    def markdown(self) -> str:
        ev = ", ".join(f"{k} = {_fmt(v)}" for k, v in self.evidence.items())
        tips = "".join(f"\n    - {a}" for a in self.advice)
        return f"- **{self.severity.upper()}** [{self.code}] {self.title} (epoch {self.epoch}, step {self.step})\n" \
               f"  - evidence: {ev}\n  - next:{tips}"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@dataclass
class _Epoch:
    epoch: int
    step: int
    train_loss: float | None
    val_loss: float | None
    lr: float | None
    val_metric: float | None
    step_loss_mean: float
    step_loss_max: float
    nonfinite_loss_steps: int
    grad: dict[str, float] = field(default_factory=dict)


class TrainingDoctor(pl.Callback):
    r"""Watch train/validation loss, lr and gradient statistics and report the guide's diagnosis table.

    Findings (each with a severity, the numbers that support it and the next action):

    * ``nonfinite_loss`` (error): the loss became NaN/inf; the step, whether the inputs held NaN/inf, the
      gradient norm's growth and the first non-finite group (from :class:`GradientMonitor`) tell lr too large,
      exploding gradients, bad data or numerics apart.
    * ``loss_not_falling`` (warning): after ``min_epochs``, the epoch training loss fell by less than
      ``flat_tolerance`` from the first epoch: lr too small (with the update/weight ratio when the monitor runs),
      data or labels wrong, output size mismatch.
    * ``overfitting`` (warning): training loss still falls while validation loss is more than
      ``overfit_tolerance`` (20 %) above its best in each of the last ``patience`` (3) epochs, and the
      validation metric (``val_metric``, accuracy by default) stayed more than 1 % below its best in those
      epochs: regularise; if validation never improved, possible leakage or too small a validation set. (A
      validation loss that rises while accuracy holds is calibration drift, which mixup and label smoothing
      cause on purpose: not flagged.)
    * ``unstable_loss`` (warning): steps whose loss is ``spike_ratio`` times the epoch mean, or an epoch loss
      that rose by more than 50 % over the previous one, in two epochs or more: warmup, lower lr, clipping,
      normalisation layers.
    * ``vanishing_gradients`` / ``exploding_gradients`` (warning): flagged by :class:`GradientMonitor`.
    * ``overfit_check_failed`` (error) / ``overfit_check_passed`` (info): the verdict of
      :func:`lightning_tricks.tuning.overfit_check` run on the module before the fit.
    * ``ended_in_warmup`` (warning): with :class:`WarmupCosine`, the run ended before the lr reached its peak.
    * ``healthy`` / ``too_short`` (info).

    The lr it quotes is the schedule's peak when :class:`WarmupCosine` runs: a low lr in the warmup or in the cosine's
    tail is set on purpose and is never blamed.

    A warning is raised when a problem first appears; the report prints at the end of fit, goes to the loggers
    (``doctor/warnings``, ``doctor/errors``) and is written as ``doctor_report.md`` and ``doctor_report.json``
    next to the logs (the logger's ``log_dir``, else ``default_root_dir``; or ``out_dir``).

    Inputs are judged at the steps whose loss is NaN/inf: the float32 sum of the batch's floating inputs, a probe that
    is non-finite exactly when an input is, tells bad data from bad numerics there (a model that copes with NaN
    inputs on purpose, e.g. by ``nan_to_num``, raises no alarm while its loss stays finite).

    Cost: one small kernel per step on the device (that probe); the step loss and the probe are kept as device
    scalars and the host reads them once per epoch, never in between.

    Args:
        train_loss: the logged training loss (``<name>_epoch`` is used when it exists).
        val_loss: the logged validation loss.
        val_metric: a logged validation metric where higher is better (accuracy), or ``None``.
        min_epochs: epochs before the loss-trend findings are judged.
        flat_tolerance: relative fall of the training loss below which it "does not fall".
        overfit_tolerance: relative rise of the validation loss above its best that counts as overfitting.
        patience: epochs the validation loss must stay above that level.
        spike_ratio: a step loss this many times the epoch mean is a spike.
        out_dir: where to write the report (default: next to the logs).
    """

    def __init__(
        self,
        train_loss: str = "train_loss",
        val_loss: str = "val_loss",
        val_metric: str | None = "val_acc",
        min_epochs: int = 3,
        flat_tolerance: float = 0.05,
        overfit_tolerance: float = 0.2,
        patience: int = 3,
        spike_ratio: float = 5.0,
        out_dir: str | None = None,
    ) -> None:
        check_number("min_epochs", min_epochs, low=1, integer=True)
        check_number("flat_tolerance", flat_tolerance, low=0.0, high=1.0, low_open=True, high_open=True)
        check_number("overfit_tolerance", overfit_tolerance, low=0.0, low_open=True)
        check_number("patience", patience, low=1, integer=True)
        check_number("spike_ratio", spike_ratio, low=1.0, low_open=True)
        self.train_loss, self.val_loss, self.val_metric = train_loss, val_loss, val_metric
        self.min_epochs, self.flat_tolerance = min_epochs, flat_tolerance
        self.overfit_tolerance, self.patience, self.spike_ratio = overfit_tolerance, patience, spike_ratio
        self.out_dir = out_dir
        self.findings: list[Finding] = []
        self.history: list[_Epoch] = []
        self.report_paths: list[str] = []

    # ------------------------------------------------------------------ per step: device only
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.findings, self.history, self.report_paths = [], [], []
        self._reset_epoch()
        checked = pl_module.__dict__.get("tricks_overfit_result")  # from lightning_tricks.tuning.overfit_check
        if checked is not None:
            evidence = {"initial_loss": checked.initial_loss, "final_loss": checked.final_loss,
                        "steps": checked.steps, "batch_accuracy": checked.accuracy}
            if checked.passed:
                self._add(trainer, "overfit_check_passed", "info", "the model memorised one batch before training",
                          evidence, ["carry on: the model, the loss and the labels can learn"])
            else:
                self._add(trainer, "overfit_check_failed", "error", "the model could not memorise one batch before "
                          "training (overfit_check)", evidence, checked.likely_causes)

    def _reset_epoch(self) -> None:
        # Per training batch: the step loss and a probe of the inputs (their float32 sum: non-finite exactly when
        # an input is NaN/inf, short of a float32 overflow of the sum) as device scalars, and the optimizer step
        # as a host int. Stacked every `_CHUNK` batches, read by the host once per epoch.
        self._losses: list[Tensor] = []
        self._probes: list[Tensor] = []
        self._steps: list[int] = []
        self._chunks: list[Tensor] = []

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step_of_batch = trainer.global_step  # after a resume's restore: the step the first batch feeds

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The optimizer step this batch contributed to is the global step at the previous batch's end (the counter
        # only moves inside a batch): one hook per batch instead of a batch-start hook as well.
        step, self._step_of_batch = self._step_of_batch, trainer.global_step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, Tensor):
            return  # a skipped step (training_step returned None)
        self._steps.append(step)
        self._losses.append(loss.detach() if loss.requires_grad else loss)  # Lightning's outputs are detached
        self._probes.append(_probe(batch, loss))
        if len(self._losses) == _CHUNK:
            self._stack_chunk()

    def _stack_chunk(self) -> None:
        if self._losses:
            losses = torch.stack([t.reshape(()) for t in self._losses]).float()
            self._chunks.append(torch.stack([losses, torch.stack(self._probes)], dim=1))
            self._losses, self._probes = [], []

    # ------------------------------------------------------------------ per epoch: one host read
    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._stack_chunk()
        rows = np.asarray(torch.cat(self._chunks).tolist(), dtype=np.float64) if self._chunks else np.zeros((0, 2))
        steps = np.asarray(self._steps, dtype=int)
        self._reset_epoch()
        losses = rows[:, 0]
        if pl_module.automatic_optimization:
            # Lightning hands the batch-end hooks the loss divided by `accumulate_grad_batches` (what it
            # back-propagates): undo that here, on the host, so that the step losses are on the step's own scale.
            losses = losses * trainer.accumulate_grad_batches
        ok = np.isfinite(losses)
        finite_in = np.isfinite(rows[:, 1]) | ok  # inputs are judged where the loss is non-finite only
        m = trainer.callback_metrics
        rec = _Epoch(
            epoch=trainer.current_epoch,
            step=trainer.global_step,
            train_loss=_metric(m, f"{self.train_loss}_epoch") or _metric(m, self.train_loss),
            val_loss=_metric(m, self.val_loss),
            lr=trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None,
            val_metric=_metric(m, self.val_metric) if self.val_metric else None,
            step_loss_mean=float(losses[ok].mean()) if ok.any() else float("nan"),
            step_loss_max=float(losses[ok].max()) if ok.any() else float("nan"),
            nonfinite_loss_steps=int((~ok).sum()),
            grad={k: float(v) for k, v in m.items() if k.startswith(("grad/", "amp/"))},
        )
        self.history.append(rec)
        first_bad_loss = int(steps[~ok][0]) if (~ok).any() else -1
        first_bad_input = int(steps[~finite_in][0]) if (~finite_in).any() else -1
        self._diagnose(trainer, rec, first_bad_loss=first_bad_loss, bad_inputs=int((~finite_in).sum()),
                       first_bad_input=first_bad_input)

    # ------------------------------------------------------------------ the diagnosis table
    def _add(self, trainer: pl.Trainer, code: str, severity: str, title: str, evidence: dict[str, Any],
             advice: list[str]) -> None:
        if any(f.code == code for f in self.findings):
            return  # each problem is reported once, when it first appears
        f = Finding(code, severity, title, evidence, advice, trainer.current_epoch, trainer.global_step)
        self.findings.append(f)
        if severity != "info":
            rank_zero_warn(f"TrainingDoctor: {title} ({', '.join(f'{k}={_fmt(v)}' for k, v in evidence.items())}). "
                           f"Next: {advice[0]}")

    def _diagnose(self, trainer: pl.Trainer, rec: _Epoch, first_bad_loss: int, bad_inputs: int,
                  first_bad_input: int) -> None:
        h = self.history
        # 1. non-finite loss
        nonfinite = rec.nonfinite_loss_steps > 0 or (rec.train_loss is not None and not math.isfinite(rec.train_loss))
        if nonfinite or bad_inputs:
            self._nonfinite(trainer, rec, first_bad_loss, bad_inputs, first_bad_input)
        # gradient flags from GradientMonitor
        for key in rec.grad:
            for kind in ("vanishing", "exploding"):
                if key.startswith(f"grad/{kind}/") and rec.grad[key] == 1.0:
                    group = key.rsplit("/", 1)[-1]
                    self._add(trainer, f"{kind}_gradients", "warning",
                              f"the gradients of '{group}' are {kind}", {"group": group, "epoch": rec.epoch},
                              ["exploding: clip gradients (gradient_clip_val=1.0), lower the lr, add normalisation"
                               if kind == "exploding" else
                               "vanishing: check the init (He for ReLU), add residual connections or normalisation, "
                               "raise that group's lr"])
        if len(h) < self.min_epochs or nonfinite:
            return
        losses = [e.train_loss for e in h if e.train_loss is not None and math.isfinite(e.train_loss)]
        # 2. training loss does not fall
        if len(losses) >= self.min_epochs:
            first, now = losses[0], losses[-1]
            fall = (first - now) / abs(first) if first else 0.0
            schedule = _schedule(trainer)
            in_warmup = schedule is not None and trainer.global_step < (schedule.warmup_steps or 0)
            if fall < self.flat_tolerance and not in_warmup:  # (a run inside its warmup is reported at fit end)
                ev: dict[str, Any] = {"first_epoch_loss": first, "now": now, "relative_fall": fall}
                peak = _peak_lr(schedule)
                # The lr that a schedule lowered on purpose (the cosine's tail) is not a cause: judge the peak lr.
                scheduled_low = peak is not None and rec.lr is not None and rec.lr < 0.5 * peak
                ev |= {"peak_lr": peak, "lr_now": rec.lr} if peak is not None else {"lr": rec.lr}
                ratios = [v for k, v in rec.grad.items() if k.startswith("grad/update_ratio/")]
                if ratios and not scheduled_low:
                    ev["max_update_ratio"] = max(ratios)
                small_lr = bool(ratios) and max(ratios) < 1e-5 and not scheduled_low
                lr_name = f"the peak lr ({_fmt(peak)})" if peak is not None else f"the lr ({_fmt(rec.lr)})"
                self._add(trainer, "loss_not_falling", "warning", "the training loss does not fall", ev, [
                    ("the lr is far too small: updates are under 1e-5 of the weights (1e-3 is typical); raise it or "
                     "run lightning_tricks.tuning.lr_find") if small_lr else
                    f"{lr_name} too small? try 10x, or lightning_tricks.tuning.lr_find",
                    "data or labels wrong? look at a batch: do the labels match the inputs (not shuffled apart)?",
                    "output size mismatch? the head must output one logit per class",
                    "can the model overfit one batch? lightning_tricks.tuning.overfit_check(model, loader): if not, "
                    "it is a bug",
                ])
        # 3. training loss falls, validation does not
        vals = [(e.epoch, e.val_loss) for e in h if e.val_loss is not None and math.isfinite(e.val_loss)]
        if len(vals) >= self.min_epochs and len(losses) >= 2:
            best_epoch, best = min(vals, key=lambda t: t[1])
            last = vals[-self.patience:]
            # persistently worse: each of the last `patience` epochs, all after the best one, is above the tolerance
            persistent = len(last) == self.patience and all(
                ep > best_epoch and v > best * (1 + self.overfit_tolerance) for ep, v in last)
            train_at_best = next((e.train_loss for e in h if e.epoch == best_epoch), None)
            still_falling = train_at_best is not None and losses[-1] < train_at_best
            # a validation loss that rises while the validation metric (accuracy) holds is calibration drift, which
            # mixup and label smoothing cause on purpose, not overfitting: the metric must be down too
            metrics = [e.val_metric for e in h if e.val_metric is not None and math.isfinite(e.val_metric)]
            metric_down = not metrics or all(m < max(metrics) * (1 - 0.01) for m in metrics[-self.patience:])
            if persistent and still_falling and metric_down:
                advice = ["regularise: weight decay, dropout, data augmentation, mixup or label smoothing",
                          "stop early and keep the best weights: EarlyStopping(restore_best_weights=True)",
                          "more data, or a smaller model"]
                if best_epoch == 0:
                    advice.append("validation never improved: check for leakage or a validation set that is too "
                                  "small or from another distribution")
                ev = {"best_val_loss": best, "best_epoch": best_epoch, "val_loss_now": vals[-1][1],
                      "train_loss_at_best": train_at_best, "train_loss_now": losses[-1]}
                if metrics:
                    ev |= {f"best_{self.val_metric}": max(metrics), f"{self.val_metric}_now": metrics[-1]}
                self._add(trainer, "overfitting", "warning", "the training loss falls but the validation loss does not",
                          ev, advice)
        # 4. unstable or spiky loss
        spiky = [e.epoch for e in h[1:]
                 if e.step_loss_mean > 0 and e.step_loss_max > self.spike_ratio * e.step_loss_mean]
        rises = [h[i].epoch for i in range(max(1, len(h) - 6), len(h))
                 if h[i].train_loss is not None and h[i - 1].train_loss is not None
                 and h[i].train_loss > 1.5 * h[i - 1].train_loss]
        if len(spiky) >= 2 or len(rises) >= 2:
            self._add(trainer, "unstable_loss", "warning", "the training loss is unstable or spiky",
                      {"epochs_with_spikes": len(spiky), "epoch_loss_rises_over_50pct": len(rises),
                       "worst_spike_ratio": max((e.step_loss_max / e.step_loss_mean for e in h if e.step_loss_mean > 0),
                                                default=0.0), "lr": rec.lr},
                      ["add or lengthen the lr warmup (WarmupCosine)", "lower the lr",
                       "clip gradients (gradient_clip_val=1.0)", "add normalisation layers (BatchNorm/LayerNorm)"])

    def _nonfinite(self, trainer: pl.Trainer, rec: _Epoch, first_bad_loss: int, bad_inputs: int,
                   first_bad_input: int) -> None:
        if any(f.code in ("nonfinite_data", "nonfinite_loss") for f in self.findings):
            return  # reported when it first appeared (a NaN loss usually stays NaN: the weights are NaN by then)
        ev: dict[str, Any] = {"nonfinite_loss_steps": rec.nonfinite_loss_steps, "lr": rec.lr}
        if first_bad_loss >= 0:
            ev["first_nonfinite_loss_step"] = first_bad_loss
        advice: list[str] = []
        if bad_inputs:
            ev["nonfinite_input_batches"] = bad_inputs
            ev["first_nonfinite_input_step"] = first_bad_input
            advice.append(f"NaN/inf in the data (first at step {first_bad_input}): check the dataset and the "
                          "augmentations; assert torch.isfinite(x).all() in the dataset")
        monitor = next((cb for cb in trainer.callbacks if isinstance(cb, GradientMonitor)), None)
        if monitor is not None and getattr(monitor, "stop_message", None):
            ev["gradient_monitor"] = monitor.stop_message
        norms = [e.grad.get("grad/norm_max") for e in self.history if e.grad.get("grad/norm_max") is not None]
        norms = [n for n in norms if math.isfinite(n)]
        if len(norms) >= 2 and norms[-1] > 100 * norms[0]:
            ev["grad_norm_growth"] = norms[-1] / norms[0]
            advice.append("exploding gradients: clip them (gradient_clip_val=1.0) and lower the lr")
        peak = _peak_lr(_schedule(trainer))
        lr_name = f"peak lr = {_fmt(peak)}" if peak is not None else f"lr = {_fmt(rec.lr)}"
        advice += [f"lr too large? ({lr_name}): try 10x smaller, with a warmup, or lightning_tricks.tuning.lr_find",
                   "clip gradients (gradient_clip_val=1.0)",
                   "numerics: use log_softmax/cross_entropy rather than log(softmax), add eps to divisions and logs, "
                   "prefer bf16 to fp16"]
        if bad_inputs and first_bad_input == first_bad_loss:  # the first NaN/inf loss came with NaN/inf inputs
            self._add(trainer, "nonfinite_data", "error", "the training data holds NaN/inf values (the loss became "
                      "NaN/inf at the first step whose inputs did)", ev, advice)
        else:
            self._add(trainer, "nonfinite_loss", "error", "the loss became NaN/inf", ev, advice)

    # ------------------------------------------------------------------ report
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        h = self.history
        schedule = _schedule(trainer)
        if schedule is not None and schedule.warmup_steps and trainer.global_step < schedule.warmup_steps:
            self._add(trainer, "ended_in_warmup", "warning", "the run ended inside the lr warmup: the lr never reached "
                      "its peak, so the loss trends say little about the lr",
                      {"optimizer_steps": trainer.global_step, "warmup_steps": schedule.warmup_steps,
                       "peak_lr": _peak_lr(schedule)},
                      [f"train for more than the warmup's {schedule.warmup_steps} optimizer steps, or shorten it "
                       "(WarmupCosine(warmup=...): a float is a fraction of the run, an int a number of steps)"])
        if len(h) < self.min_epochs:
            self._add(trainer, "too_short", "info", f"only {len(h)} epoch(s): too short to judge the loss trends",
                      {"epochs": len(h), "min_epochs": self.min_epochs}, ["train longer for a diagnosis"])
        elif not any(f.severity != "info" for f in self.findings):
            losses = [e.train_loss for e in h if e.train_loss is not None]
            vals = [e.val_loss for e in h if e.val_loss is not None]
            ev: dict[str, Any] = {"train_loss_first": losses[0], "train_loss_last": losses[-1]} if losses else {}
            if vals:
                ev["best_val_loss"] = min(vals)
            self._add(trainer, "healthy", "info", "no problem found", ev, ["carry on"])
        counts = {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}
        for logger in trainer.loggers:
            logger.log_metrics({"doctor/warnings": counts["warning"], "doctor/errors": counts["error"]},
                               step=trainer.global_step)
        folder = self.out_dir or trainer.log_dir or trainer.default_root_dir  # on every rank: log_dir broadcasts
        if trainer.is_global_zero:
            self._write(folder)
        rank_zero_info(self.report() + (f"\n(written to {self.report_paths[0]})" if self.report_paths else ""))

    def report(self) -> str:
        """The findings as Markdown."""
        lines = ["## TrainingDoctor report", ""]
        order = {s: i for i, s in enumerate(reversed(SEVERITIES))}
        lines += [f.markdown() for f in sorted(self.findings, key=lambda f: order[f.severity])] or ["(nothing)"]
        return "\n".join(lines)

    def _write(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        md, js = os.path.join(folder, "doctor_report.md"), os.path.join(folder, "doctor_report.json")
        with open(md, "w") as f:
            f.write(self.report() + "\n")
        with open(js, "w") as f:
            json.dump({"findings": [asdict(x) for x in self.findings], "history": [asdict(e) for e in self.history]},
                      f, indent=1, default=str)
        self.report_paths = [md, js]

    @property
    def worst_severity(self) -> str:
        """``"error"``, ``"warning"`` or ``"info"``."""
        return max((f.severity for f in self.findings), key=SEVERITIES.index, default="info")


def _schedule(trainer: pl.Trainer) -> WarmupCosine | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, WarmupCosine)), None)


def _peak_lr(schedule: WarmupCosine | None) -> float | None:
    """The largest base lr of a planned :class:`WarmupCosine`, else ``None``."""
    if schedule is None or not schedule.base_lrs:
        return None
    return max(lr for group in schedule.base_lrs for lr in group)


def _metric(m: dict[str, Tensor], key: str) -> float | None:
    v = m.get(key)
    return None if v is None else float(v)


def _probe(batch: Any, loss: Tensor) -> Tensor:
    """The float32 sum of the batch's floating tensors: non-finite exactly when one of them holds NaN/inf (short of a
    float32 overflow of the sum); 0 for a batch without floating tensors."""
    tensors = _float_tensors(batch)
    if len(tensors) == 1:
        x = tensors[0]
        return x.sum() if x.dtype == torch.float32 else x.sum(dtype=torch.float32)
    if tensors:
        return torch.stack([t.sum(dtype=torch.float32) for t in tensors]).sum()
    return loss.new_zeros((), dtype=torch.float32)


def _float_tensors(batch: Any) -> list[Tensor]:
    """The floating-point tensors of a batch (nested lists, tuples and dicts), in order."""
    if isinstance(batch, Tensor):
        return [batch] if batch.is_floating_point() else []
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    out: list[Tensor] = []
    for b in items:  # the usual (x, y) batch: one pass, no recursion
        if isinstance(b, Tensor):
            if b.is_floating_point():
                out.append(b)
        else:
            out.extend(_float_tensors(b))
    return out
