"""The guide's tuning workflow (section 10): prove the model can overfit one batch, find the lr, search the rest."""

from lightning_tricks.tuning.lr_finder import LRFinder, LRFinderResult, lr_find, suggest
from lightning_tricks.tuning.overfit import OverfitResult, overfit_check

__all__ = ["LRFinder", "LRFinderResult", "OverfitResult", "lr_find", "overfit_check", "suggest"]
