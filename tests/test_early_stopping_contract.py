"""EarlyStopping is a drop-in for Lightning's: the calls and behaviours that Lightning's own test file
(tests_pytorch/callbacks/test_early_stopping.py) checks of its class, checked of ours on BoringModel."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_tricks import EarlyStopping


def test_any_metric_name_constructs_and_takes_lightnings_default_mode() -> None:
    """Regression: EarlyStopping("abc") raised (mode not inferable), so Lightning's test file failed at collection."""
    for name in ("abc", "cba", "foo", "test_val_loss"):
        ours, theirs = EarlyStopping(name), LightningEarlyStopping(name)
        assert ours.mode == theirs.mode == "min"
        assert ours.state_key == theirs.state_key == f"EarlyStopping{{'monitor': '{name}', 'mode': 'min'}}"
    assert EarlyStopping("val_acc").mode == "max"  # an accuracy-like name still says max


def test_a_bad_mode_raises_lightnings_error() -> None:
    with pytest.raises(MisconfigurationException, match=r"`mode` can be .* got unknown_option"):
        EarlyStopping(monitor="foo", mode="unknown_option")


def test_positional_arguments_in_lightnings_order() -> None:
    ours = EarlyStopping("abc", 0.5, 4, False, "max")
    assert (ours.min_delta, ours.patience, ours.mode) == (0.5, 4, "max")


def test_pickling_round_trips() -> None:
    stopper = EarlyStopping(monitor="foo")
    assert vars(pickle.loads(pickle.dumps(stopper))).keys() == vars(stopper).keys()


class Scripted(BoringModel):
    """Logs a scripted value of "abc" at each validation end (as Lightning's tests do)."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = values

    def on_validation_epoch_end(self) -> None:
        self.log("abc", torch.tensor(float(self.values[self.current_epoch])))


def fit(values: list[float], stopper: Any, tmp_path: Any, **kw: Any) -> Trainer:
    trainer = Trainer(default_root_dir=tmp_path, callbacks=[stopper], limit_train_batches=0.2, limit_val_batches=0.2,
                      max_epochs=len(values), logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, num_sanity_val_steps=0, **kw)
    trainer.fit(Scripted(values))
    return trainer


@pytest.mark.parametrize(
    ("kwargs", "values"),
    [
        (dict(patience=3), [6, 5, 5, 5, 5, 5, 5, 5]),
        (dict(patience=1), [6, 5, 4, 4, 3, 3, 3, 3]),
        (dict(patience=3), [8, 4, 2, 3, 4, 5, 8, 10]),
        (dict(stopping_threshold=2.9), [9, 8, 7, 6, 5, 6, 4, 3, 2, 1]),
        (dict(divergence_threshold=15.9), [9, 4, 2, 16, 32, 64]),
        (dict(check_finite=True), [4, 3, float("inf"), 2, 1]),
        (dict(min_delta=1.5, patience=1), [9, 8, 7, 6, 5]),
    ],
)
def test_stops_at_the_same_epoch_as_lightnings_class(kwargs: dict, values: list[float], tmp_path: Any) -> None:
    ours = fit(values, EarlyStopping("abc", **kwargs), tmp_path / "ours")
    theirs = fit(values, LightningEarlyStopping("abc", **kwargs), tmp_path / "theirs")
    assert ours.current_epoch == theirs.current_epoch < len(values)
    assert ours.early_stopping_callback.stopped_epoch == theirs.early_stopping_callback.stopped_epoch


def test_two_stoppers_on_two_metrics(tmp_path: Any) -> None:
    class TwoMetrics(Scripted):
        def on_validation_epoch_end(self) -> None:
            super().on_validation_epoch_end()
            self.log("cba", torch.tensor(0.0))

    values = [8, 4, 2, 3, 4, 5, 8, 10]
    trainer = Trainer(default_root_dir=tmp_path, callbacks=[EarlyStopping("abc"), EarlyStopping("cba", patience=3)],
                      limit_train_batches=0.2, limit_val_batches=0.2, max_epochs=8, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(TwoMetrics(values))
    assert trainer.current_epoch - 1 == 3  # "cba" never improves: patience 3 after epoch 0
    assert len(trainer.early_stopping_callbacks) == 2
