"""``Ensemble``: several trained models as one ``LightningModule`` for ``trainer.test`` and ``trainer.predict``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassCalibrationError

from lightning_tricks._io import load_class
from lightning_tricks.functional._checks import check_choice
from lightning_tricks.functional.ensembles import METHODS, combine, fit_convex_weights, majority_vote

__all__ = ["Ensemble"]


def _load(member: nn.Module | str, member_class: type[pl.LightningModule] | str | None) -> nn.Module:
    if isinstance(member, nn.Module):
        return member
    if member_class is None:
        raise ValueError(f"member {member!r} is a checkpoint path: also give `member_class`, the LightningModule class "
                         "(or its dotted import path) whose load_from_checkpoint rebuilds it.")
    if isinstance(member_class, str):
        member_class = load_class(member_class, "member_class")
    return member_class.load_from_checkpoint(member, map_location="cpu")  # type: ignore[union-attr]


class Ensemble(pl.LightningModule):
    """Average, weight or vote the predictions of several classifiers (guide section 9).

    Args:
        members: trained modules (``nn.Module``, e.g. ``LightningModule``) or paths of Lightning checkpoints (then
            give ``member_class``). Each maps a batch's inputs to ``(N, K)`` logits.
        method: ``"mean"`` (average of the members' probabilities), ``"weighted"`` (convex weights that minimise
            the NLL on validation data: call :meth:`fit_weights` first) or ``"vote"`` (majority vote of the members'
            classes, ties broken by the mean probability; its NLL and calibration are those of the mean).
        member_class: the ``LightningModule`` class (or dotted path) of checkpoint members.

    ``trainer.test(ensemble, loader)`` logs ``test_acc``, ``test_nll`` and ``test_ece`` (expected calibration error,
    torchmetrics' ``MulticlassCalibrationError``, 15 bins); ``trainer.predict`` returns the ensemble's probabilities.
    The members are frozen and in eval mode.

    A snapshot ensemble from one run: the members can be checkpoints that ``ModelCheckpoint`` wrote at chosen steps,
    the best checkpoint, or copies of the model holding :class:`EMA`/:class:`SWA` averages
    (``copy.deepcopy(model).load_state_dict(ema.averaged_state_dict())``).

    Example::

        ensemble = Ensemble([model_a, model_b, model_c])
        trainer.test(ensemble, test_loader)
    """

    def __init__(self, members: Sequence[nn.Module | str], method: str = "mean",
                 member_class: type[pl.LightningModule] | str | None = None) -> None:
        super().__init__()
        check_choice("method", method, METHODS)
        if len(members) < 1:
            raise ValueError("`members` is empty: an ensemble needs at least one member.")
        self.members = nn.ModuleList([_load(m, member_class) for m in members])
        for member in self.members:
            member.eval()
            member.requires_grad_(False)
        self.method = method
        self.weights: Tensor | None = None
        self._ece: MulticlassCalibrationError | None = None

    # ------------------------------------------------------------------ predictions
    def member_probabilities(self, x: Any) -> Tensor:
        """The members' class probabilities ``(M, N, K)`` for inputs ``x`` (float32)."""
        outputs = [member(x) for member in self.members]
        shapes = [tuple(o.shape) for o in outputs]
        if len(set(shapes)) > 1:
            raise ValueError(f"the members' outputs differ in shape: {dict(enumerate(shapes))}; every member must "
                             "output (N, K) logits for the same K.")
        return torch.stack([F.softmax(o.float(), dim=-1) for o in outputs])

    def forward(self, x: Any) -> Tensor:
        """The ensemble's class probabilities ``(N, K)``."""
        return combine(self.member_probabilities(x), self.method, self._weights_for_method())

    def classes(self, probs: Tensor) -> Tensor:
        """The ensemble's class decisions from the members' probabilities ``(M, N, K)``."""
        if self.method == "vote":
            return majority_vote(probs)
        return combine(probs, self.method, self._weights_for_method()).argmax(dim=-1)

    def _weights_for_method(self) -> Tensor | None:
        if self.method != "weighted":
            return None
        if self.weights is None:
            raise RuntimeError("Ensemble(method='weighted') has no weights yet: call `fit_weights(val_loader)` with "
                               "validation data (never the test set) first.")
        return self.weights

    @torch.no_grad()
    def fit_weights(self, dataloader: Iterable[Any]) -> Tensor:
        """Fit the convex weights of ``method="weighted"`` on ``(x, y)`` batches of validation data; returns them."""
        self.eval()
        probs, targets = [], []
        for x, y in dataloader:
            probs.append(self.member_probabilities(x.to(self.device)).cpu())
            targets.append(y.cpu())
        if not probs:
            raise ValueError("`fit_weights` got no batch: give it the validation data.")
        with torch.enable_grad():
            self.weights = fit_convex_weights(torch.cat(probs, dim=1), torch.cat(targets)).to(self.device)
        return self.weights

    # ------------------------------------------------------------------ Lightning steps
    def _evaluate(self, batch: Any, stage: str) -> None:
        x, y = batch
        probs = self.member_probabilities(x)
        combined = combine(probs, self.method, self._weights_for_method())
        decision = majority_vote(probs) if self.method == "vote" else combined.argmax(dim=-1)
        acc = (decision == y).float().mean()
        nll = F.nll_loss(combined.clamp_min(1e-12).log(), y)
        if self._ece is None:
            self._ece = MulticlassCalibrationError(num_classes=combined.shape[-1], n_bins=15, norm="l1").to(self.device)
        self._ece.update(combined, y)
        n = y.shape[0]
        self.log(f"{stage}_acc", acc, on_epoch=True, sync_dist=True, batch_size=n)
        self.log(f"{stage}_nll", nll, on_epoch=True, sync_dist=True, batch_size=n)
        self.log(f"{stage}_ece", self._ece, on_epoch=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x)
