"""The schedules against references: transformers' formulas (the guide's), timm and torch schedulers."""

from __future__ import annotations

import math

import pytest
import torch
from timm.scheduler import CosineLRScheduler

from lightning_tricks.functional import constant_with_warmup, linear_decay, step_decay, warmup_cosine


def hf_cosine_with_warmup(step: int, num_warmup_steps: int, num_training_steps: int) -> float:
    """transformers' `_get_cosine_schedule_with_warmup_lr_lambda` with num_cycles=0.5 (the guide's reference)."""
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def hf_linear_with_warmup(step: int, num_warmup_steps: int, num_training_steps: int) -> float:
    """transformers' `_get_linear_schedule_with_warmup_lr_lambda`."""
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    return max(0.0, float(num_training_steps - step) / float(max(1, num_training_steps - num_warmup_steps)))


@pytest.mark.parametrize(("warmup", "total"), [(0, 10), (1, 2), (10, 100), (37, 1000)])
def test_warmup_cosine_equals_transformers(warmup: int, total: int) -> None:
    for step in range(total + 1):
        ours = warmup_cosine(step, total_steps=total, warmup_steps=warmup, min_lr_ratio=0.0, start_factor=0.0)
        assert ours == pytest.approx(hf_cosine_with_warmup(step, warmup, total), abs=1e-12)


@pytest.mark.parametrize(("warmup", "total"), [(5, 50), (0, 7)])
def test_linear_decay_equals_transformers(warmup: int, total: int) -> None:
    for step in range(total + 1):
        ours = linear_decay(step, total_steps=total, warmup_steps=warmup, start_factor=0.0)
        assert ours == pytest.approx(hf_linear_with_warmup(step, warmup, total), abs=1e-12)


@pytest.mark.parametrize(("warmup", "total", "min_ratio", "start"), [(10, 100, 0.1, 0.05), (0, 50, 0.0, 0.0)])
def test_warmup_cosine_equals_timm(warmup: int, total: int, min_ratio: float, start: float) -> None:
    base = 0.5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    timm_sched = CosineLRScheduler(
        opt, t_initial=total - warmup, lr_min=min_ratio * base, warmup_t=warmup, warmup_lr_init=start * base,
        warmup_prefix=True, t_in_epochs=False,
    )
    for step in range(total):
        ours = base * warmup_cosine(step, total_steps=total, warmup_steps=warmup, min_lr_ratio=min_ratio,
                                    start_factor=start)
        assert ours == pytest.approx(timm_sched._get_lr(step)[0], abs=1e-12)


def test_default_start_factor_wastes_no_step_and_ramps_evenly() -> None:
    factors = [warmup_cosine(s, total_steps=100, warmup_steps=4) for s in range(6)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[0] > 0


def test_past_total_stays_at_min() -> None:
    assert warmup_cosine(150, total_steps=100, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_step_decay_equals_torch_steplr() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
    for step in range(100):
        assert step_decay(step, step_size=30, gamma=0.1) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        sched.step()


def test_cosine_without_warmup_equals_torch_cosine_annealing() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40, eta_min=0.2)
    for step in range(41):
        ours = warmup_cosine(step, total_steps=40, warmup_steps=0, min_lr_ratio=0.2)
        assert ours == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9)
        opt.step()
        sched.step()


def test_constant_with_warmup() -> None:
    assert [constant_with_warmup(s, warmup_steps=3, start_factor=0.0) for s in range(5)] == pytest.approx(
        [0, 1 / 3, 2 / 3, 1, 1]
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(total_steps=10, warmup_steps=-1), "warmup_steps"),
        (dict(total_steps=10, warmup_steps=10), "warmup_steps"),
        (dict(total_steps=0, warmup_steps=0), "total_steps"),
        (dict(total_steps=10, warmup_steps=2, min_lr_ratio=1.5), "min_lr_ratio"),
        (dict(total_steps=10, warmup_steps=2, start_factor=-0.1), "start_factor"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        warmup_cosine(0, **kwargs)
