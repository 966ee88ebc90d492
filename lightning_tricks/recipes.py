"""The guide's recipe in one line: the callbacks of its summary table, and its optimizer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_tricks.callbacks import (
    EMA,
    EarlyStopping,
    GradientMonitor,
    LabelSmoothing,
    Mixup,
    TrainingDoctor,
    WarmupCosine,
)
from lightning_tricks.functional._checks import check_number
from lightning_tricks.groups import Layers, param_groups


def recipe(
    *,
    warmup: float | int = 0.1,
    min_lr_ratio: float = 0.0,
    label_smoothing: float = 0.1,
    mixup: float | None = 0.2,
    cutmix: float = 0.0,
    monitor: bool = True,
    early_stopping: str | None = "val_loss",
    patience: int = 10,
    mode: str | None = None,
    restore_best_weights: bool = True,
    start_from_epoch: int = 0,
    doctor: bool = True,
    ema: float | None = None,
) -> list[pl.Callback]:
    """The callbacks of the guide's summary table, configured from a few arguments.

    Args:
        warmup: :class:`WarmupCosine` warmup (fraction of the run, the guide's 0.1, or steps).
        min_lr_ratio: final lr of the cosine as a fraction of the base lr.
        label_smoothing: :class:`LabelSmoothing` epsilon (0 leaves it out).
        mixup: :class:`Mixup` alpha, or ``None``/0 to leave MixUp out.
        cutmix: CutMix alpha (0 leaves CutMix out; with ``mixup`` they alternate).
        monitor: add :class:`GradientMonitor` (stops cleanly on non-finite gradients).
        early_stopping: the metric for :class:`EarlyStopping`, or ``None`` to leave it out.
        patience: early-stopping patience in checks (the guide: 7-10).
        mode: ``"min"`` or ``"max"`` for the early-stopping metric; ``None`` infers it from the metric's name
            (``val_acc`` -> max, ``val_loss`` -> min; see :class:`EarlyStopping`).
        restore_best_weights: end the fit on the best check's weights.
        start_from_epoch: early-stopping checks before this epoch do not count.
        doctor: add :class:`TrainingDoctor`.
        ema: add :class:`EMA` with this decay (evaluated in place of the weights, kept at the end), or ``None``.

    Example (a plain module to the full recipe in two lines)::

        class Net(TricksMixin, L.LightningModule): ...          # 1. the mixin
        trainer = L.Trainer(callbacks=recipe())                 # 2. the callbacks
        # and in configure_optimizers: return adamw(self, lr=1e-3)
    """
    check_number("label_smoothing", label_smoothing, low=0.0, high=1.0, high_open=True)
    if mixup is not None:
        check_number("mixup", mixup, low=0.0)
    check_number("cutmix", cutmix, low=0.0)
    check_number("patience", patience, low=0, integer=True)
    check_number("start_from_epoch", start_from_epoch, low=0, integer=True)
    callbacks: list[pl.Callback] = [WarmupCosine(warmup=warmup, min_lr_ratio=min_lr_ratio)]
    if label_smoothing:
        callbacks.append(LabelSmoothing(label_smoothing))
    if mixup or cutmix:
        callbacks.append(Mixup(alpha=float(mixup or 0.0), cutmix_alpha=cutmix))
    if monitor:
        callbacks.append(GradientMonitor(on_nonfinite="stop"))
    if early_stopping:
        callbacks.append(EarlyStopping(early_stopping, patience=patience, mode=mode,
                                       restore_best_weights=restore_best_weights, start_from_epoch=start_from_epoch))
    if doctor:
        callbacks.append(TrainingDoctor())
    if ema is not None:
        callbacks.append(EMA(decay=ema))
    return callbacks


def adamw(
    module: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    exclude_bias_and_norm: bool = True,
    betas: tuple[float, float] = (0.9, 0.999),
    *,
    no_decay: Iterable[str] | Callable[[str, nn.Parameter], bool] = (),
    layer_decay: float | None = None,
    layers: Layers | None = None,
    lr_mult: Mapping[str, float] | None = None,
) -> torch.optim.AdamW:
    """The guide's optimizer: AdamW, weight decay 0.01, with biases and normalisation weights not decayed.

    The groups come from :func:`lightning_tricks.param_groups` (see it for ``no_decay``, ``layer_decay``, ``layers``
    and ``lr_mult``): biases (parameters named ``bias``) and every parameter of a normalisation layer go in a group
    with ``weight_decay=0``, as timm, Hugging Face and fastai do (decaying them only fights the normalisation); the
    choice is made by module type and name, not by shape, so lazy modules (``LazyLinear``) are grouped right.
    Frozen parameters are left out.
    """
    groups = param_groups(module, lr, weight_decay, exclude_bias_and_norm=exclude_bias_and_norm, no_decay=no_decay,
                          layer_decay=layer_decay, layers=layers, lr_mult=lr_mult)
    return torch.optim.AdamW(groups, lr=lr, betas=betas)
