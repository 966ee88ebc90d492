"""Ecosystem fit: every callback from a LightningCLI YAML (Distillation's teacher included), the recipe helper, and
metrics landing in Lightning's CSV and TensorBoard loggers."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_tricks import (
    Distillation,
    EarlyStopping,
    GradientMonitor,
    LabelSmoothing,
    Mixup,
    TrainingDoctor,
    WarmupCosine,
    adamw,
    recipe,
)
from lightning_tricks.demo.model import ConvBaseClassifier
from tests.conftest import TinyNet, loader, quiet_trainer

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "mnist1d"
QUICK = ["--trainer.max_steps=6", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=2"]


def _cli(args: list[str]) -> Any:
    sys.path.insert(0, str(EXAMPLE))
    try:
        import train  # examples/mnist1d/train.py

        return train.main(args)
    finally:
        sys.path.remove(str(EXAMPLE))


def test_lightning_cli_runs_the_recipe_from_yaml(tmp_path: Path) -> None:
    cli = _cli(["fit", "--config", str(EXAMPLE / "recipe.yaml"), *QUICK,
                f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"])
    kinds = {type(cb) for cb in cli.trainer.callbacks}
    assert {WarmupCosine, LabelSmoothing, Mixup, GradientMonitor, EarlyStopping, TrainingDoctor} <= kinds
    assert cli.trainer.global_step == 6
    assert Path(cli.trainer.logger.log_dir) == tmp_path / "lightning_logs" / "version_0"  # not lightning_logs twice
    stopper = next(cb for cb in cli.trainer.callbacks if isinstance(cb, EarlyStopping))
    assert stopper.mode == "max"  # inferred from val_acc
    metrics = Path(cli.trainer.logger.log_dir) / "metrics.csv"
    with open(metrics) as f:
        columns = set(next(csv.reader(f)))
    assert {"grad/norm", "train_loss_step"} <= columns  # the monitor's keys reach the CSV logger


def test_the_readme_cli_example_as_a_user_runs_it(tmp_path: Path) -> None:
    """From a fresh folder: logs in ./lightning_logs/version_0, and no notice about the mixin's on_after_batch_transfer
    beside the DataModule."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(EXAMPLE / "train.py"), "fit", "--config", str(EXAMPLE / "recipe.yaml"),
                           *QUICK], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").exists()
    assert "on_after_batch_transfer" not in done.stderr + done.stdout


def test_distillation_teacher_from_yaml(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    teacher = ConvBaseClassifier(channels=16)
    trainer = quiet_trainer(max_steps=1)
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 40), torch.randint(0, 10, (8,)))  # MNIST-1D's shapes
    trainer.fit(teacher, torch.utils.data.DataLoader(data, batch_size=8))  # any checkpoint of the class will do
    ckpt = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(ckpt)
    config = (EXAMPLE / "distill.yaml").read_text().replace("teacher: teacher.ckpt", f"teacher: {ckpt}")
    (tmp_path / "distill.yaml").write_text(config)
    cli = _cli(["fit", "--config", str(EXAMPLE / "recipe.yaml"), "--config", str(tmp_path / "distill.yaml"), *QUICK,
                f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"])
    distil = next(cb for cb in cli.trainer.callbacks if isinstance(cb, Distillation))
    assert isinstance(distil.teacher, ConvBaseClassifier) and distil.teacher.hparams.channels == 16
    assert cli.trainer.global_step == 6 and "distill/soft" in cli.trainer.callback_metrics


def test_tensorboard_logger_receives_the_metrics(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = quiet_trainer(max_epochs=2, logger=logger, log_every_n_steps=2,
                            callbacks=[GradientMonitor(), TrainingDoctor(min_epochs=1), Mixup(), LabelSmoothing()])
    trainer.fit(TinyNet(), loader(64, 8), loader(16, 8))
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"grad/norm", "grad/norm/conv", "train_loss_step", "val_loss", "doctor/warnings"} <= tags


def test_recipe_and_adamw_two_line_switch() -> None:
    callbacks = recipe()
    kinds = [type(cb) for cb in callbacks]
    assert kinds == [WarmupCosine, LabelSmoothing, Mixup, GradientMonitor, EarlyStopping, TrainingDoctor]
    assert [type(cb) for cb in recipe(label_smoothing=0, mixup=None, monitor=False, early_stopping=None,
                                      doctor=False)] == [WarmupCosine]

    class Net(TinyNet):
        def configure_optimizers(self) -> Any:
            return adamw(self, lr=0.01)

    trainer = quiet_trainer(max_epochs=3, callbacks=recipe(patience=5))
    trainer.fit(Net(), loader(64, 8), loader(16, 8))
    opt = trainer.optimizers[0]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert all(p.ndim < 2 for p in opt.param_groups[1]["params"])
    assert trainer.global_step == 24


def test_adamw_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`lr`"):
        adamw(torch.nn.Linear(2, 2), lr=0.0)


@pytest.mark.parametrize("show_loss", [False, True])
def test_progress_bar_with_the_recipe(tmp_path: Path, show_loss: bool, capsys: Any) -> None:
    """Lightning's TQDM bar runs with the whole recipe; it shows the validation metrics, and the step loss on request
    (off by default: Lightning reads progress-bar values with `.item()` every step)."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    class Net(TinyNet):
        tricks_progress_bar_loss = show_loss

    bar = TQDMProgressBar(refresh_rate=1)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[*recipe(early_stopping="val_loss", patience=5), bar])
    trainer.fit(Net(), loader(64, 8), loader(32, 8))
    shown = set(trainer.progress_bar_metrics)
    assert {"val_loss", "val_acc"} <= shown
    assert ("train_loss_step" in shown) == show_loss
    printed = capsys.readouterr()
    assert "val_acc=" in printed.out + printed.err  # the bar itself printed the metrics
    assert ("train_loss_step=" in printed.out + printed.err) == show_loss
