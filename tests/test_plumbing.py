"""The shared helpers callbacks cooperate through: peers, weight snapshots, lr writing, output folders."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_tricks import EMA, SWA, EarlyStopping, WarmupCosine
from lightning_tricks._io import checkpoint_dir, load_class, report_dir
from lightning_tricks.lrs import read_lrs, scale_lrs, write_lrs
from lightning_tricks.peers import ChoosesFinalWeights, EvaluatesOtherWeights, find_callback, find_callbacks
from lightning_tricks.weights import restore_weights, take_weights
from tests.conftest import TinyNet, quiet_trainer


def test_peers_are_found_by_class_and_by_role_in_the_trainers_order() -> None:
    ema, swa, stop, schedule = EMA(), SWA(), EarlyStopping("val_loss"), WarmupCosine()
    trainer = quiet_trainer(callbacks=[schedule, ema, stop, swa])
    assert find_callbacks(trainer, EvaluatesOtherWeights) == [ema, swa]
    assert find_callbacks(trainer, ChoosesFinalWeights) == [stop]
    assert find_callback(trainer, WarmupCosine) is schedule and find_callback(trainer, nn.Module) is None
    assert not stop.chooses_final_weights()  # nothing to restore yet
    assert ema.evaluated_state_dict(TinyNet()) is None  # no average yet


def test_weights_are_restored_in_place_and_checked() -> None:
    model = TinyNet()
    before = take_weights(model)
    params = list(model.parameters())
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    restore_weights(model, before)
    assert all(a is b for a, b in zip(params, model.parameters()))  # the same tensors: optimizers keep them
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert take_weights(model, "cpu")["head.weight"].device.type == "cpu"
    with pytest.raises(RuntimeError, match=r"lack \['head.bias'\]"):
        restore_weights(model, {k: v for k, v in before.items() if k != "head.bias"}, owner="test")


def test_lrs_are_written_per_group_and_scaled_with_the_schedulers() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": a.parameters(), "lr": 0.1}, {"params": b.parameters(), "lr": 0.01}])
    sched = torch.optim.lr_scheduler.StepLR(opt, 10)
    write_lrs([opt], [[1.0, 2.0]], factor=0.5)
    assert read_lrs([opt]) == [[0.5, 1.0]]
    scale_lrs([opt], [sched], 2.0)
    assert read_lrs([opt]) == [[1.0, 2.0]] and sched.base_lrs == pytest.approx([0.2, 0.02])
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([0.2, 0.02])
    with pytest.raises(ValueError):
        write_lrs([opt], [[1.0]])  # one lr per group, or an error


def test_folders_follow_the_user_then_the_logger(tmp_path: Any) -> None:
    bare = quiet_trainer(default_root_dir=tmp_path)
    assert report_dir(bare, None) is None and checkpoint_dir(bare, None) == str(tmp_path)
    assert report_dir(bare, "chosen") == checkpoint_dir(bare, "chosen") == "chosen"
    logged = quiet_trainer(logger=CSVLogger(tmp_path / "logs", name="run"), default_root_dir=tmp_path)
    assert report_dir(logged, None) == checkpoint_dir(logged, None) == str(tmp_path / "logs" / "run" / "version_0")


def test_dotted_classes_load_or_say_which_argument() -> None:
    assert load_class("torch.nn.Linear", "x") is nn.Linear and load_class(nn.Linear, "x") is nn.Linear
    with pytest.raises(ValueError, match="`teacher_class`"):
        load_class("Linear", "teacher_class")
    with pytest.raises(ValueError, match="`member_class`: cannot import"):
        load_class("torch.nn.NoSuchLayer", "member_class")
