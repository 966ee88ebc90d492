"""Label smoothing as a callback over :func:`~lightning_tricks.functional.smooth_targets`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from lightning_tricks.callbacks._base import TrickCallback
from lightning_tricks.callbacks._dispatch import skip_unused_batch_hooks
from lightning_tricks.functional._checks import check_choice, check_number
from lightning_tricks.functional.targets import CONVENTIONS, smooth_soft, smoothed_one_hot, smoothing_table

if TYPE_CHECKING:
    from lightning_tricks.mixin import TricksMixin


class LabelSmoothing(TrickCallback):
    r"""Train against smoothed targets (Szegedy et al., 2016); validation and test keep plain targets.

    Args:
        smoothing: :math:`\varepsilon \in [0, 1)`; the guide's default is 0.1.
        convention: ``"uniform"`` (PyTorch's: every class gets :math:`\varepsilon/K`, the default) or
            ``"others"`` (the guide's code: the :math:`K-1` wrong classes share :math:`\varepsilon`).

    Composes with :class:`Mixup`: a target is smoothed once, and smoothing commutes with mixing.

    With class-index targets (and no ``ignore_index``) the smoothed targets are one row gather from a ``(K, K)``
    table of smoothed one-hot rows built once per class count and device
    (:func:`~lightning_tricks.functional.targets.smoothing_table`), then the float32 soft cross-entropy.
    Measured inside a training step on the CPU, that is cheaper than torch's own
    ``F.cross_entropy(logits, y, label_smoothing=eps)`` (loss and backward: about 0.04 ms less per step).

    Example::

        trainer = L.Trainer(callbacks=[LabelSmoothing(0.1)])
    """

    order = 10
    transforms_target = True
    targets_before_forward = True

    def __init__(self, smoothing: float = 0.1, convention: str = "uniform") -> None:
        check_number("smoothing", smoothing, low=0.0, high=1.0, high_open=True)
        check_choice("convention", convention, CONVENTIONS)
        self.smoothing = float(smoothing)
        self.convention = convention
        skip_unused_batch_hooks(self)

    def tricks_transform_target(self, pl_module: TricksMixin, soft_target: Tensor) -> Tensor:
        if self.convention == "others" and soft_target.shape[-1] < 2:
            raise ValueError("the 'others' convention needs at least 2 classes.")
        return smooth_soft(soft_target, self.smoothing, self.convention)  # arguments checked at construction

    def tricks_soft_from_indices(self, pl_module: TricksMixin, target: Tensor, num_classes: int) -> Tensor | None:
        if target.ndim != 1 or (self.convention == "others" and num_classes < 2):
            return None  # the general path raises the clear errors
        # The table of the last call, rebuilt when the class count, the device or the arguments change (a changed
        # smoothing gets a new table): one tuple comparison per step.
        key = (num_classes, target.device, self.smoothing, self.convention)
        cached = self.__dict__.get("_table")
        if cached is None or cached[0] != key:
            cached = self._table = (key, smoothing_table(num_classes, self.smoothing, self.convention, target.device))
        return smoothed_one_hot(target, num_classes, self.smoothing, self.convention, cached[1])

    def tricks_dominant_class(self, pl_module: TricksMixin, hard: Tensor, num_classes: int) -> Tensor | None:
        # Smoothing keeps the labelled class on top unless the wrong classes' share overtakes it ("others" with
        # eps >= (K - 1) / K); "uniform" always does (1 - eps + eps / K > eps / K).
        if self.convention == "others" and 1.0 - self.smoothing <= self.smoothing / max(num_classes - 1, 1):
            return None
        return hard
