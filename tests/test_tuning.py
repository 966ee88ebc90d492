"""The tuning workflow: overfit_check, lr_find and the Optuna search."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_tricks import LabelSmoothing, LRFinder, Mixup, TrainingDoctor, TrickCallback, WarmupCosine
from lightning_tricks.tuning import lr_find, overfit_check, suggest
from lightning_tricks.tuning.search import make_storage, tune
from lightning_tricks.tuning.space import load_space
from tests.conftest import TinyNet, loader, make_data, quiet_trainer

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- overfit check
def test_overfit_check_memorises_a_batch_and_restores_everything() -> None:
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = overfit_check(model, loader(64, 16), steps=150)
    assert result.passed and result.accuracy == 1.0 and result.final_loss < 0.1 * result.initial_loss
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert "passed" in result.summary()


def test_a_model_that_cannot_learn_fails_with_the_guides_causes() -> None:
    model = TinyNet()
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)  # the bug: nothing moves
    result = overfit_check(model, loader(64, 16), steps=20, optimizer=frozen)
    assert not result.passed and any("lr too small" in c for c in result.likely_causes)
    assert "FAILED" in result.summary()
    doctor = TrainingDoctor(overfit=result)
    quiet_trainer(max_epochs=1, callbacks=[doctor]).fit(model, loader())
    finding = next(f for f in doctor.findings if f.code == "overfit_check_failed")
    assert finding.severity == "error" and finding.evidence["steps"] == 20


@pytest.mark.parametrize(("kwargs", "match"), [(dict(steps=0), "`steps`"),
                                               (dict(target_fraction=1.5), "`target_fraction`")])
def test_overfit_check_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        overfit_check(TinyNet(), loader(), **kwargs)


# ------------------------------------------------------------------------------- lr finder
class LrSpy(TrickCallback):
    """A trick (so the sweep keeps it) that records every group's lr at each training step."""

    def __init__(self) -> None:
        self.seen: list[list[float]] = []

    def transform_loss(self, pl_module: Any, logits: Any, target: Any, loss: torch.Tensor) -> torch.Tensor:
        self.seen.append([g["lr"] for g in pl_module.trainer.optimizers[0].param_groups])
        return loss


def test_the_sweep_keeps_the_group_ratios_steps_per_optimizer_step_and_restores() -> None:
    model, spy, mix = TinyNet(group_lrs=(0.01, 0.03)), LrSpy(), Mixup(0.2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = lr_find(model, loader(256, 8, shuffle=True), min_lr=1e-5, max_lr=1e-1, num_steps=20,
                     callbacks=[spy, mix, LabelSmoothing(0.1)], accumulate_grad_batches=2, divergence=1e9)
    assert len(result.lrs) == 20 and len(spy.seen) == 40  # two micro-batches per optimizer step
    expected = np.geomspace(1e-5, 1e-1, 20)
    np.testing.assert_allclose(result.lrs, expected, rtol=1e-9)
    for (a, b), want in zip(spy.seen[::2], expected):
        assert a == pytest.approx(want) and b == pytest.approx(3 * want)  # the ratio of the groups is kept
    assert spy.seen[0] == spy.seen[1]  # the same lr for both micro-batches of a step
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert mix.batches_seen == 0  # the tricks' state is back as it was


def test_a_diverging_sweep_stops_and_an_empty_range_is_refused() -> None:
    result = lr_find(TinyNet(), loader(512, 8, shuffle=True), min_lr=1e-3, max_lr=1e4, num_steps=60)
    assert len(result.lrs) < 60  # stopped when the loss exploded
    with pytest.raises(ValueError, match=r"`min_lr` \(0.1\) must be smaller than `max_lr` \(0.01\)"):
        lr_find(TinyNet(), loader(), min_lr=0.1, max_lr=0.01)


def test_suggestions_on_a_known_curve() -> None:
    lrs = np.geomspace(1e-6, 1.0, 100)
    x = np.log10(lrs)
    loss = 2.0 - 1.5 / (1 + np.exp(-3 * (x + 3.5))) + np.where(x > -1.5, 4 * (x + 1.5) ** 2, 0.0)
    valley, steep, minimum, clear, notes = suggest(lrs, loss)
    assert clear and not notes
    assert steep == pytest.approx(10 ** -3.5, rel=0.2)  # the logistic's steepest point
    assert 1e-5 < valley < 3e-2 and minimum == pytest.approx(lrs[np.argmin(loss[10:95]) + 10] / 10)
    flat = suggest(lrs, np.full(100, 1.0) + 1e-4 * np.random.default_rng(0).standard_normal(100))
    assert not flat[3] and any("no clear valley" in n for n in flat[4])


def test_result_apply_and_plot(tmp_path: Path) -> None:
    model = TinyNet(lr=0.05)
    result = lr_find(model, loader(256, 8, shuffle=True), num_steps=30, min_lr=1e-4, max_lr=1.0)
    lr = result.apply(model, "steep")
    assert model.hparams.lr == lr == result.steep
    result.plot(str(tmp_path / "lr.png"))
    assert (tmp_path / "lr.png").stat().st_size > 0


class StartProbe(pl.Callback):
    """What training starts from, after every other callback's on_fit_start."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]
        self.device = next(pl_module.parameters()).device
        self.trainer_is_ours = pl_module.trainer is trainer


def test_the_finder_callback_sweeps_like_the_function_then_trains_from_the_same_weights() -> None:
    sweep = dict(min_lr=1e-4, max_lr=1.0, num_steps=30)
    torch.manual_seed(0)
    reference = lr_find(TinyNet(group_lrs=(0.01, 0.03)), loader(256, 8), callbacks=[LabelSmoothing(0.1)], **sweep)
    torch.manual_seed(0)
    model = TinyNet(group_lrs=(0.01, 0.03))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    finder, schedule, probe = LRFinder("steep", **sweep), WarmupCosine(0.1), StartProbe()
    trainer = quiet_trainer(max_epochs=1, callbacks=[schedule, LabelSmoothing(0.1), finder, probe])
    trainer.fit(model, loader(256, 8))
    assert finder.result is not None and finder.result.clear
    np.testing.assert_allclose(finder.result.losses, reference.losses, rtol=1e-5)  # the same sweep as lr_find's
    assert finder.lr == reference.steep
    assert all(torch.equal(before[k], v) for k, v in probe.state.items())  # training starts from the initial weights
    assert probe.trainer_is_ours and probe.device == torch.device("cpu")
    # every group scaled by one factor; WarmupCosine planned from the new lrs (listed before the finder or not)
    assert schedule.base_lrs == [[pytest.approx(finder.lr), pytest.approx(3 * finder.lr)]]


class StepScheduled(TinyNet):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=0.01)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)}


def test_the_finder_callback_rescales_torch_schedulers_and_is_skipped_on_resume(tmp_path: Path) -> None:
    finder = LRFinder("minimum", min_lr=1e-4, max_lr=1.0, num_steps=30)
    trainer = quiet_trainer(max_epochs=1, enable_checkpointing=True, default_root_dir=str(tmp_path),
                            callbacks=[finder], precision="bf16-mixed", accumulate_grad_batches=2)
    model = StepScheduled()
    trainer.fit(model, loader(128, 8, shuffle=True))
    assert finder.lr == pytest.approx(finder.result.minimum)
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == [pytest.approx(finder.lr)]
    ckpt = next(tmp_path.rglob("*.ckpt"))
    again, probe = LRFinder("minimum", min_lr=1e-4, max_lr=1.0, num_steps=30), StartProbe()
    quiet_trainer(max_epochs=2, callbacks=[again, probe]).fit(StepScheduled(), loader(128, 8), ckpt_path=str(ckpt))
    assert again.result is None and again.lr == finder.lr  # no second sweep; the lr came back with the optimizer
    assert probe.lrs == [trainer.optimizers[0].param_groups[0]["lr"]]


def test_the_finder_callback_refuses_several_processes_and_bad_arguments() -> None:
    class TwoRanks:
        world_size = 2
        strategy = object()

    with pytest.raises(RuntimeError, match=r"2 processes.*lr_find"):
        LRFinder().setup(TwoRanks(), TinyNet(), "fit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="choice"):
        LRFinder("best")
    with pytest.raises(ValueError, match=r"`min_lr` \(1.0\) must be smaller than `max_lr` \(0.1\)"):
        LRFinder(min_lr=1.0, max_lr=0.1)
    with pytest.raises(ValueError, match="`num_steps`"):
        LRFinder(num_steps=2)


# ------------------------------------------------------------------------------- Optuna search
class TinyData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_data(64), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(make_data(32, seed=1), batch_size=32)


SPACE = {"model.lr": {"log_uniform": [1e-3, 1e-1]}, "data.batch_size": {"choice": [8, 16]}}
QUICK = ["--trainer.max_epochs=2", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
         "--trainer.num_sanity_val_steps=0", "--trainer.accelerator=cpu"]


def test_a_search_in_memory_writes_its_outputs(tmp_path: Path) -> None:
    study = tune(TinyNet, TinyData, space=SPACE, args=QUICK, n_trials=4, out=tmp_path, seed=1)
    assert len(study.trials) == 4 and study.direction.name == "MAXIMIZE"  # val_acc
    for name in ("trials.csv", "best.json", "best.yaml", "history.png", "importance.png"):
        assert (tmp_path / name).stat().st_size > 0
    import yaml

    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best["model"]["lr"] == study.best_params["model.lr"]
    assert best["data"]["batch_size"] == study.best_params["data.batch_size"]


@pytest.mark.parametrize(
    ("space", "match"),
    [
        ({}, "the search space is empty"),
        ({"model.lr": {"normal": [0, 1]}}, r"give exactly one of log_uniform, uniform, int, choice"),
        ({"model.lr": {"uniform": [0.5, 0.1]}}, r"needs low < high, got \[0.5, 0.1\]"),
        ({"model.lr": {"log_uniform": [0.0, 0.1]}}, "a log scale needs low > 0"),
        ({"model.lr": {"choice": []}}, "`choice` needs a non-empty list"),
    ],
)
def test_bad_search_spaces(space: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_space(space)


def test_unknown_keys_storage_and_grid_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"keys \['model.nope'\] do not all parse"):
        tune(TinyNet, TinyData, space={"model.nope": {"uniform": [0.1, 0.5]}}, args=QUICK, n_trials=1)
    with pytest.raises(ValueError, match=r"`storage` 'postgresql://nobody@127.0.0.1:1/none' cannot be reached"):
        make_storage("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(ValueError, match=r"the folder '/no/such/folder' does not exist"):
        make_storage("journal:/no/such/folder/study.log")
    with pytest.raises(ValueError, match="sampler='grid' needs every search space key to be a `choice`"):
        tune(TinyNet, TinyData, space=SPACE, args=QUICK, n_trials=1, sampler="grid")


def test_two_workers_share_one_journal_file(tmp_path: Path) -> None:
    """Two processes on one storage file complete their trials together: every trial number once, all complete."""
    journal = tmp_path / "study.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "lightning_tricks", "tune", "--model", "tests.conftest.TinyNet",
               "--data", "tests.test_tuning.TinyData", "--space", str(tmp_path / "space.yaml"), "--trials", "3",
               "--sampler", "random", "--no-prune", "--storage", f"journal:{journal}", "--study-name", "shared", *QUICK]
    import yaml

    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    workers = [subprocess.Popen([*command, "--seed", str(i), "--out", str(tmp_path / f"w{i}")], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-3000:]
    import optuna

    study = optuna.load_study(study_name="shared", storage=make_storage(f"journal:{journal}"))
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(6))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


class _PruneAtOnce:
    """A stand-in for an Optuna trial whose pruner says stop at the first report (consulted by rank 0 only)."""

    def __init__(self) -> None:
        self.reports: list[tuple[float, int]] = []

    def report(self, value: float, step: int) -> None:
        self.reports.append((value, step))

    def should_prune(self) -> bool:
        return True


class _BothStopped(pl.Callback):
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pruning = next(cb for cb in trainer.callbacks if type(cb).__name__ == "OptunaPruning")
        asked = len(pruning.trial.reports)
        assert asked == (1 if trainer.is_global_zero else 0)  # rank 0 reports and decides
        ends = trainer.strategy.all_gather(torch.tensor([float(trainer.current_epoch), float(pruning.pruned_at)]))
        assert torch.equal(ends[0], ends[1]) and pruning.pruned_at == 0  # both ranks stop at the same validation


def test_pruning_under_ddp_is_decided_by_rank_zero() -> None:
    from lightning_tricks.tuning.search import OptunaPruning

    trainer = quiet_trainer(devices=2, strategy="ddp_fork", max_epochs=5,
                            callbacks=[OptunaPruning(_PruneAtOnce(), "val_acc"), _BothStopped()])
    trainer.fit(TinyNet(), loader(64, 8), loader(32, 8))
    assert trainer.state.finished


PROJECT = '''
import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from lightning_tricks import TricksMixin


class Net(TricksMixin, pl.LightningModule):
    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class Data(pl.LightningDataModule):
    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=32)
'''


def test_the_console_script_imports_the_users_module_from_the_working_directory(tmp_path: Path) -> None:
    """Regression: `lightning-tricks tune --model my_project.Net` from my_project.py's folder raised
    ModuleNotFoundError (a console script, unlike `python -m`, does not put the working directory on sys.path)."""
    import shutil

    script = shutil.which("lightning-tricks")
    if script is None:
        pytest.fail("the lightning-tricks console script is not installed (pip install -e .)")
    (tmp_path / "my_project.py").write_text(PROJECT)
    done = subprocess.run([script, "tune", "--model", "my_project.Net", "--data", "my_project.Data", "--trials", "1",
                           "--space", str(_space_file(tmp_path)), "--out", str(tmp_path / "out"), *QUICK],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "best.yaml").exists()


def _space_file(folder: Path) -> Path:
    path = folder / "space.yaml"
    path.write_text("model.lr:\n  log_uniform: [0.001, 0.1]\n")
    return path


class Layered(TinyNet):
    """Layer-wise lrs: the head at `lr`, the conv below at half of it (group 0 is the bottom layer)."""

    def configure_optimizers(self) -> Any:
        from lightning_tricks import adamw

        return adamw(self, lr=self.hparams.lr, layer_decay=0.5)


def test_apply_with_layer_wise_groups_puts_every_group_where_the_sweep_chose() -> None:
    """Regression: apply() set `lr` to group 0's (the bottom layer's) lr, so the head trained 2x (1024x on a
    ResNet-18) below the chosen point."""
    model = Layered(lr=0.05)
    before = [g["lr"] for g in model.configure_optimizers().param_groups]
    result = lr_find(model, loader(256, 8, shuffle=True), num_steps=30, min_lr=1e-4, max_lr=1.0)
    assert result.start_lr == pytest.approx(before[0])
    result.apply(model, "steep")
    after = [g["lr"] for g in model.configure_optimizers().param_groups]
    assert after[0] == pytest.approx(result.steep, rel=1e-9)  # group 0 at the sweep's chosen point
    assert [a / after[0] for a in after] == pytest.approx([b / before[0] for b in before], rel=1e-9)  # ratios kept
    assert max(after) == pytest.approx(model.hparams.lr) and model.hparams.lr == pytest.approx(2 * result.steep)
