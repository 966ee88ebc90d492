"""lightning-tricks: proven deep-learning training tricks as drop-in PyTorch Lightning callbacks.

Every public name is importable from here (the path the docs use): the callbacks, the mixin and the base classes to
subclass (:class:`TrickCallback`, :class:`WeightAverage`). The math is in :mod:`lightning_tricks.functional`, the
tuning workflow in :mod:`lightning_tricks.tuning`, the roles callbacks cooperate through in
:mod:`lightning_tricks.peers`.
"""

from lightning_tricks.callbacks import (
    EMA,
    L1,
    SWA,
    Distillation,
    EarlyStopping,
    Finding,
    Finetune,
    GradientMonitor,
    LabelSmoothing,
    LRFinder,
    LRScaling,
    Mixup,
    NonFiniteGradientError,
    TrainingDoctor,
    WarmupCosine,
    WeightAverage,
)
from lightning_tricks.drop_path import add_drop_path
from lightning_tricks.ensemble import Ensemble
from lightning_tricks.groups import param_groups, scaled_lr
from lightning_tricks.init import init_weights
from lightning_tricks.mixin import TricksMixin
from lightning_tricks.recipes import adamw, recipe
from lightning_tricks.trick import TrickCallback

__version__ = "0.1.0"  # the one place: pyproject.toml reads it
__all__ = [
    "EMA",
    "L1",
    "SWA",
    "Distillation",
    "EarlyStopping",
    "Ensemble",
    "Finding",
    "Finetune",
    "GradientMonitor",
    "LRFinder",
    "LRScaling",
    "LabelSmoothing",
    "Mixup",
    "NonFiniteGradientError",
    "TrainingDoctor",
    "TrickCallback",
    "TricksMixin",
    "WarmupCosine",
    "WeightAverage",
    "__version__",
    "adamw",
    "add_drop_path",
    "init_weights",
    "param_groups",
    "recipe",
    "scaled_lr",
]
