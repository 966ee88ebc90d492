"""Label smoothing as a callback: the smoothed cross-entropy of :func:`~lightning_tricks.functional.cross_entropy`."""

from __future__ import annotations

from torch import Tensor
from typing_extensions import override

from lightning_tricks.functional._checks import check_choice, check_number
from lightning_tricks.functional.targets import CONVENTIONS, TargetPlan
from lightning_tricks.trick import TrickCallback, TricksModule


class LabelSmoothing(TrickCallback):
    r"""Train against smoothed targets (Szegedy et al., 2016); validation and test keep plain targets.

    The smoothing is applied in the loss, :meth:`TricksMixin.tricks_loss`: the targets your training step receives
    are the loader's, and the loss equals the cross-entropy against the smoothed distribution, computed from the
    class indices (for the uniform convention, ``F.cross_entropy(logits, y, label_smoothing=smoothing)`` itself).
    Every target shape torch's cross-entropy takes works: ``(N,)`` classes, ``(N, L)`` tokens, ``(N, H, W)``
    pixels, with ``ignore_index`` for padding; the class count is read from the logits.

    Args:
        smoothing: :math:`\varepsilon \in [0, 1)`; the guide's default is 0.1.
        convention: ``"uniform"`` (PyTorch's: every class gets :math:`\varepsilon/K`, the default) or
            ``"others"`` (the guide's code: the :math:`K-1` wrong classes share :math:`\varepsilon`).
        num_classes: optional; when given, a head whose logits have another class count is an error.

    Composes with :class:`Mixup`: smoothing commutes with mixing, and a target is smoothed exactly once.

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
    def transform_batch(self, pl_module: TricksModule, x: Tensor | None,
                        plan: TargetPlan) -> tuple[Tensor | None, TargetPlan]:
        return x, plan.smoothed(self.smoothing, self.convention)
