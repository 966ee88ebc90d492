"""Label smoothing as a callback over :func:`~lightning_tricks.functional.smooth_targets`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from lightning_tricks.callbacks._base import TrickCallback
from lightning_tricks.functional._checks import check_choice, check_number
from lightning_tricks.functional.targets import CONVENTIONS, smooth_soft

if TYPE_CHECKING:
    from lightning_tricks.mixin import TricksMixin


class LabelSmoothing(TrickCallback):
    r"""Train against smoothed targets (Szegedy et al., 2016); validation and test keep plain targets.

    Args:
        smoothing: :math:`\varepsilon \in [0, 1)`; the guide's default is 0.1.
        convention: ``"uniform"`` (PyTorch's: every class gets :math:`\varepsilon/K`, the default) or
            ``"others"`` (the guide's code: the :math:`K-1` wrong classes share :math:`\varepsilon`).

    Composes with :class:`Mixup`: a target is smoothed once, and smoothing commutes with mixing.

    Example::

        trainer = L.Trainer(callbacks=[LabelSmoothing(0.1)])
    """

    order = 10
    transforms_target = True

    def __init__(self, smoothing: float = 0.1, convention: str = "uniform") -> None:
        check_number("smoothing", smoothing, low=0.0, high=1.0, high_open=True)
        check_choice("convention", convention, CONVENTIONS)
        self.smoothing = float(smoothing)
        self.convention = convention

    def tricks_transform_target(self, pl_module: TricksMixin, soft_target: Tensor) -> Tensor:
        if self.convention == "others" and soft_target.shape[-1] < 2:
            raise ValueError("the 'others' convention needs at least 2 classes.")
        return smooth_soft(soft_target, self.smoothing, self.convention)  # arguments checked at construction
