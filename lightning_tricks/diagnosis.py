"""The training doctor's rules: small functions of a run's per-epoch history, one per finding (no Lightning here).

Each rule reads the history (:class:`EpochRecord`, one per training epoch), the doctor's :class:`Settings` and the
run's :class:`Context`, and returns a :class:`Diagnosis` or ``None``. The advice follows the diagnosis table of the
guide (section 10): a loss that does not fall (lr too small, data or labels, output size), training that falls while
validation does not (overfitting, leakage), a NaN loss (lr too large, exploding gradients, bad data, numerics),
unstable training (normalisation, warmup, lower lr, clipping). Two rules guard the direction of the lr advice:

* a loss that rose, or gradients that grew, is never told to raise the lr;
* a flat loss is told which way to move the lr only when the update-to-weight ratio says so (tiny: raise it;
  large: lower it); otherwise it is sent to the LR range test, which tells.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SEVERITIES = ("info", "warning", "error")

#: An update changing the weights by more than this fraction per step is far too large (1e-3 is typical).
LARGE_UPDATE = 1e-1
#: ... and by less than this, far too small.
TINY_UPDATE = 1e-5


@dataclass
class EpochRecord:
    """What the doctor keeps of one training epoch (host floats, read once per epoch)."""

    epoch: int
    step: int
    train_loss: float | None
    val_loss: float | None
    lr: float | None
    val_metric: float | None
    step_loss_mean: float
    step_loss_max: float
    nonfinite_loss_steps: int
    first_step_loss: float | None = None  # the epoch's first finite step loss (the run's initial loss in epoch 0)
    nonfinite_input_batches: int = 0
    first_nonfinite_loss_step: int = -1
    first_nonfinite_input_step: int = -1
    grad: dict[str, float] = field(default_factory=dict)  # the GradientMonitor's last logged values


@dataclass(frozen=True)
class Settings:
    """The doctor's tolerances (see :class:`~lightning_tricks.TrainingDoctor`)."""

    min_epochs: int = 3
    flat_tolerance: float = 0.05
    overfit_tolerance: float = 0.2
    patience: int = 3
    spike_ratio: float = 5.0
    val_metric: str | None = "val_acc"


@dataclass(frozen=True)
class Context:
    """What the rules need to know of the run besides its history."""

    peak_lr: float | None = None  # a WarmupCosine's peak: a low lr in its warmup or tail is not a cause
    in_warmup: bool = False
    monitor_stop_message: str | None = None


@dataclass
class Diagnosis:
    code: str
    severity: str
    title: str
    evidence: dict[str, Any]
    advice: list[str]


Rule = Callable[[list[EpochRecord], Settings, Context], "Diagnosis | None"]


# ------------------------------------------------------------------------------------------------ helpers
def _finite(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def train_losses(h: list[EpochRecord]) -> list[float]:
    return _finite([e.train_loss for e in h])


def initial_loss(h: list[EpochRecord]) -> float | None:
    """The run's first finite step loss (before any learning), else its first epoch's loss."""
    first = next((e.first_step_loss for e in h if e.first_step_loss is not None and math.isfinite(e.first_step_loss)),
                 None)
    if first is not None:
        return first
    losses = train_losses(h)
    return losses[0] if losses else None


def update_ratio(e: EpochRecord) -> float | None:
    ratios = _finite([v for k, v in e.grad.items() if k.startswith("grad/update_ratio/")])
    return max(ratios) if ratios else None


def grad_norms(h: list[EpochRecord]) -> list[float]:
    return _finite([e.grad.get("grad/norm_max") for e in h])


def _lr_name(h: list[EpochRecord], c: Context) -> str:
    return f"the peak lr ({c.peak_lr:.3g})" if c.peak_lr is not None else f"the lr ({_fmt(h[-1].lr)})"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


LOWER_LR = ["lr too large: lower it 3-10x, or run lightning_tricks.tuning.lr_find",
            "add or lengthen a warmup (WarmupCosine)", "clip gradients (gradient_clip_val=1.0)"]


# ------------------------------------------------------------------------------------------------ the rules
def nonfinite(h: list[EpochRecord], s: Settings, c: Context) -> Diagnosis | None:
    """The loss became NaN/inf: bad data when the first bad loss came with bad inputs, else lr/gradients/numerics."""
    e = next((e for e in h if e.nonfinite_loss_steps or e.nonfinite_input_batches
              or (e.train_loss is not None and not math.isfinite(e.train_loss))), None)
    if e is None:
        return None
    ev: dict[str, Any] = {"nonfinite_loss_steps": e.nonfinite_loss_steps, "lr": e.lr}
    if e.first_nonfinite_loss_step >= 0:
        ev["first_nonfinite_loss_step"] = e.first_nonfinite_loss_step
    advice: list[str] = []
    if e.nonfinite_input_batches:
        ev |= {"nonfinite_input_batches": e.nonfinite_input_batches,
               "first_nonfinite_input_step": e.first_nonfinite_input_step}
        advice.append(f"NaN/inf in the data (first at step {e.first_nonfinite_input_step}): check the dataset and the "
                      "augmentations; assert torch.isfinite(x).all() in the dataset")
    if c.monitor_stop_message:
        ev["gradient_monitor"] = c.monitor_stop_message
    norms = grad_norms(h)
    if len(norms) >= 2 and norms[-1] > 100 * norms[0]:
        ev["grad_norm_growth"] = norms[-1] / norms[0]
        advice.append("exploding gradients: clip them (gradient_clip_val=1.0) and lower the lr")
    lr_name = f"peak lr = {_fmt(c.peak_lr)}" if c.peak_lr is not None else f"lr = {_fmt(e.lr)}"
    advice += [f"lr too large? ({lr_name}): try 10x smaller, with a warmup, or lightning_tricks.tuning.lr_find",
               "clip gradients (gradient_clip_val=1.0)",
               "numerics: use log_softmax/cross_entropy rather than log(softmax), add eps to divisions and logs, "
               "prefer bf16 to fp16"]
    if e.nonfinite_input_batches and e.first_nonfinite_input_step == e.first_nonfinite_loss_step:
        return Diagnosis("nonfinite_data", "error", "the training data holds NaN/inf values (the loss became NaN/inf "
                         "at the first step whose inputs did)", ev, advice)
    return Diagnosis("nonfinite_loss", "error", "the loss became NaN/inf", ev, advice)


def diverging_loss(h: list[EpochRecord], s: Settings, c: Context) -> Diagnosis | None:
    """Step losses far above the run's initial loss (a classifier starts near log K and never goes 10x above it
    unless the updates overshoot), or a validation loss that exploded."""
    start = initial_loss(h)
    if start is None or start <= 0:
        return None
    peaks = [(e.epoch, e.step_loss_max) for e in h if math.isfinite(e.step_loss_max)]
    worst_epoch, worst = max(peaks, key=lambda t: t[1], default=(None, 0.0))
    vals = _finite([e.val_loss for e in h])
    val_blowup = max(vals) / start if vals else 0.0
    if worst < 10 * start and val_blowup < 100:
        return None
    ev: dict[str, Any] = {"initial_loss": start, "worst_step_loss": worst, "worst_epoch": worst_epoch,
                          "worst_over_initial": worst / start}
    if vals:
        ev |= {"worst_val_loss": max(vals), "val_loss_now": vals[-1]}
    norms = grad_norms(h)
    if len(norms) >= 2:
        ev["grad_norm_growth"] = max(norms) / norms[0] if norms[0] > 0 else float("inf")
    ratio = max(_finite([update_ratio(e) for e in h]), default=None)
    if ratio is not None:
        ev["max_update_ratio"] = ratio
    return Diagnosis("diverging_loss", "error", "the loss diverged: it went far above its initial value", ev,
                     [*LOWER_LR, "check the loss for a wrong scale (a sum where a mean is meant)"])


def rising_loss(h: list[EpochRecord], s: Settings, c: Context) -> Diagnosis | None:
    """The training loss rose well above its own best (by ``overfit_tolerance``) in each of the last two epochs, and
    the validation got worse with it (its loss above its best by as much, or its metric more than 5 % below its best;
    judged on the training loss alone without a validation loop): the updates overshoot. A training loss that
    wanders while validation holds is mixup's noise, not an overshoot."""
    finite = [(e.epoch, e.train_loss) for e in h if e.train_loss is not None and math.isfinite(e.train_loss)]
    if len(finite) < s.min_epochs:
        return None
    best_epoch, best = min(finite, key=lambda t: t[1])
    last = finite[-2:]
    if best <= 0 or any(ep <= best_epoch for ep, _ in last):
        return None
    rise = min(v for _, v in last) / best - 1
    if rise < s.overfit_tolerance:
        return None
    vals, metrics = _finite([e.val_loss for e in h]), _finite([e.val_metric for e in h])
    val_worse = vals and vals[-1] > min(vals) * (1 + s.overfit_tolerance)
    metric_worse = metrics and metrics[-1] < max(metrics) * (1 - 0.05)  # beyond an epoch's noise
    if (vals or metrics) and not (val_worse or metric_worse):
        return None
    ev: dict[str, Any] = {"best_train_loss": best, "best_epoch": best_epoch, "train_loss_now": finite[-1][1],
                          "rise_over_best": rise, "lr_now": h[-1].lr}
    if c.peak_lr is not None:
        ev["peak_lr"] = c.peak_lr
    return Diagnosis("rising_loss", "warning", "the training loss rose above its best and stays there", ev, LOWER_LR)


def exploding_growth(h: list[EpochRecord], s: Settings, c: Context) -> Diagnosis | None:
    """The gradient norm grew by two orders of magnitude, or an update moves the weights by over 10 % a step."""
    norms = grad_norms(h)
    growth = max(norms) / norms[0] if len(norms) >= 2 and norms[0] > 0 else 0.0
    ratios = _finite([update_ratio(e) for e in h])
    ratio = max(ratios, default=0.0)
    if growth < 100 and ratio < LARGE_UPDATE:
        return None
    ev: dict[str, Any] = {}
    if growth >= 100:
        ev |= {"grad_norm_first": norms[0], "grad_norm_max": max(norms), "growth": growth}
    if ratio >= LARGE_UPDATE:
        ev["max_update_ratio"] = ratio
    ev["lr"] = h[-1].lr
    return Diagnosis("exploding_growth", "warning", "the gradients or the updates grow out of scale", ev,
                     ["clip gradients (gradient_clip_val=1.0)", *LOWER_LR[:2],
                      "add normalisation layers (BatchNorm/LayerNorm) or residual connections"])


def unstable(h: list[EpochRecord], s: Settings, c: Context) -> Diagnosis | None:
    """Spikes: step losses several times their epoch's mean, or epoch losses (training or validation) that jump up
    by half, in two epochs or more."""
    spiky = [e.epoch for e in h[1:] if e.step_loss_mean > 0 and e.step_loss_max > s.spike_ratio * e.step_loss_mean]
    jumps = []
    for key in ("train_loss", "val_loss"):
        values = [getattr(e, key) for e in h]
        jumps += [h[i].epoch for i in range(1, len(h)) if values[i] is not None and values[i - 1] is not None
                  and math.isfinite(values[i]) and values[i] > 1.5 * values[i - 1]]
    if len(spiky) < 2 and len(set(jumps)) < 2:
        return None
    worst = max((e.step_loss_max / e.step_loss_mean for e in h if e.step_loss_mean > 0), default=0.0)
    return Diagnosis("unstable_loss", "warning", "the loss is unstable or spiky",
                     {"epochs_with_spikes": len(spiky), "epochs_with_jumps": len(set(jumps)),
                      "worst_spike_ratio": worst, "lr": h[-1].lr},
                     ["add or lengthen the lr warmup (WarmupCosine)", "lower the lr",
                      "clip gradients (gradient_clip_val=1.0)", "add normalisation layers (BatchNorm/LayerNorm)"])


def monitor_flags(kind: str) -> Rule:
    """GradientMonitor's ``grad/<kind>/<group>`` flags. Vanishing gradients count only while the loss is still
    high (above half its initial value): a loss near zero has small gradients by nature."""

    def rule(h: list[EpochRecord], s: Settings, c: Context) -> Diagnosis | None:
        flagged = next(((e, k) for e in h for k, v in e.grad.items() if k.startswith(f"grad/{kind}/") and v == 1.0),
                       None)
        if flagged is None and kind == "vanishing" and h:
            flagged = _depth_vanishing(h[-1])
        if flagged is None:
            return None
        e, key = flagged
        group = key.rsplit("/", 1)[-1]
        evidence: dict[str, Any] = {"group": group, "epoch": e.epoch}
        if kind == "vanishing":
            start, losses = initial_loss(h), train_losses(h)
            if start is not None and losses and losses[-1] < 0.5 * start:
                return None
            advice = ["check the init (He for ReLU), add residual connections or normalisation",
                      "use ReLU-family activations rather than sigmoid/tanh in deep stacks"]
        else:
            advice = ["clip gradients (gradient_clip_val=1.0)", *LOWER_LR[:2],
                      "add normalisation layers (BatchNorm/LayerNorm)"]
        norms = {k.rsplit("/", 1)[-1]: v for k, v in e.grad.items() if k.startswith("grad/norm/")}
        if kind == "vanishing" and norms:
            top = max(norms, key=norms.__getitem__)
            evidence |= {"its_grad_norm": norms.get(group), "largest_group": top, "largest_grad_norm": norms[top]}
        return Diagnosis(f"{kind}_gradients", "warning", f"the gradients of '{group}' are {kind}", evidence, advice)

    return rule


def _depth_vanishing(e: EpochRecord) -> tuple[EpochRecord, str] | None:
    """The group whose gradient norm is under 1e-4 of the largest group's (groups without a gradient, e.g. frozen,
    left out): the signal of a deep stack of saturating layers, present from the first step (so the monitor's
    comparison with a group's own early level cannot see it)."""
    norms = {k: v for k, v in e.grad.items() if k.startswith("grad/norm/") and math.isfinite(v) and v > 0}
    if len(norms) < 3:
        return None
    low = min(norms, key=norms.__getitem__)
    if norms[low] >= 1e-4 * max(norms.values()):
        return None
    return e, "grad/vanishing/" + low.rsplit("/", 1)[-1]


def not_falling(h: list[EpochRecord], s: Settings, c: Context) -> Diagnosis | None:
    """The training loss stayed within ``flat_tolerance`` of its first epoch's (a rise is :func:`rising_loss`'s)."""
    losses = train_losses(h)
    if len(losses) < s.min_epochs or c.in_warmup:
        return None
    first, now = losses[0], losses[-1]
    fall = (first - now) / abs(first) if first else 0.0
    if first <= 0 or (first - min(losses)) / first >= s.flat_tolerance or fall <= -s.flat_tolerance:
        return None  # it fell at some point (or rose: rising_loss)
    e = h[-1]
    ev: dict[str, Any] = {"first_epoch_loss": first, "now": now, "relative_fall": fall}
    scheduled_low = c.peak_lr is not None and e.lr is not None and e.lr < 0.5 * c.peak_lr
    ev |= {"peak_lr": c.peak_lr, "lr_now": e.lr} if c.peak_lr is not None else {"lr": e.lr}
    ratio = update_ratio(e)
    lr_name = _lr_name(h, c)
    if ratio is not None and not scheduled_low:
        ev["max_update_ratio"] = ratio
    if ratio is not None and ratio < TINY_UPDATE and not scheduled_low:
        first_advice = (f"{lr_name} is far too small: updates are under {TINY_UPDATE:g} of the weights (1e-3 is "
                        "typical); raise it 10-100x, or run lightning_tricks.tuning.lr_find")
    elif ratio is not None and ratio >= 1e-2:
        first_advice = (f"{lr_name} is probably too large: updates move the weights by {ratio:.2g} a step (1e-3 is "
                        "typical) and the loss bounces in place; lower it, or run lightning_tricks.tuning.lr_find")
    else:
        first_advice = (f"is {lr_name} right? Too small and the loss crawls, too large and it bounces in place: "
                        "run lightning_tricks.tuning.lr_find to tell")
    return Diagnosis("loss_not_falling", "warning", "the training loss does not fall", ev, [
        first_advice,
        "data or labels wrong? look at a batch: do the labels match the inputs (not shuffled apart)?",
        "output size mismatch? the head must output one logit per class",
        "can the model overfit one batch? lightning_tricks.tuning.overfit_check(model, loader): if not, it is a bug",
    ])


def overfitting(h: list[EpochRecord], s: Settings, c: Context) -> Diagnosis | None:
    """Training falls while validation stays above its best; the validation metric fell too, or the model has
    memorised its training set (a training loss under a tenth of the validation loss). A validation loss that rises
    while accuracy holds and the training loss stays comparable is calibration drift (mixup and label smoothing do
    it on purpose): not flagged."""
    losses = train_losses(h)
    vals = [(e.epoch, e.val_loss) for e in h if e.val_loss is not None and math.isfinite(e.val_loss)]
    if len(vals) < s.min_epochs or len(losses) < 2:
        return None
    best_epoch, best = min(vals, key=lambda t: t[1])
    last = vals[-s.patience:]
    persistent = len(last) == s.patience and all(ep > best_epoch and v > best * (1 + s.overfit_tolerance)
                                                 for ep, v in last)
    train_at_best = next((e.train_loss for e in h if e.epoch == best_epoch), None)
    still_falling = train_at_best is not None and losses[-1] < train_at_best
    metrics = _finite([e.val_metric for e in h])
    metric_down = not metrics or all(m < max(metrics) * (1 - 0.01) for m in metrics[-s.patience:])
    memorised = losses[-1] < 0.1 * vals[-1][1]
    if not (persistent and still_falling and (metric_down or memorised)):
        return None
    advice = ["regularise: weight decay, dropout, data augmentation, mixup or label smoothing",
              "stop early and keep the best weights: EarlyStopping(restore_best_weights=True)",
              "more data, or a smaller model"]
    if best_epoch == 0:
        advice.append("validation never improved: check for leakage or a validation set that is too small or from "
                      "another distribution")
    ev: dict[str, Any] = {"best_val_loss": best, "best_epoch": best_epoch, "val_loss_now": vals[-1][1],
                          "train_loss_at_best": train_at_best, "train_loss_now": losses[-1]}
    if metrics:
        ev |= {f"best_{s.val_metric}": max(metrics), f"{s.val_metric}_now": metrics[-1]}
    return Diagnosis("overfitting", "warning", "the training loss falls but the validation loss does not", ev, advice)


def underfitting(h: list[EpochRecord], s: Settings, c: Context) -> Diagnosis | None:
    """The loss fell, then settled high: the last ``patience`` epochs gained under 2 % each, the validation loss
    (the training loss without one) is still above half the initial loss, and training and validation agree (no
    gap to regularise away): the model is too small for the task, or regularised too hard."""
    start = initial_loss(h)
    losses = train_losses(h)
    vals = _finite([e.val_loss for e in h])
    level = vals if vals else losses
    if start is None or len(level) < s.min_epochs + s.patience or len(losses) < 2:
        return None
    recent = level[-(s.patience + 1):]
    gains = [(a - b) / a for a, b in itertools.pairwise(recent) if a > 0]
    plateau = bool(gains) and all(g < 0.02 for g in gains)
    high = min(level) > 0.5 * start
    no_gap = not vals or abs(vals[-1] - losses[-1]) < 0.1 * losses[-1]
    fell = losses[-1] < losses[0] * (1 - s.flat_tolerance)
    if not (plateau and high and no_gap and fell):
        return None
    return Diagnosis("underfitting", "warning", "the loss settled high, with training and validation alike",
                     {"initial_loss": start, "loss_now": level[-1], "of_initial": level[-1] / start,
                      "train_loss_now": losses[-1], "val_loss_now": vals[-1] if vals else None},
                     ["a bigger model (wider or deeper), or less regularisation (weight decay, dropout)",
                      "train longer or with a higher lr only if the loss is still falling (it is not)",
                      "check that the inputs carry the information (features, resolution)"])


#: Findings that say the updates overshoot (lr too large): never advised to raise the lr.
OVERSHOOT = frozenset({"diverging_loss", "rising_loss", "exploding_growth", "exploding_gradients", "unstable_loss"})

#: The rules in the report's order of priority within a severity.
RULES: list[tuple[str, Rule]] = [
    ("nonfinite", nonfinite),
    ("diverging_loss", diverging_loss),
    ("rising_loss", rising_loss),
    ("exploding_growth", exploding_growth),
    ("exploding_gradients", monitor_flags("exploding")),
    ("unstable_loss", unstable),
    ("vanishing_gradients", monitor_flags("vanishing")),
    ("loss_not_falling", not_falling),
    ("overfitting", overfitting),
    ("underfitting", underfitting),
]


def diagnose(h: list[EpochRecord], s: Settings, c: Context) -> list[Diagnosis]:
    """Every rule's diagnosis of the history so far, in :data:`RULES` order. A run whose loss went non-finite is
    judged by :func:`nonfinite` alone (its later numbers say nothing more); the trend rules wait for
    ``min_epochs`` epochs."""
    found = [d for _, rule in RULES[:1] if (d := rule(h, s, c)) is not None]
    if found:
        return found
    found = [d for _, rule in RULES[1:] if (d := rule(h, s, c)) is not None]
    if any(d.code in OVERSHOOT for d in found):  # a loss held up by overshooting updates is not a small model
        found = [d for d in found if d.code != "underfitting"]
    return found
