"""The doctor's rules, one by one, on hand-made histories (lightning_tricks.diagnosis)."""

from __future__ import annotations

from typing import Any

import pytest

from lightning_tricks.diagnosis import (
    Context,
    EpochRecord,
    Settings,
    diagnose,
    diverging_loss,
    exploding_growth,
    monitor_flags,
    nonfinite,
    not_falling,
    overfitting,
    rising_loss,
    underfitting,
    unstable,
)

S, C = Settings(), Context()


def history(train: list[float], val: list[float] | None = None, acc: list[float] | None = None,
            first: float | None = 2.3, **per_epoch: Any) -> list[EpochRecord]:
    """Epoch records from curves; `per_epoch` gives lists of other fields (grad dicts, step loss maxima...)."""
    out = []
    for i, loss in enumerate(train):
        fields = {k: v[i] for k, v in per_epoch.items()}
        fields.setdefault("step_loss_max", loss * 1.2)
        out.append(EpochRecord(epoch=i, step=10 * (i + 1), train_loss=loss, val_loss=val[i] if val else None,
                               lr=0.01, val_metric=acc[i] if acc else None, step_loss_mean=loss,
                               nonfinite_loss_steps=0, first_step_loss=first if i == 0 else loss, **fields))
    return out


def codes(h: list[EpochRecord], s: Settings = S, c: Context = C) -> list[str]:
    return [d.code for d in diagnose(h, s, c)]


def all_advice(h: list[EpochRecord], s: Settings = S, c: Context = C) -> str:
    return " ".join(a for d in diagnose(h, s, c) for a in d.advice).lower()


def test_a_healthy_run_has_no_finding() -> None:
    h = history([1.5, 0.8, 0.5, 0.35, 0.3, 0.28], val=[1.2, 0.7, 0.5, 0.42, 0.4, 0.39],
                acc=[0.6, 0.8, 0.85, 0.88, 0.89, 0.9])
    assert codes(h) == []


def test_nonfinite_tells_data_from_numerics() -> None:
    h = history([2.0, 1.5])
    h[1].nonfinite_loss_steps, h[1].first_nonfinite_loss_step = 3, 14
    assert nonfinite(h, S, C).code == "nonfinite_loss"
    h[1].nonfinite_input_batches, h[1].first_nonfinite_input_step = 1, 14
    assert nonfinite(h, S, C).code == "nonfinite_data"
    assert codes(h) == ["nonfinite_data"]  # a non-finite run is judged by that alone


def test_diverging_step_losses_or_validation() -> None:
    spiky = history([70.0, 2.5, 2.1], step_loss_max=[270.0, 4.7, 2.4])
    d = diverging_loss(spiky, S, C)
    assert d is not None and d.severity == "error" and d.evidence["worst_over_initial"] == pytest.approx(270 / 2.3)
    # the ResNet: a validation loss of 1e14 and more while the training loss looked fine
    resnet = history([7.5, 9.0, 11.0, 14.0], val=[2.9e14, 2.3e10, 7.2e8, 8.4e18], first=7.0)
    assert diverging_loss(resnet, S, C) is not None and "healthy" not in codes(resnet)
    assert diverging_loss(history([2.2, 1.5, 1.0], val=[2.0, 1.4, 1.1]), S, C) is None


def test_rising_loss_never_advises_raising_the_lr() -> None:
    h = history([2.2, 1.54, 1.43, 1.56, 1.97, 2.10])  # the SGD at lr 1.0: down, then back up
    d = rising_loss(h, S, C)
    assert d is not None and d.evidence["best_epoch"] == 2 and d.evidence["rise_over_best"] > 0.2
    assert "lower" in d.advice[0]
    assert "raise" not in all_advice(h) and "too small" not in all_advice(h)
    assert rising_loss(history([2.2, 1.5, 1.4, 1.45]), S, C) is None  # within the tolerance of its best


def test_exploding_growth_of_gradients_or_updates() -> None:
    grads = [{"grad/norm_max": 5.8e3}, {"grad/norm_max": 4e5}, {"grad/norm_max": 9.5e6}]
    d = exploding_growth(history([2.0, 1.9, 1.9], grad=grads), S, C)
    assert d is not None and d.evidence["growth"] == pytest.approx(9.5e6 / 5.8e3)
    ratios = [{"grad/update_ratio/a": 1.6}, {"grad/update_ratio/a": 2.1}, {"grad/update_ratio/a": 1.8}]
    assert exploding_growth(history([2.0, 1.9, 1.9], grad=ratios), S, C).evidence["max_update_ratio"] == 2.1
    assert exploding_growth(history([2.0, 1.0, 0.5], grad=[{"grad/norm_max": 1.0}] * 3), S, C) is None


def test_unstable_needs_two_epochs_with_spikes_or_jumps() -> None:
    h = history([1.0, 0.8, 0.7, 0.6], step_loss_max=[1.2, 5.0, 4.5, 0.7])
    assert unstable(h, S, C) is not None
    assert unstable(history([1.0, 0.8, 0.7, 0.6], step_loss_max=[1.2, 5.0, 0.8, 0.7]), S, C) is None
    jumps = history([1.0, 0.8, 0.7, 0.6, 0.5], val=[1.0, 2.0, 0.8, 1.9, 0.7])
    assert unstable(jumps, S, C).evidence["epochs_with_jumps"] == 2


def test_not_falling_points_the_lr_only_where_the_evidence_does() -> None:
    flat = [2.30, 2.29, 2.29, 2.28]
    tiny = history(flat, grad=[{"grad/update_ratio/a": 1e-7}] * 4)
    assert "raise it" in not_falling(tiny, S, C).advice[0]
    large = history(flat, grad=[{"grad/update_ratio/a": 0.05}] * 4)
    assert "too large" in not_falling(large, S, C).advice[0] and "raise" not in not_falling(large, S, C).advice[0]
    unknown = not_falling(history(flat), S, C).advice[0]
    assert "lr_find" in unknown and "raise" not in unknown
    assert not_falling(history([2.3, 1.5, 2.25, 2.28]), S, C) is None  # it fell, then came back: not flat
    assert not_falling(history(flat[:2]), S, C) is None  # too few epochs
    assert not_falling(history(flat), S, Context(in_warmup=True)) is None


def test_vanishing_only_while_the_loss_is_high() -> None:
    flags = [{"grad/vanishing/net.head": 1.0}] * 4
    high = history([2.3, 2.25, 2.2, 2.2], grad=flags)
    assert monitor_flags("vanishing")(high, S, C).evidence["group"] == "net.head"
    memorised = history([1.0, 0.1, 0.01, 0.001], grad=flags)  # the wide net memorising 64 samples
    assert monitor_flags("vanishing")(memorised, S, C) is None
    depth = [{"grad/norm/net.1": 5e-11, "grad/norm/net.3": 1e-6, "grad/norm/net.5": 0.4}] * 4
    d = monitor_flags("vanishing")(history([2.3, 2.3, 2.3, 2.3], grad=depth), S, C)
    assert d is not None and d.evidence["group"] == "net.1" and d.evidence["largest_group"] == "net.5"


def test_overfitting_by_metric_or_by_memorisation_not_calibration_drift() -> None:
    train = [1.5, 0.8, 0.4, 0.2, 0.1, 0.05]
    val = [1.2, 0.8, 0.9, 1.1, 1.2, 1.3]
    assert overfitting(history(train, val, acc=[0.6, 0.8, 0.78, 0.75, 0.74, 0.73]), S, C) is not None
    # accuracy holds, but the training loss is under a tenth of the validation loss: memorised
    assert overfitting(history([*train[:-1], 0.0005], val, acc=[0.6, 0.8, 0.81, 0.82, 0.83, 0.83]), S, C) is not None
    # accuracy holds and the training loss stays comparable (mixup, label smoothing): calibration drift
    drift = history([1.9, 1.5, 1.3, 1.2, 1.15, 1.1], [1.0, 0.6, 0.75, 0.8, 0.82, 0.85],
                    acc=[0.7, 0.85, 0.86, 0.87, 0.87, 0.88])
    assert overfitting(drift, S, C) is None


def test_underfitting_settles_high_without_a_gap() -> None:
    train = [2.02, 1.79, 1.74, 1.71, 1.69, 1.67, 1.665, 1.66, 1.655]
    val = [1.83, 1.77, 1.74, 1.71, 1.70, 1.69, 1.685, 1.68, 1.678]
    d = underfitting(history(train, val), S, C)
    assert d is not None and d.evidence["of_initial"] == pytest.approx(1.678 / 2.3)
    assert underfitting(history([2.0, 1.2, 0.6, 0.3, 0.2, 0.15, 0.14, 0.14, 0.14]), S, C) is None  # low: healthy
    overshoot = history([2.2, 1.5, 1.4, 1.6, 1.9, 2.0, 2.0, 2.0, 2.0], [2.0, 1.5, 1.4, 1.6, 1.9, 2.0, 2.0, 2.0, 2.0])
    assert "underfitting" not in codes(overshoot) and "rising_loss" in codes(overshoot)


def test_a_wandering_mixup_loss_with_validation_holding_is_not_rising() -> None:
    """Regression (the demo's recipe, 100 epochs): the mixed training loss rose 25 % above its best while the
    validation loss and accuracy held; that is mixup's noise, not an lr too large."""
    train = [1.6, 1.2, 1.0, 0.84, 0.95, 1.05, 1.05]
    val = [1.0, 0.7, 0.55, 0.5, 0.48, 0.47, 0.47]
    acc = [0.7, 0.8, 0.85, 0.87, 0.88, 0.885, 0.885]
    assert rising_loss(history(train, val, acc), S, C) is None
    worse = history(train, [1.0, 0.7, 0.55, 0.5, 0.6, 0.7, 0.75], [0.7, 0.8, 0.85, 0.87, 0.84, 0.80, 0.78])
    assert rising_loss(worse, S, C) is not None
