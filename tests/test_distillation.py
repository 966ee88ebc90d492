"""Distillation: the loss against the guide's formula, and the teacher's handling through a real Trainer."""

from __future__ import annotations

import os
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from lightning_tricks import Distillation, LabelSmoothing, Mixup
from lightning_tricks.functional import distillation_loss, smooth_targets, soft_distillation_loss
from tests.conftest import TinyNet, loader, quiet_trainer


def guide_formula(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, T: float, alpha: float) -> torch.Tensor:
    """The guide's: alpha * T^2 * KL(softmax(t/T) || log_softmax(s/T), batchmean) + (1 - alpha) * CE(s, y)."""
    kl = F.kl_div(F.log_softmax(s / T, dim=-1), F.softmax(t / T, dim=-1), reduction="batchmean")
    return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(s, y)


@pytest.mark.parametrize(("T", "alpha"), [(3.0, 0.7), (1.0, 0.5), (8.0, 1.0), (2.0, 0.0)])
def test_loss_equals_the_guides_formula(T: float, alpha: float) -> None:
    torch.manual_seed(0)
    s, t, y = torch.randn(16, 10), torch.randn(16, 10) * 3, torch.randint(0, 10, (16,))
    assert abs(distillation_loss(s, t, y, T, alpha).item() - guide_formula(s, t, y, T, alpha).item()) <= 1e-6


def test_soft_targets_in_the_hard_term() -> None:
    torch.manual_seed(1)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    soft = smooth_targets(y, 5, 0.1)
    ref = 0.7 * 9 * F.kl_div(F.log_softmax(s / 3, -1), F.softmax(t / 3, -1), reduction="batchmean") + 0.3 * (
        F.cross_entropy(s, y, label_smoothing=0.1))
    assert abs(distillation_loss(s, t, soft).item() - ref.item()) <= 1e-6


def test_identical_logits_give_zero_soft_loss_and_shapes_are_checked() -> None:
    s = torch.randn(4, 3)
    assert soft_distillation_loss(s, s.clone()).abs().item() <= 1e-6
    with pytest.raises(ValueError, match=r"teacher's logits have shape \(4, 5\) but the student's have shape \(4, 3\)"):
        soft_distillation_loss(s, torch.randn(4, 5))


class Probe(TinyNet):
    """Records the inputs, logits, effective targets and loss of every training step."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, Any]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.tricks_loss(logits, y)
        mix = next((cb for cb in self.trainer.callbacks if isinstance(cb, Mixup)), None)
        self.records.append(dict(x=x.detach().clone(), y=y, logits=logits.detach().float(), loss=loss.detach(),
                                 draw=None if mix is None else mix.last_draw))
        return loss


def make_teacher() -> TinyNet:
    pl.seed_everything(42, verbose=False)
    return TinyNet()


class CheckTeacher(pl.Callback):
    """Inside the fit: the teacher stays frozen, in eval mode, on the student's device, outside the optimizer."""

    def __init__(self) -> None:
        self.checks = 0

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cb = next(c for c in trainer.callbacks if isinstance(c, Distillation))
        assert not cb.teacher.training and not any(m.training for m in cb.teacher.modules())
        assert not any(p.requires_grad for p in cb.teacher.parameters())
        assert all(p.device == pl_module.device for p in cb.teacher.parameters())
        in_optimizer = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        assert not in_optimizer & {id(p) for p in cb.teacher.parameters()}
        assert len(in_optimizer) == len(list(pl_module.parameters()))
        self.checks += 1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._check(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module)


@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_trainer_loss_teacher_and_checkpoint(precision: str, accumulate: int, tmp_path: Any) -> None:
    teacher = make_teacher()
    before = [p.detach().clone() for p in teacher.parameters()]
    model, check = Probe(), CheckTeacher()
    cb = Distillation(teacher, temperature=2.0, alpha=0.6)
    kw: dict[str, Any] = ({"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
                          if precision == "16-mixed" else {"precision": precision})
    trainer = quiet_trainer(max_epochs=2, accumulate_grad_batches=accumulate, limit_val_batches=2,
                            callbacks=[cb, check, LabelSmoothing(0.1), Mixup(alpha=0.4)], **kw)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.fit(model, loader(64, 8), loader(32, 8))
    assert not [w for w in seen if "eval mode" in str(w.message)]  # no "modules in eval mode" warning
    assert check.checks >= 16 + 2
    for p, q in zip(teacher.parameters(), before):
        assert torch.equal(p, q)  # never trained
    teacher.eval()
    assert len(model.records) == 16
    for r in model.records:
        with torch.no_grad():
            t_logits = teacher(r["x"])  # the teacher saw the same, mixed, input
        lam, index = r["draw"]
        soft = smooth_targets(r["y"], 4, 0.1)
        target = lam * soft + (1 - lam) * soft[index]  # the smoothed, mixed target of the hard term
        want = distillation_loss(r["logits"], t_logits.float(), target, 2.0, 0.6)
        tol = 1e-5 if precision == "32" else 5e-2  # autocast rounds the teacher's logits to half precision
        assert abs(r["loss"].item() - want.item()) <= tol * max(1.0, abs(want.item()))
        assert r["y"].dtype == torch.int64
    assert {"distill/soft", "distill/hard"} <= set(trainer.callback_metrics)
    # the student's checkpoint has exactly a plain student's keys and size
    path = os.path.join(tmp_path, "student.ckpt")
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert set(state) == set(TinyNet().state_dict())


class _DDPTeacherCheck(CheckTeacher):
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert trainer.world_size == 2 and self.checks >= 4
        assert "distill/soft" in trainer.callback_metrics


def test_ddp_two_cpu_processes() -> None:
    trainer = quiet_trainer(devices=2, strategy="ddp_fork", max_epochs=1,
                            callbacks=[Distillation(make_teacher()), _DDPTeacherCheck()])
    trainer.fit(TinyNet(), loader(64, 8))
    assert trainer.state.finished


def test_teacher_from_a_checkpoint_path_and_class_path(tmp_path: Any) -> None:
    teacher = make_teacher()
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(teacher, loader())
    path = str(tmp_path / "teacher.ckpt")
    trainer.save_checkpoint(path)
    cb = Distillation(path, teacher_class="tests.conftest.TinyNet")
    assert isinstance(cb.teacher, TinyNet) and not cb.teacher.training
    for p, q in zip(cb.teacher.parameters(), teacher.parameters()):
        assert torch.equal(p, q.cpu())
    quiet_trainer(max_steps=2, callbacks=[cb]).fit(TinyNet(), loader())


class WrongTeacher(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 7)


def test_output_shape_mismatch_is_named_on_the_first_batch() -> None:
    with pytest.raises(ValueError, match=r"teacher \(WrongTeacher\) returned logits of shape \(8, 7\) for "
                                         r"inputs of shape \(8, 1, 16\), but the student's are \(8, 4\)"):
        quiet_trainer(max_steps=2, callbacks=[Distillation(WrongTeacher())]).fit(TinyNet(), loader())


class HoldsTeacher(TinyNet):
    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher


def test_teacher_inside_the_student_is_refused() -> None:
    teacher = make_teacher()
    with pytest.raises(ValueError, match="registered as a submodule of the student"):
        quiet_trainer(max_steps=1, callbacks=[Distillation(teacher)]).fit(HoldsTeacher(teacher), loader())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(temperature=0.0), ValueError, r"`temperature` must be in \(0.0, inf\], got 0.0"),
        (dict(temperature=-1.0), ValueError, "`temperature`"),
        (dict(alpha=1.5), ValueError, r"`alpha` must be in \[0.0, 1.0\], got 1.5"),
        (dict(alpha=-0.1), ValueError, "`alpha`"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Distillation(TinyNet(), **kwargs)


def test_checkpoint_path_needs_a_class() -> None:
    with pytest.raises(ValueError, match="also give `teacher_class`"):
        Distillation("teacher.ckpt")
    with pytest.raises(TypeError, match=r"must be an nn\.Module"):
        Distillation(3)  # type: ignore[arg-type]
