"""lightning-tricks: proven deep-learning training tricks as drop-in PyTorch Lightning callbacks."""

from lightning_tricks.callbacks import (
    EMA,
    L1,
    SWA,
    Distillation,
    EarlyStopping,
    Finetune,
    GradientMonitor,
    LabelSmoothing,
    LRScaling,
    Mixup,
    TrainingDoctor,
    WarmupCosine,
)
from lightning_tricks.drop_path import add_drop_path
from lightning_tricks.ensemble import Ensemble
from lightning_tricks.groups import param_groups, scaled_lr
from lightning_tricks.init import init_weights
from lightning_tricks.mixin import TricksMixin
from lightning_tricks.recipe import adamw, recipe

__version__ = "0.1.0"
__all__ = [
    "EMA",
    "L1",
    "SWA",
    "Distillation",
    "EarlyStopping",
    "Ensemble",
    "Finetune",
    "GradientMonitor",
    "LRScaling",
    "LabelSmoothing",
    "Mixup",
    "TrainingDoctor",
    "TricksMixin",
    "WarmupCosine",
    "__version__",
    "adamw",
    "add_drop_path",
    "init_weights",
    "param_groups",
    "recipe",
    "scaled_lr",
]
