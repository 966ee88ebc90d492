"""The math of each trick as plain PyTorch functions: no Lightning import, no hidden state."""

from lightning_tricks.functional.averaging import decay_from_half_life, ema_decay, ema_update_, swa_update_
from lightning_tricks.functional.distillation import distillation_loss, soft_distillation_loss
from lightning_tricks.functional.ensembles import (
    combine,
    expected_calibration_error,
    fit_convex_weights,
    majority_vote,
)
from lightning_tricks.functional.mixing import (
    Mix,
    box_lambda,
    box_mask,
    cutmix,
    mix_pair,
    mixup,
    sample_box,
    sample_lambda,
)
from lightning_tricks.functional.regularization import elastic_net_penalty, elastic_net_prox_
from lightning_tricks.functional.schedules import (
    constant_with_warmup,
    linear_decay,
    step_decay,
    warmup_cosine,
    warmup_factor,
)
from lightning_tricks.functional.targets import (
    TargetPlan,
    class_dim_of,
    cross_entropy,
    smooth_targets,
    soft_cross_entropy,
    to_soft_targets,
)

__all__ = [
    "Mix",
    "TargetPlan",
    "box_lambda",
    "box_mask",
    "class_dim_of",
    "combine",
    "constant_with_warmup",
    "cross_entropy",
    "cutmix",
    "decay_from_half_life",
    "distillation_loss",
    "elastic_net_penalty",
    "elastic_net_prox_",
    "ema_decay",
    "ema_update_",
    "expected_calibration_error",
    "fit_convex_weights",
    "linear_decay",
    "majority_vote",
    "mix_pair",
    "mixup",
    "sample_box",
    "sample_lambda",
    "smooth_targets",
    "soft_cross_entropy",
    "soft_distillation_loss",
    "step_decay",
    "swa_update_",
    "to_soft_targets",
    "warmup_cosine",
    "warmup_factor",
]
