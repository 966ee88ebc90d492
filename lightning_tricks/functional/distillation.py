r"""Knowledge distillation (Hinton et al., 2015) as plain functions.

.. math::
    \mathcal L = \alpha\, T^2\, \mathrm{KL}\bigl(\mathrm{softmax}(t/T) \,\|\, \mathrm{softmax}(s/T)\bigr)
               + (1 - \alpha)\, \mathrm{CE}(s, y)

The KL term is summed over classes and averaged over the batch (``reduction="batchmean"``: ``"mean"`` would also
divide by the number of classes), and multiplied by :math:`T^2` so that its gradients keep their size as the
temperature grows. Both terms are computed in float32.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_tricks.functional._checks import check_number
from lightning_tricks.functional.targets import soft_cross_entropy

__all__ = ["distillation_loss", "soft_distillation_loss"]


def soft_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 3.0) -> Tensor:
    r""":math:`T^2\,\mathrm{KL}(\mathrm{softmax}(t/T) \| \mathrm{softmax}(s/T))`, batch mean, float32."""
    check_number("temperature", temperature, low=0.0, low_open=True)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"the teacher's logits have shape {tuple(teacher_logits.shape)} but the student's have shape "
            f"{tuple(student_logits.shape)}; they must match (same number of classes, same batch)."
        )
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (temperature * temperature)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float = 3.0,
    alpha: float = 0.7,
    ignore_index: int | None = None,
) -> Tensor:
    r"""``alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE(student, target)``.

    Args:
        student_logits: ``(N, K)``.
        teacher_logits: ``(N, K)``, computed on the same (possibly mixed) inputs.
        target: class indices ``(N,)`` or soft targets ``(N, K)`` (smoothed and/or mixed: the hard term uses them).
        temperature: ``T > 0`` (the guide: 3).
        alpha: weight of the soft term in [0, 1] (the guide: 0.7).
        ignore_index: ignored index targets (see :func:`soft_cross_entropy`).
    """
    check_number("alpha", alpha, low=0.0, high=1.0)
    soft = soft_distillation_loss(student_logits, teacher_logits, temperature)
    hard = soft_cross_entropy(student_logits, target, ignore_index)
    return alpha * soft + (1.0 - alpha) * hard
