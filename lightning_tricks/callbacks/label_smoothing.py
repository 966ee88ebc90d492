"""Label smoothing as a callback over :func:`~lightning_tricks.functional.smooth_targets`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor
from typing_extensions import override

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
        num_classes: the class count ``K``, when the module does not say it (``TricksMixin.num_classes``).

    Composes with :class:`Mixup`: a target is smoothed once, and smoothing commutes with mixing.

    Example::

        trainer = L.Trainer(callbacks=[LabelSmoothing(0.1)])
    """

    order = 10

    def __init__(self, smoothing: float = 0.1, convention: str = "uniform", num_classes: int | None = None) -> None:
        check_number("smoothing", smoothing, low=0.0, high=1.0, high_open=True)
        check_choice("convention", convention, CONVENTIONS)
        if num_classes is not None:
            check_number("num_classes", num_classes, low=2, integer=True)
        self.smoothing = float(smoothing)
        self.convention = convention
        self.num_classes = num_classes

    @override
    def transform_batch(self, pl_module: TricksMixin, x: Tensor, soft_y: Tensor) -> tuple[Tensor, Tensor]:
        if self.convention == "others" and soft_y.shape[-1] < 2:
            raise ValueError("the 'others' convention needs at least 2 classes.")
        exact = pl_module.ignore_index is None  # every row is a sample (sums to 1): no row-mass read
        return x, smooth_soft(soft_y, self.smoothing, self.convention, rows_sum_to_one=exact)
