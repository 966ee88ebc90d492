"""Lightning callbacks, one file per trick, each a thin adaptor over :mod:`lightning_tricks.functional`."""

from lightning_tricks.callbacks.distillation import Distillation
from lightning_tricks.callbacks.doctor import TrainingDoctor
from lightning_tricks.callbacks.doctor_report import Finding
from lightning_tricks.callbacks.early_stopping import EarlyStopping
from lightning_tricks.callbacks.ema import EMA
from lightning_tricks.callbacks.finetune import Finetune
from lightning_tricks.callbacks.gradient_monitor import GradientMonitor
from lightning_tricks.callbacks.l1 import L1
from lightning_tricks.callbacks.label_smoothing import LabelSmoothing
from lightning_tricks.callbacks.lr_finder import LRFinder
from lightning_tricks.callbacks.lr_scaling import LRScaling
from lightning_tricks.callbacks.mixup import Mixup
from lightning_tricks.callbacks.nonfinite_guard import NonFiniteGradientError
from lightning_tricks.callbacks.swa import SWA
from lightning_tricks.callbacks.warmup_cosine import WarmupCosine
from lightning_tricks.callbacks.weight_average import WeightAverage

__all__ = [
    "EMA",
    "L1",
    "SWA",
    "Distillation",
    "EarlyStopping",
    "Finding",
    "Finetune",
    "GradientMonitor",
    "LRFinder",
    "LRScaling",
    "LabelSmoothing",
    "Mixup",
    "NonFiniteGradientError",
    "TrainingDoctor",
    "WarmupCosine",
    "WeightAverage",
]
