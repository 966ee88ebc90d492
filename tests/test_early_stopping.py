"""EarlyStopping: Lightning's behaviour unchanged, plus restore_best_weights, start_from_epoch and baseline."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tricks import EarlyStopping
from tests.conftest import TinyNet, loader, quiet_trainer


class Scripted(TinyNet):
    """Logs a scripted `score` at each validation epoch and keeps a copy of the weights at each epoch end."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = scores
        self.weights_at: dict[int, list[torch.Tensor]] = {}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", torch.tensor(self.scores[self.current_epoch]), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.weights_at[self.current_epoch] = [p.detach().clone() for p in self.parameters()]


def _fit(cb: pl.Callback, scores: list[float], **kw: Any) -> tuple[pl.Trainer, Scripted]:
    model = Scripted(scores)
    trainer = quiet_trainer(max_epochs=len(scores), limit_train_batches=2, limit_val_batches=1, callbacks=[cb], **kw)
    trainer.fit(model, loader(32, 8), loader(8, 8))
    return trainer, model


SEQUENCES = [
    ([1.0, 0.9, 0.95, 0.96, 0.97, 0.5, 0.4], dict(patience=3)),
    ([1.0, 0.9, 0.89, 0.889, 0.888, 0.5], dict(patience=2, min_delta=0.05)),
    ([0.1, 0.2, 0.3, 0.25, 0.2, 0.1, 0.0], dict(patience=2, mode="max")),
    ([1.0, 0.5, 0.2, 0.1, 0.05], dict(patience=5, stopping_threshold=0.15)),
    ([1.0, 2.0, 5.0, 9.0, 1.0], dict(patience=5, divergence_threshold=4.0)),
    ([1.0, float("nan"), 0.5], dict(patience=5)),
]


@pytest.mark.parametrize(("scores", "kwargs"), SEQUENCES)
def test_same_decisions_as_lightnings_early_stopping(scores: list[float], kwargs: dict) -> None:
    ours_trainer, _ = _fit(EarlyStopping("val_loss", **kwargs), scores)
    ref_trainer, _ = _fit(LightningEarlyStopping("val_loss", **kwargs), scores)
    ours = next(c for c in ours_trainer.callbacks if isinstance(c, EarlyStopping))
    ref = next(c for c in ref_trainer.callbacks if isinstance(c, LightningEarlyStopping))
    assert ours_trainer.current_epoch == ref_trainer.current_epoch
    for attr in ("stopped_epoch", "wait_count", "stopping_reason", "stopping_reason_message"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    a, b = torch.as_tensor(ours.best_score), torch.as_tensor(ref.best_score)
    assert torch.equal(a, b) or (torch.isnan(a) and torch.isnan(b))
    assert ours.state_key == ref.state_key
    assert isinstance(ours, LightningEarlyStopping)


def test_restore_best_weights_when_it_stops() -> None:
    cb = EarlyStopping("val_loss", patience=2, restore_best_weights=True)
    _trainer, model = _fit(cb, [1.0, 0.8, 0.3, 0.5, 0.6, 0.7, 0.2])
    assert cb.stopped_epoch == 4 and cb.best_epoch == 2
    for p, q in zip(model.parameters(), model.weights_at[2]):
        assert torch.equal(p, q)
    assert not torch.equal(next(model.parameters()), model.weights_at[4][0])
    assert all(v.device.type == "cpu" for v in cb.best_weights.values())  # kept on the host
    assert "Best score" in cb.summary and "epoch 2" in cb.summary and "restored" in cb.summary
    # nothing trained is lost: a checkpoint holding the best weights, named in the message
    assert cb.checkpoint_path in cb.summary
    state = torch.load(cb.checkpoint_path, weights_only=False)["state_dict"]
    for (name, _), q in zip(model.named_parameters(), model.weights_at[2]):
        assert torch.equal(state[name], q)


def test_restore_best_weights_at_the_end_of_fit() -> None:
    cb = EarlyStopping("val_loss", patience=10, restore_best_weights=True)
    _trainer, model = _fit(cb, [1.0, 0.2, 0.5, 0.6])
    assert cb.stopped_epoch == 0 and cb.best_epoch == 1  # it did not stop: max_epochs ended the fit
    for p, q in zip(model.parameters(), model.weights_at[1]):
        assert torch.equal(p, q)


def test_without_restore_the_last_weights_stay() -> None:
    cb = EarlyStopping("val_loss", patience=2)
    _, model = _fit(cb, [1.0, 0.8, 0.3, 0.5, 0.6])
    for p, q in zip(model.parameters(), model.weights_at[4]):
        assert torch.equal(p, q)


def test_start_from_epoch() -> None:
    cb = EarlyStopping("val_loss", patience=2, start_from_epoch=3)
    _trainer, _ = _fit(cb, [0.1, 0.2, 0.3, 1.0, 0.9, 0.95, 0.96, 0.97])
    # epochs 0-2 do not count: the best is 0.9 at epoch 4, and patience runs out at epoch 6
    assert cb.best_epoch == 4 and float(cb.best_score) == pytest.approx(0.9)
    assert cb.stopped_epoch == 6


def test_baseline_must_be_beaten_within_patience() -> None:
    cb = EarlyStopping("val_loss", patience=3, baseline=0.5)
    _trainer, _ = _fit(cb, [1.0, 0.9, 0.8, 0.7, 0.6, 0.55, 0.52])
    assert cb.stopped_epoch == 2  # improving, but never below 0.5: stop after 3 checks
    assert "did not beat the baseline 0.5" in cb.stopping_reason_message
    assert cb.best_epoch == 2  # the best is still tracked


def test_baseline_beaten_resets_patience() -> None:
    cb = EarlyStopping("val_loss", patience=3, baseline=0.5)
    _fit(cb, [1.0, 0.9, 0.4, 0.39, 0.38, 0.37, 0.36])
    assert cb.stopped_epoch == 0  # ran to the end


def test_resume_keeps_the_best_weights(tmp_path: Any) -> None:
    scores = [1.0, 0.2, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    model = Scripted(scores)
    trainer = quiet_trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=1, enable_checkpointing=True,
                            callbacks=[EarlyStopping("val_loss", patience=3, restore_best_weights=True), ckpt])
    trainer.fit(model, loader(32, 8), loader(8, 8))
    best = model.weights_at[1]
    cb = EarlyStopping("val_loss", patience=3, restore_best_weights=True)
    resumed = Scripted(scores)
    trainer = quiet_trainer(max_epochs=8, limit_train_batches=2, limit_val_batches=1, callbacks=[cb])
    trainer.fit(resumed, loader(32, 8), loader(8, 8), ckpt_path=str(tmp_path / "epoch=2.ckpt"))
    assert cb.best_epoch == 1 and cb.stopped_epoch == 4  # epochs 2-4 did not improve on epoch 1's 0.2
    for p, q in zip(resumed.parameters(), best):
        assert torch.equal(p, q)


class _DDPScripted(Scripted):
    def on_train_end(self) -> None:
        cb = next(c for c in self.trainer.callbacks if isinstance(c, EarlyStopping))
        assert cb.best_epoch == 1 and cb.stopped_epoch == 3
        flat = torch.cat([p.detach().flatten() for p in self.parameters()])
        gathered = self.trainer.strategy.all_gather(flat)
        assert torch.equal(gathered[0], gathered[1])  # the same weights on every rank
        assert torch.equal(flat, torch.cat([p.flatten() for p in self.weights_at[1]]))


def test_ddp_two_cpu_processes() -> None:
    model = _DDPScripted([1.0, 0.2, 0.5, 0.6, 0.7, 0.8])
    trainer = quiet_trainer(devices=2, strategy="ddp_fork", max_epochs=6, limit_train_batches=2, limit_val_batches=1,
                            callbacks=[EarlyStopping("val_loss", patience=2, restore_best_weights=True)])
    trainer.fit(model, loader(64, 8), loader(16, 8))
    assert trainer.state.finished


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(start_from_epoch=-1), ValueError, r"`start_from_epoch` must be in \[0, inf\], got -1"),
        (dict(baseline=float("nan")), ValueError, "`baseline` must be finite"),
        (dict(baseline="low"), TypeError, "`baseline` must be a number"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        EarlyStopping("val_loss", **kwargs)
