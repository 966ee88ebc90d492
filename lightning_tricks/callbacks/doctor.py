"""TrainingDoctor: reads the signs of a training run and says, in plain words, what is wrong and what to try."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_tricks._io import log_to_loggers, report_dir
from lightning_tricks.callbacks.doctor_report import Finding, fmt, ordered, render, write
from lightning_tricks.callbacks.gradient_monitor import GradientMonitor
from lightning_tricks.callbacks.warmup_cosine import WarmupCosine
from lightning_tricks.diagnosis import OVERSHOOT, SEVERITIES, Context, EpochRecord, Settings, diagnose
from lightning_tricks.functional._checks import check_number
from lightning_tricks.peers import find_callback
from lightning_tricks.tuning.overfit import OverfitResult

_CHUNK = 512  # batches per stacked chunk of the per-batch records (bounds the number of live scalar tensors)


class TrainingDoctor(pl.Callback):
    r"""Watch train/validation loss, lr and gradient statistics and report the guide's diagnosis table.

    Findings (each with a severity, the numbers that support it and the next action), judged at each training
    epoch's end by the rules of :mod:`lightning_tricks.diagnosis` (one small function per finding):
    ``nonfinite_loss``/``nonfinite_data`` and ``diverging_loss`` (errors); ``rising_loss``, ``exploding_growth``,
    ``exploding_gradients``, ``unstable_loss``, ``vanishing_gradients`` (only while the loss is still high),
    ``loss_not_falling``, ``overfitting``, ``underfitting``, ``unknown`` (the watched metrics were never logged: no
    data, no verdict) and ``ended_in_warmup`` (warnings); ``overfit_check_failed`` (error) / ``overfit_check_passed``
    (the verdict of :func:`lightning_tricks.tuning.overfit_check` run before the fit, given as ``overfit=``);
    ``healthy`` / ``too_short`` (info). A run whose loss rose or whose gradients grew is never told to raise the lr;
    a flat loss is told a direction for the lr only when the update-to-weight ratio gives one. ``docs/doctor.md``
    has the table and how right it is on runs whose fault is known.

    The history and the findings are in the checkpoint: a resumed run gets the uninterrupted run's report.

    The lr it quotes is the schedule's peak when :class:`WarmupCosine` runs: a low lr in the warmup or in the cosine's
    tail is set on purpose and is never blamed.

    A warning is raised when a problem first appears; the report prints at the end of fit, goes to the loggers
    (``doctor/warnings``, ``doctor/errors``) and is written as ``doctor_report.md`` and ``doctor_report.json``
    in ``out_dir``, else next to the logs (the logger's ``log_dir``); a Trainer without a logger and no ``out_dir``
    writes no file (the report is :meth:`report`).

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
        out_dir: where to write the report (default: next to the logs; nowhere without a logger).
        overfit: the result of :func:`~lightning_tricks.tuning.overfit_check` run before this fit, reported as the
            first finding.
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
        overfit: OverfitResult | None = None,
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
        self.overfit = overfit
        self.findings: list[Finding] = []
        self.history: list[EpochRecord] = []
        self._missing_warned = False
        self.report_paths: list[str] = []

    # ------------------------------------------------------------------ per step: device only
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.__dict__.pop("_resumed", False):
            self.findings, self.history, self._missing_warned = [], [], False
        self.report_paths = []
        self._reset_epoch()
        checked = self.overfit
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
        rec = EpochRecord(
            epoch=trainer.current_epoch,
            step=trainer.global_step,
            train_loss=_metric(m, f"{self.train_loss}_epoch") or _metric(m, self.train_loss),
            val_loss=_metric(m, self.val_loss),
            lr=trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None,
            val_metric=_metric(m, self.val_metric) if self.val_metric else None,
            step_loss_mean=float(losses[ok].mean()) if ok.any() else float("nan"),
            step_loss_max=float(losses[ok].max()) if ok.any() else float("nan"),
            nonfinite_loss_steps=int((~ok).sum()),
            first_step_loss=float(losses[ok][0]) if ok.any() else None,
            nonfinite_input_batches=int((~finite_in).sum()),
            first_nonfinite_loss_step=int(steps[~ok][0]) if (~ok).any() else -1,
            first_nonfinite_input_step=int(steps[~finite_in][0]) if (~finite_in).any() else -1,
            grad={k: float(v) for k, v in m.items() if k.startswith(("grad/", "amp/"))},
        )
        self.history.append(rec)
        self._check_watched_keys(trainer, rec)
        settings = Settings(self.min_epochs, self.flat_tolerance, self.overfit_tolerance, self.patience,
                            self.spike_ratio, self.val_metric)
        schedule = _schedule(trainer)
        monitor = find_callback(trainer, GradientMonitor)
        context = Context(peak_lr=_peak_lr(schedule),
                          in_warmup=schedule is not None and trainer.global_step < (schedule.warmup_steps or 0),
                          monitor_stop_message=getattr(monitor, "stop_message", None))
        for d in diagnose(self.history, settings, context):
            if d.code == "underfitting" and any(f.code in OVERSHOOT for f in self.findings):
                continue  # the loss is held up by overshooting updates, not by a small model
            self._add(trainer, d.code, d.severity, d.title, d.evidence, d.advice)

    def _check_watched_keys(self, trainer: pl.Trainer, rec: EpochRecord) -> None:
        """No data, no verdict: when the watched training loss was never logged (or the validation loss, while a
        validation loop runs), say once which keys were logged and which could be watched."""
        missing = [] if rec.train_loss is not None else [self.train_loss]
        validated = trainer.val_dataloaders is not None and trainer.num_val_batches and sum(trainer.num_val_batches)
        if rec.val_loss is None and validated:
            missing.append(self.val_loss)
        if not missing or self._missing_warned:
            return
        self._missing_warned = True
        logged = sorted(k for k in trainer.callback_metrics if not k.startswith(("grad/", "amp/", "doctor/")))
        candidates = [k for k in logged if "loss" in k]
        self._add(trainer, "unknown", "warning", f"the watched metrics {missing} were never logged: the doctor cannot "
                  "judge the loss trends", {"missing": ", ".join(missing), "logged": ", ".join(logged) or "(none)"},
                  [f"pass the keys your module logs, e.g. TrainingDoctor(train_loss={candidates[0]!r}"
                   + (f", val_loss={candidates[1]!r})" if len(candidates) > 1 else ")") if candidates else
                   "log the training loss (self.log('train_loss', loss)) and the validation loss ('val_loss')"])

    # ------------------------------------------------------------------ the findings
    def _add(self, trainer: pl.Trainer, code: str, severity: str, title: str, evidence: dict[str, Any],
             advice: list[str]) -> None:
        if any(f.code == code for f in self.findings):
            return  # each problem is reported once, when it first appears
        f = Finding(code, severity, title, evidence, advice, trainer.current_epoch, trainer.global_step)
        self.findings.append(f)
        if severity != "info":
            rank_zero_warn(f"TrainingDoctor: {title} ({', '.join(f'{k}={fmt(v)}' for k, v in evidence.items())}). "
                           f"Next: {advice[0]}")

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
        elif not any(f.severity != "info" for f in self.findings):  # ("unknown" is a warning: never healthy)
            losses = [e.train_loss for e in h if e.train_loss is not None]
            vals = [e.val_loss for e in h if e.val_loss is not None]
            ev: dict[str, Any] = {"train_loss_first": losses[0], "train_loss_last": losses[-1]} if losses else {}
            if vals:
                ev["best_val_loss"] = min(vals)
            self._add(trainer, "healthy", "info", "no problem found", ev, ["carry on"])
        counts = {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}
        log_to_loggers(trainer, {"doctor/warnings": counts["warning"], "doctor/errors": counts["error"]})
        folder = report_dir(trainer, self.out_dir)
        if folder is not None and trainer.is_global_zero:
            self.report_paths = write(folder, self.findings, self.history)
        rank_zero_info(self.report() + (f"\n(written to {self.report_paths[0]})" if self.report_paths else ""))

    def ordered_findings(self) -> list[Finding]:
        """The findings in the report's order: errors, then warnings, then information, each by the rules' priority
        (the first is the verdict)."""
        return ordered(self.findings)

    def report(self) -> str:
        """The findings as Markdown."""
        return render(self.findings)

    # ------------------------------------------------------------------ checkpoint
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(train_loss=self.train_loss, val_loss=self.val_loss)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [asdict(e) for e in self.history], "findings": [asdict(f) for f in self.findings],
                "missing_warned": self._missing_warned}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed run continues the history: the same report as the uninterrupted run. (Lightning restores
        # callback state before on_fit_start, and after it for strategies that restore after setup.)
        self.history = [EpochRecord(**e) for e in state_dict.get("history", [])]
        self.findings = [Finding(**f) for f in state_dict.get("findings", [])]
        self._missing_warned = state_dict.get("missing_warned", False)
        self._resumed = True

    @property
    def worst_severity(self) -> str:
        """``"error"``, ``"warning"`` or ``"info"``."""
        return max((f.severity for f in self.findings), key=SEVERITIES.index, default="info")


def _schedule(trainer: pl.Trainer) -> WarmupCosine | None:
    return find_callback(trainer, WarmupCosine)


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
