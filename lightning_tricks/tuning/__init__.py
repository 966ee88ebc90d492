"""The tuning workflow: prove the model can overfit one batch, find the lr, search the rest.

The LR range test as a callback, run at the start of a fit, is :class:`lightning_tricks.LRFinder`.
"""

from lightning_tricks.tuning.lr_curve import LRFinderResult, suggest
from lightning_tricks.tuning.lr_sweep import lr_find
from lightning_tricks.tuning.overfit import OverfitResult, overfit_check

__all__ = ["LRFinderResult", "OverfitResult", "lr_find", "overfit_check", "suggest"]
