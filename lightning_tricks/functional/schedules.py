r"""Learning-rate schedules as pure functions of the optimizer step.

Each function returns a *factor* that multiplies a parameter group's base learning rate:
``lr(step) = base_lr * factor(step)``. ``step`` counts optimizer steps (Lightning's
``trainer.global_step``), never batches, so gradient accumulation, devices and
``limit_train_batches`` do not stretch or shrink the curve. Being pure, the schedules need no state
to resume: the step alone fixes the lr.

Linear warmup (shared by every schedule here), for ``step < W`` with ``W = warmup_steps``:

.. math:: f(s) = a + (1 - a)\,\frac{s}{W}

where ``a = start_factor`` is the factor of the very first update. The transformers library's
``get_*_with_warmup`` functions are the case ``a = 0``: their first update gets lr 0 and is wasted.
Our default ``start_factor=None`` means ``a = 1 / (W + 1)``, which gives the evenly spaced ramp
``f(s) = (s + 1) / (W + 1)``: no zero step, no jump at the end of warmup, and the same slope.
"""

from __future__ import annotations

import math

from lightning_tricks.functional._checks import check_number

__all__ = [
    "constant_with_warmup",
    "linear_decay",
    "resolve_start_factor",
    "step_decay",
    "warmup_cosine",
    "warmup_factor",
]


def resolve_start_factor(start_factor: float | None, warmup_steps: int) -> float:
    """Return the warmup's first factor: ``start_factor``, or ``1 / (warmup_steps + 1)`` when ``None``."""
    if start_factor is None:
        return 1.0 / (warmup_steps + 1)
    check_number("start_factor", start_factor, low=0.0, high=1.0)
    return float(start_factor)


def warmup_factor(step: int, *, warmup_steps: int, start_factor: float | None = None) -> float:
    """Linear warmup factor ``a + (1 - a) * step / warmup_steps`` for ``step < warmup_steps``, else 1."""
    if step >= warmup_steps:
        return 1.0
    a = resolve_start_factor(start_factor, warmup_steps)
    return a + (1.0 - a) * step / warmup_steps


def _check_common(step: int, warmup_steps: int, total_steps: int | None = None) -> None:
    check_number("step", step, low=0, integer=True)
    check_number("warmup_steps", warmup_steps, low=0, integer=True)
    if total_steps is not None:
        check_number("total_steps", total_steps, low=1, integer=True)
        if warmup_steps >= total_steps:
            raise ValueError(
                f"`warmup_steps` must be smaller than `total_steps` ({total_steps}), got {warmup_steps}: "
                "the warmup would last the whole run."
            )


def warmup_cosine(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    min_lr_ratio: float = 0.0,
    start_factor: float | None = None,
) -> float:
    r"""Linear warmup, then cosine decay to ``min_lr_ratio`` at ``total_steps``.

    .. math::
        f(s) = \begin{cases}
          a + (1 - a)\,s / W & s < W \\
          r + (1 - r)\,\tfrac12\bigl(1 + \cos(\pi\,p)\bigr),\; p = \min\!\bigl(1, \tfrac{s - W}{T - W}\bigr) & s \ge W
        \end{cases}

    with ``W = warmup_steps``, ``T = total_steps``, ``r = min_lr_ratio`` and ``a = start_factor``.
    With ``start_factor=0`` and ``min_lr_ratio=0`` this is transformers'
    ``get_cosine_schedule_with_warmup`` (the guide's reference) for every ``s <= T``; past ``T`` the
    factor stays at ``r`` instead of rising again.

    Args:
        step: optimizer steps already taken (0 for the first update).
        total_steps: length of the schedule in optimizer steps (> ``warmup_steps``).
        warmup_steps: length of the linear warmup in optimizer steps (>= 0).
        min_lr_ratio: final factor, in [0, 1].
        start_factor: factor of the first update, in [0, 1]; ``None`` means ``1 / (warmup_steps + 1)``.
    """
    _check_common(step, warmup_steps, total_steps)
    check_number("min_lr_ratio", min_lr_ratio, low=0.0, high=1.0)
    start = resolve_start_factor(start_factor, warmup_steps)
    if step < warmup_steps:
        return start + (1.0 - start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_decay(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    start_factor: float | None = None,
) -> float:
    r"""Linear warmup, then linear decay to ``min_lr_ratio`` at ``total_steps``.

    .. math:: f(s) = r + (1 - r)\,\bigl(1 - \min(1, \tfrac{s - W}{T - W})\bigr) \quad (s \ge W)

    With ``start_factor=0`` and ``min_lr_ratio=0`` this is transformers' ``get_linear_schedule_with_warmup``.
    """
    _check_common(step, warmup_steps, total_steps)
    check_number("min_lr_ratio", min_lr_ratio, low=0.0, high=1.0)
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps=warmup_steps, start_factor=start_factor)
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)


def step_decay(
    step: int,
    *,
    step_size: int,
    gamma: float = 0.1,
    warmup_steps: int = 0,
    start_factor: float | None = None,
) -> float:
    r"""Linear warmup, then multiply by ``gamma`` every ``step_size`` steps (the guide: x0.1 every 30 epochs).

    .. math:: f(s) = \gamma^{\lfloor (s - W) / \mathrm{step\_size} \rfloor} \quad (s \ge W)

    The decay counts from the end of warmup. Express epochs in steps: ``step_size = 30 * steps_per_epoch``.
    """
    _check_common(step, warmup_steps)
    check_number("step_size", step_size, low=1, integer=True)
    check_number("gamma", gamma, low=0.0, high=1.0, low_open=True)
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps=warmup_steps, start_factor=start_factor)
    return gamma ** ((step - warmup_steps) // step_size)


def constant_with_warmup(step: int, *, warmup_steps: int, start_factor: float | None = None) -> float:
    r"""Linear warmup, then the base lr for ever: ``f(s) = 1`` for ``s >= W``."""
    _check_common(step, warmup_steps)
    return warmup_factor(step, warmup_steps=warmup_steps, start_factor=start_factor)
