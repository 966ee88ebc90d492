r"""The LR range test (guide section 3): grow the lr exponentially, watch the loss, pick the lr before it blows up.

Step :math:`k` of :math:`N` uses the lr multiplier :math:`f_k = (l_{max}/l_{min})^{k/(N-1)}`: group 0 of optimizer 0
goes from :math:`l_{min}` to :math:`l_{max}` and every other param group keeps its ratio to it (discriminative lrs
survive).
The loss of each optimizer step (the sum over its micro-batches, averaged over ranks) is smoothed with an
exponential moving average with bias correction, :math:`\hat L_k = m_k / (1 - \beta^{k+1})`,
:math:`m_k = \beta m_{k-1} + (1 - \beta) L_k`. Suggestions, on the smoothed curve without its first 10 % and last
5 % of points:

* ``valley``: fastai's default: the stretch of points, as long as the loss's longest decreasing subsequence, that ends
  where that subsequence ends; the suggestion lies half way along it;
* ``steep``: the steepest descent of the loss against :math:`\log_{10}` lr;
* ``minimum / 10``: a tenth of the lr at the lowest loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np

from lightning_tricks.functional._checks import check_choice

__all__ = ["CHOICES", "LRFinderResult", "suggest"]

CHOICES = ("valley", "steep", "minimum")


@dataclass
class LRFinderResult:
    """The sweep (group 0's lr and the loss of each optimizer step) and the suggestions."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    valley: float | None
    steep: float | None
    minimum: float | None  # a tenth of the lr at the lowest smoothed loss
    clear: bool  # False when the curve shows no clear valley (a warning said so)
    notes: list[str] = field(default_factory=list)
    #: group 0's lr as the optimizer was configured when the sweep began (the sweep scales every group by one factor)
    start_lr: float | None = None

    def suggestion(self, choice: str = "steep") -> float:
        check_choice("choice", choice, CHOICES)
        value = getattr(self, choice)
        if value is None:
            raise RuntimeError(f"no '{choice}' suggestion: the sweep recorded too few points ({len(self.lrs)}).")
        return float(value)

    def apply(self, module: pl.LightningModule, choice: str = "steep") -> float:
        """Scale the module's ``lr`` (an attribute or a hyper-parameter) by the sweep's chosen factor and return the
        new value; the next ``configure_optimizers`` (e.g. ``adamw(self, lr=self.hparams.lr)``) uses it.

        The sweep moves every param group by one factor, and the suggestion is group 0's lr. With layer-wise groups
        (``adamw(self, lr, layer_decay=0.5)``: group 0 is the bottom layer) the module's ``lr`` is not group 0's, so
        it is scaled by ``suggestion / start_lr`` rather than replaced: every group lands where the sweep chose, as
        :class:`LRFinder` sets them.
        """
        suggestion = self.suggestion(choice)
        has_hparam = "lr" in getattr(module, "hparams", {})
        if not has_hparam and not hasattr(module, "lr"):
            raise AttributeError(f"{type(module).__name__} has no `lr` attribute or hyper-parameter: pass the "
                                 f"suggestion ({suggestion:.3g}, group 0's lr) to your optimizer yourself.")
        current = float(module.hparams["lr"] if has_hparam else getattr(module, "lr"))  # noqa: B009
        lr = suggestion if not self.start_lr else current * suggestion / self.start_lr
        if has_hparam:
            module.hparams["lr"] = lr
        if hasattr(module, "lr"):
            setattr(module, "lr", lr)  # noqa: B010
        return lr

    def plot(self, path: str | None = None) -> Any:
        """The loss against the lr (log scale) with the suggestions marked; saved to ``path`` when given."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(self.lrs, self.losses, color="0.75", lw=0.8, label="loss")
        ax.plot(self.lrs, self.smoothed, color="tab:blue", label="smoothed")
        for name, colour in (("valley", "tab:green"), ("steep", "tab:orange"), ("minimum", "tab:red")):
            value = getattr(self, name)
            if value is not None:
                ax.axvline(value, color=colour, ls="--", label=f"{name} {value:.2g}")
        ax.set(xscale="log", xlabel="learning rate (param group 0)", ylabel="training loss", title="LR range test")
        finite = [v for v in self.smoothed if math.isfinite(v)]
        if finite:
            ax.set_ylim(min(finite) - 0.05 * abs(min(finite)), finite[0] * 1.5 if finite[0] > 0 else None)
        ax.legend(fontsize=8)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig


def suggest(lrs: Sequence[float], smoothed: Sequence[float]) -> tuple[float | None, float | None, float | None, bool,
                                                                      list[str]]:
    """``(valley, steep, minimum / 10, clear, notes)`` from a sweep's lrs and smoothed losses (see the module)."""
    lr, loss = np.asarray(lrs, dtype=float), np.asarray(smoothed, dtype=float)
    keep = np.isfinite(loss)
    lr, loss = lr[keep], loss[keep]
    n = len(loss)
    start, stop = int(0.1 * n), n - max(1, int(0.05 * n))
    lr, loss = lr[start:stop], loss[start:stop]
    if len(loss) < 5:
        return None, None, None, False, ["too few points for a suggestion"]
    minimum = float(lr[int(np.argmin(loss))] / 10)
    steep = float(lr[int(np.argmin(np.gradient(loss, np.log10(lr))))])
    # fastai's valley: run[i] is the length of the longest decreasing subsequence ending at point i; the valley is the
    # stretch of that many points ending at the longest one's end (not at its first element, which may sit far back
    # on a plateau that barely falls), and the suggestion half way along it
    m = len(loss)
    run = [1] * m
    for i in range(m):
        for j in range(i):
            if loss[j] > loss[i] and run[j] + 1 > run[i]:
                run[i] = run[j] + 1
    end = int(np.argmax(run))
    begin = max(0, end - run[end])
    third = (end - begin) / 3
    valley = float(lr[begin + int(third) + int(third / 2)])
    notes = []
    fall = (loss[0] - loss.min()) / abs(loss[0]) if loss[0] else 0.0
    if run[end] < max(5, 0.1 * m):
        notes.append(f"the loss decreases over only {run[end]} of {m} points: no clear valley")
    if fall < 0.05:
        notes.append(f"the loss falls by only {100 * fall:.1f} % over the sweep: no clear valley")
    return valley, steep, minimum, not notes, notes
