"""Vanishing and exploding gradient groups, judged against each group's own early-run level (host side, on the
norms :class:`~lightning_tricks.GradientMonitor` reads at its logging intervals)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn


class GradientHealth:
    """Each group's mean gradient norm over the first ``baseline_steps`` optimizer steps is its level; a group whose
    norm stays below ``vanish_ratio`` or above ``explode_ratio`` times it for ``patience`` logging intervals is
    flagged (``grad/vanishing/<group>`` or ``grad/exploding/<group>`` = 1 while flagged, 0 once when it recovers)
    and warned about once."""

    def __init__(self, names: Sequence[str], baseline_steps: int, vanish_ratio: float, explode_ratio: float,
                 patience: int) -> None:
        self.names = list(names)
        self.baseline_steps, self.patience = baseline_steps, patience
        self.vanish_ratio, self.explode_ratio = vanish_ratio, explode_ratio
        self._baseline_sum = np.zeros(len(self.names))
        self._baseline_n = 0
        self._out_of_range = [0] * len(self.names)
        self._flagged: set[str] = set()
        self._warned: set[str] = set()

    def update(self, steps: Sequence[int], norms: np.ndarray, global_step: int) -> dict[str, float]:
        """The flags to log for an interval: ``norms`` holds one row of group norms per optimizer step of
        ``steps``."""
        flags: dict[str, float] = {}
        for step, row in zip(steps, norms):
            if step < self.baseline_steps and np.isfinite(row).all():
                self._baseline_sum += row
                self._baseline_n += 1
        if self._baseline_n == 0 or steps[0] < self.baseline_steps:
            return flags
        finite_rows = norms[np.isfinite(norms).all(axis=1)]
        if len(finite_rows) == 0:
            return flags
        level, now = self._baseline_sum / self._baseline_n, finite_rows.mean(axis=0)
        for i, name in enumerate(self.names):
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
                    flags[key] = 1.0  # logged while flagged, 0 once when it recovers: few keys otherwise
                    self._flagged.add(key)
                elif key in self._flagged:
                    flags[key] = 0.0
                    self._flagged.discard(key)
            if state and self._out_of_range[i] >= self.patience and f"{state}/{name}" not in self._warned:
                self._warned.add(f"{state}/{name}")
                rank_zero_warn(
                    f"GradientMonitor: the gradients of '{name}' are {state} at step {global_step}: mean norm "
                    f"{now[i]:.3g} vs {level[i]:.3g} over the first {self.baseline_steps} steps "
                    f"({now[i] / level[i]:.2g}x) for {self._out_of_range[i]} logging intervals."
                )
        return flags
