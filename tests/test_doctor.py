"""TrainingDoctor: each diagnosis triggered by a deliberately broken training; a healthy run raises nothing."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import GradientMonitor, TrainingDoctor, TricksMixin
from tests.conftest import TinyNet, loader, make_data, quiet_trainer


def _run(model: pl.LightningModule, train: DataLoader, val: DataLoader | None = None, epochs: int = 6,
         callbacks: list[pl.Callback] | None = None, out_dir: str | None = None, **kw: Any) -> TrainingDoctor:
    doctor = TrainingDoctor(out_dir=out_dir)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[*(callbacks or []), doctor], **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train, val)
    return doctor


def _codes(doctor: TrainingDoctor, severity: str | None = None) -> set[str]:
    return {f.code for f in doctor.findings if severity is None or f.severity == severity}


def test_healthy_run_has_nothing_above_info(tmp_path: Any) -> None:
    doctor = _run(TinyNet(lr=0.02), loader(256, 16, shuffle=True), loader(64, 32, seed=1), epochs=8,
                  callbacks=[GradientMonitor()], out_dir=str(tmp_path / "report"))
    assert doctor.worst_severity == "info", doctor.report()
    assert _codes(doctor) == {"healthy"}
    md, js = doctor.report_paths
    assert Path(md).parent == tmp_path / "report"
    assert "no problem found" in Path(md).read_text()
    assert json.loads(Path(js).read_text())["findings"][0]["code"] == "healthy"


def test_files_go_where_a_logger_or_the_user_says(tmp_path: Any) -> None:
    # logger=False and no out_dir: no file anywhere (the working directory and default_root_dir stay empty)
    root = tmp_path / "root"
    root.mkdir()
    doctor = _run(TinyNet(lr=0.02), loader(64, 16), epochs=1, default_root_dir=root)
    assert doctor.report_paths == [] and list(root.iterdir()) == []
    assert "TrainingDoctor report" in doctor.report()
    # with a logger: next to its logs
    logger = pl.loggers.CSVLogger(tmp_path / "logs", name="run")
    doctor = _run(TinyNet(lr=0.02), loader(64, 16), epochs=1, logger=logger)
    assert [Path(p).name for p in doctor.report_paths] == ["doctor_report.md", "doctor_report.json"]
    assert all(Path(p).parent == Path(logger.log_dir) and Path(p).exists() for p in doctor.report_paths)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_step_losses_are_on_the_training_steps_scale(accumulate: int) -> None:
    # Lightning's batch-end `outputs["loss"]` is divided by `accumulate_grad_batches`; the doctor's step losses are
    # not: their mean is the epoch's logged train loss (equal batches), whatever the accumulation.
    doctor = _run(TinyNet(lr=0.02), loader(96, 8), epochs=2, accumulate_grad_batches=accumulate)
    assert len(doctor.history) == 2
    for epoch in doctor.history:
        assert epoch.train_loss is not None
        assert epoch.step_loss_mean == pytest.approx(epoch.train_loss, rel=1e-6)
        assert epoch.step_loss_max >= epoch.step_loss_mean


def test_lr_far_too_small() -> None:
    doctor = _run(TinyNet(lr=1e-7), loader(128, 16), loader(32, 32, seed=1), callbacks=[GradientMonitor()],
                  log_every_n_steps=4)
    f = next(f for f in doctor.findings if f.code == "loss_not_falling")
    assert f.severity == "warning" and f.evidence["relative_fall"] < 0.05
    assert f.evidence["max_update_ratio"] < 1e-5 and "far too small" in f.advice[0]


class SGDNet(TinyNet):
    def __init__(self, lr: float) -> None:
        super().__init__(lr=lr)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def test_lr_far_too_large_until_nan() -> None:
    doctor = TrainingDoctor()
    trainer = quiet_trainer(max_epochs=3, callbacks=[GradientMonitor(log_every_n_steps=1), doctor])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(SGDNet(lr=1e12), loader(128, 16))
    assert _codes(doctor, "error") == {"nonfinite_loss"}
    f = next(f for f in doctor.findings if f.code == "nonfinite_loss")
    assert f.severity == "error" and f.evidence["nonfinite_loss_steps"] > 0
    assert any("lr too large" in a for a in f.advice)
    assert "nonfinite_input_batches" not in f.evidence  # the data was fine


class BigMLP(TricksMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                 nn.Linear(512, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def _random_labels(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 16, generator=g), torch.randint(0, 4, (n,), generator=g))


def test_big_model_on_a_tiny_training_set_overfits() -> None:
    train = DataLoader(make_data(16, seed=0), batch_size=8)
    val = DataLoader(_random_labels(128, seed=5), batch_size=64)
    doctor = _run(BigMLP(), train, val, epochs=25)
    f = next(f for f in doctor.findings if f.code == "overfitting")
    assert f.evidence["val_loss_now"] > f.evidence["best_val_loss"]
    assert f.evidence["train_loss_now"] < f.evidence["train_loss_at_best"]
    assert any("regularise" in a for a in f.advice)


def test_shuffled_labels_loss_does_not_fall() -> None:
    doctor = _run(TinyNet(lr=0.01), DataLoader(_random_labels(512, seed=3), batch_size=32, shuffle=True),
                  epochs=5)
    f = next(f for f in doctor.findings if f.code == "loss_not_falling")
    assert any("labels" in a for a in f.advice)


def test_nan_in_the_data() -> None:
    data = make_data(64)
    data.tensors[0][37, 0, 3] = float("nan")  # batch 4 of 8 holds a NaN
    doctor = TrainingDoctor()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(max_epochs=2, callbacks=[doctor]).fit(TinyNet(), DataLoader(data, batch_size=8))
    assert _codes(doctor, "error") == {"nonfinite_data"}  # the first NaN loss came with the NaN input
    f = doctor.findings[0]
    assert f.evidence["nonfinite_input_batches"] == 1 and f.evidence["first_nonfinite_input_step"] == 4
    assert f.evidence["first_nonfinite_loss_step"] == 4  # the same step
    assert f.evidence["nonfinite_loss_steps"] == 4  # steps 4-7: the NaN update made the weights NaN
    assert "NaN/inf in the data (first at step 4)" in f.advice[0]
    assert len(doctor.history) == 2 and doctor.history[0].nonfinite_loss_steps == 4


class CopesWithNaN(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.nan_to_num(x))  # missing values on purpose: the model handles them


def test_nan_inputs_the_model_handles_raise_nothing() -> None:
    data = make_data(64)
    data.tensors[0][::5, 0, 3] = float("nan")
    doctor = TrainingDoctor()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(max_epochs=2, callbacks=[doctor]).fit(CopesWithNaN(), DataLoader(data, batch_size=8))
    assert not _codes(doctor, "error") and all(e.nonfinite_loss_steps == 0 for e in doctor.history)


class Spiky(TinyNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * 30.0 if batch_idx == 3 else loss  # one huge step per epoch


def test_spiky_loss_is_unstable() -> None:
    doctor = _run(Spiky(lr=1e-4), loader(128, 16), epochs=4)
    f = next(f for f in doctor.findings if f.code == "unstable_loss")
    assert f.evidence["epochs_with_spikes"] >= 2 and f.evidence["worst_spike_ratio"] > 5


def test_demo_recipe_raises_no_false_alarm() -> None:
    from lightning_tricks.demo.data import mnist1d
    from lightning_tricks.demo.model import Classifier, ConvBase
    from lightning_tricks.demo.run import recipe_callbacks

    train, test = mnist1d()
    callbacks = recipe_callbacks()
    trainer = quiet_trainer(max_epochs=8, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Classifier(ConvBase()), DataLoader(train, batch_size=100, shuffle=True),
                    DataLoader(test, batch_size=1000))
    doctor = next(cb for cb in callbacks if isinstance(cb, TrainingDoctor))
    assert doctor.worst_severity == "info", doctor.report()


def test_too_short_to_judge() -> None:
    doctor = _run(TinyNet(), loader(), epochs=1)
    assert _codes(doctor) == {"too_short"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(min_epochs=0), "`min_epochs`"), (dict(flat_tolerance=1.5), "`flat_tolerance`"),
     (dict(spike_ratio=0.5), "`spike_ratio`"), (dict(patience=0), "`patience`")],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainingDoctor(**kwargs)


class OtherKeys(TinyNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", torch.nn.functional.cross_entropy(self(x), y))


@pytest.mark.parametrize(("model", "doctor"), [(OtherKeys, TrainingDoctor()), (TinyNet, TrainingDoctor("nope"))])
def test_no_data_no_verdict(model: type, doctor: TrainingDoctor) -> None:
    """Regression: a module that logs other keys (or a key that does not exist) was called healthy on no evidence."""
    trainer = quiet_trainer(max_epochs=4, callbacks=[doctor])
    with pytest.warns(UserWarning, match=r"TrainingDoctor: the watched metrics \[.*\] were never logged"):
        trainer.fit(model(), loader(), loader(32))
    assert next(f.code for f in doctor.ordered_findings()) == "unknown" and "healthy" not in _codes(doctor)
    unknown = next(f for f in doctor.findings if f.code == "unknown")
    if model is OtherKeys:
        assert "val/loss" in unknown.evidence["logged"] and "train_loss='loss'" in unknown.advice[0]


class Memoriser(TinyNet):
    """A wide net that memorises 64 samples (its loss nears 0, its gradients shrink by nature)."""

    def __init__(self) -> None:
        super().__init__(lr=0.01)
        self.head = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 4))


@pytest.mark.parametrize("resume_at", [1, 2, 3, 4])
def test_a_resumed_run_gets_the_uninterrupted_report(resume_at: int, tmp_path: Any) -> None:
    """Regression: a run resumed from an epoch-end checkpoint restarted its history (too_short, loss_not_falling)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(epochs: int, ckpt: str | None = None) -> TrainingDoctor:
        pl.seed_everything(0, verbose=False)
        doctor = TrainingDoctor()
        saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        trainer = quiet_trainer(max_epochs=epochs, enable_checkpointing=True, callbacks=[GradientMonitor(), doctor,
                                                                                        saver])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Memoriser(), loader(64, 8), loader(32, 8, seed=1), ckpt_path=ckpt)
        return doctor

    full = fit(6)
    resumed = fit(6, str(tmp_path / f"epoch={resume_at - 1}.ckpt"))
    assert len(resumed.history) == len(full.history) == 6
    assert [(f.code, f.epoch) for f in resumed.ordered_findings()] == [(f.code, f.epoch)
                                                                       for f in full.ordered_findings()]
    assert resumed.report() == full.report()
