r"""Prediction ensembles: combining members' class probabilities, and the weights that minimise validation NLL.

For members' probabilities :math:`p_m(x) \in \Delta^{K-1}`, :math:`m = 1..M`:

* ``mean``: :math:`\bar p = \frac1M \sum_m p_m`;
* ``weighted``: :math:`\bar p = \sum_m w_m p_m` with :math:`w \in \Delta^{M-1}` (convex), fitted by minimising the
  negative log-likelihood :math:`-\frac1N \sum_i \log \bar p(x_i)_{y_i}` on validation data;
* ``vote``: each member votes for its argmax; the class with most votes wins, ties broken by the mean probability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tricks.functional._checks import check_choice

__all__ = ["METHODS", "combine", "expected_calibration_error", "fit_convex_weights", "majority_vote"]

METHODS = ("mean", "weighted", "vote")


def majority_vote(probs: Tensor) -> Tensor:
    """The class with most member votes for each sample of ``probs`` ``(M, N, K)``; ties go to the class with the
    highest mean probability among the tied ones."""
    votes = F.one_hot(probs.argmax(dim=-1), probs.shape[-1]).sum(dim=0).float()  # (N, K)
    tied = votes == votes.max(dim=-1, keepdim=True).values
    return torch.where(tied, probs.mean(dim=0), torch.full_like(votes, -1.0)).argmax(dim=-1)


def combine(probs: Tensor, method: str = "mean", weights: Tensor | None = None) -> Tensor:
    """The ensemble's probabilities ``(N, K)`` from the members' ``(M, N, K)``.

    ``vote`` returns the mean probabilities (its NLL and calibration are the mean's); its class decision is
    :func:`majority_vote`. ``weighted`` needs ``weights`` ``(M,)``.
    """
    check_choice("method", method, METHODS)
    if method == "weighted":
        if weights is None:
            raise ValueError("method='weighted' needs the members' weights: fit them on validation data first.")
        return torch.einsum("m,mnk->nk", weights.to(probs), probs)
    return probs.mean(dim=0)


def fit_convex_weights(probs: Tensor, target: Tensor, steps: int = 200) -> Tensor:
    """Convex weights ``(M,)`` (non-negative, summing to 1) minimising the NLL of ``sum_m w_m p_m`` on ``target``.

    Parametrised as ``softmax(theta)`` and fitted with L-BFGS from equal weights (the NLL is convex in ``w``).
    """
    logp = probs.double().clamp_min(1e-12).log().gather(-1, target.view(1, -1, 1).expand(probs.shape[0], -1, 1))
    logp = logp.squeeze(-1)  # (M, N): log p_m(x_i)_{y_i}
    theta = torch.zeros(probs.shape[0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta], max_iter=steps, line_search_fn="strong_wolfe")

    def nll() -> Tensor:
        optimizer.zero_grad()
        loss = -torch.logsumexp(torch.log_softmax(theta, 0)[:, None] + logp, dim=0).mean()
        loss.backward()
        return loss

    optimizer.step(nll)
    return torch.softmax(theta.detach(), 0).float()


def expected_calibration_error(probs: Tensor, target: Tensor, n_bins: int = 15) -> Tensor:
    """Top-label expected calibration error with equal-width confidence bins (torchmetrics'
    ``MulticlassCalibrationError(norm="l1")``)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    return multiclass_calibration_error(probs, target, num_classes=probs.shape[-1], n_bins=n_bins, norm="l1")
