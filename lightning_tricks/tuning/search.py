"""Hyper-parameter search with Optuna over ``LightningCLI`` keys (guide section 10: random/grid search, its ranges).

A search space maps CLI keys to distributions, in YAML or a dict::

    model.init_args.lr: {log_uniform: [1.0e-5, 1.0e-2]}
    model.weight_decay: {log_uniform: [1.0e-6, 1.0e-3]}
    data.batch_size: {int: [16, 128], log: true}
    model.dropout: {uniform: [0.1, 0.5]}
    model.activation: {choice: [relu, gelu]}

Each trial builds the model, data and Trainer from the base config(s) plus the trial's values through
``LightningCLI(run=False)``, fits, and reports ``monitor`` (validation) at each validation for pruning.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from typing_extensions import override

from lightning_tricks._io import load_class
from lightning_tricks.functional._checks import check_choice, check_number
from lightning_tricks.tuning.search_outputs import write_outputs
from lightning_tricks.tuning.space import DISTRIBUTIONS, load_space, sample

__all__ = ["OptunaPruning", "make_storage", "tune"]

SAMPLERS = ("tpe", "random", "grid")


def make_storage(storage: str | None) -> Any:
    """``None`` (in memory), an RDB URL (``sqlite:///study.db``, ``postgresql://...``), or a journal file
    (``journal:/shared/study.log``, or a path ending in ``.log``/``.jsonl``) that several processes can share."""
    import optuna

    if storage is None:
        return None
    if storage.startswith("journal:") or storage.endswith((".log", ".jsonl")):
        from optuna.storages.journal import JournalFileBackend

        path = Path(storage.removeprefix("journal:"))
        if not path.parent.exists():
            raise ValueError(f"`storage` {storage!r}: the folder {str(path.parent)!r} does not exist.")
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    try:
        return optuna.storages.RDBStorage(storage)
    except Exception as error:  # a bad URL, a server that does not answer, a missing driver
        raise ValueError(f"`storage` {storage!r} cannot be reached or understood ({type(error).__name__}: "
                         f"{error}); use an RDB URL such as 'sqlite:///study.db' or a journal file "
                         "'journal:/path/study.log'.") from None


class OptunaPruning(pl.Callback):
    """Report ``monitor`` to an Optuna trial at each validation and stop the fit when the pruner says so.

    Under several processes rank 0 reports and decides, and broadcasts the decision so that every rank stops at the
    same validation (no rank is left in a collective). The trial's study must be in a storage that rank 0 reaches.
    """

    def __init__(self, trial: Any, monitor: str) -> None:
        self.trial, self.monitor = trial, monitor
        self.pruned_at: int | None = None

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None:
                self.trial.report(float(value), step=trainer.current_epoch)
                prune = self.trial.should_prune()
        prune = bool(trainer.strategy.broadcast(prune, src=0))
        if prune:
            self.pruned_at = trainer.current_epoch
            trainer.should_stop = True


def tune(
    model_class: type[pl.LightningModule] | str,
    datamodule_class: type[pl.LightningDataModule] | str | None,
    *,
    space: str | Path | dict[str, Any] = "guide",
    config: Sequence[str | Path] = (),
    args: Sequence[str] = (),
    n_trials: int = 20,
    monitor: str = "val_acc",
    mode: str | None = None,
    sampler: str = "tpe",
    prune: bool = True,
    storage: str | None = None,
    study_name: str = "lightning-tricks",
    seed: int = 0,
    out: str | Path | None = None,
) -> Any:
    """Search ``space`` with Optuna; returns the ``optuna.Study``.

    Args:
        model_class, datamodule_class: the classes ``LightningCLI`` builds (or their dotted paths).
        space: the search space (see the module), a YAML path, or ``"guide"`` (:data:`GUIDE_SPACE`).
        config: base ``LightningCLI`` config files (the trial's values override them); ``args``: extra CLI arguments.
        n_trials: trials this call runs (with a shared ``storage``, several processes add up).
        monitor, mode: the validation metric and its direction (``mode`` inferred from the name as
            :class:`EarlyStopping` does).
        sampler: ``"tpe"`` (default), ``"random"``, or ``"grid"`` (every key a ``choice``).
        prune: stop unpromising trials at a validation (median pruner).
        storage: see :func:`make_storage`; several workers running ``tune`` with the same storage and
            ``study_name`` share the study (each pulls new trials; none runs a trial twice).
        out: a folder for ``trials.csv``, ``best.json``, ``best.yaml`` (a config ``fit`` accepts) and the plots
            (``history.png``, ``importance.png``); the trials' own files go to ``out/trials/trial_<n>`` (with no
            ``out``, a temporary folder).
    """
    import optuna

    from lightning_tricks.callbacks.early_stopping import infer_mode

    check_number("n_trials", n_trials, low=1, integer=True)
    check_choice("sampler", sampler, SAMPLERS)
    space = load_space(space)
    direction: Literal["minimize", "maximize"] = "maximize" if infer_mode(monitor, mode) == "max" else "minimize"
    model_cls = load_class(model_class, "model_class")
    data_cls = load_class(datamodule_class, "datamodule_class")
    base_args = [a for c in config for a in ("--config", str(c))] + list(args)
    _check_keys(model_cls, data_cls, base_args, space)
    if sampler == "grid":
        if not all("choice" in spec for spec in space.values()):
            raise ValueError("sampler='grid' needs every search space key to be a `choice` list of values.")
        grid = {k: spec["choice"] for k, spec in space.items()}
        chosen: optuna.samplers.BaseSampler = optuna.samplers.GridSampler(grid, seed=seed)
    elif sampler == "random":
        chosen = optuna.samplers.RandomSampler(seed=seed)
    else:
        chosen = optuna.samplers.TPESampler(seed=seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1) if prune else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=study_name, storage=make_storage(storage), sampler=chosen, pruner=pruner,
                                direction=direction, load_if_exists=True)

    runs = Path(out) / "trials" if out is not None else Path(tempfile.mkdtemp(prefix="lightning-tricks-tune-"))

    def objective(trial: Any) -> float:
        values = sample(trial, space)
        cli = _cli(model_cls, data_cls, base_args + [f"--{k}={v}" for k, v in values.items()],
                   runs / f"trial_{trial.number}")
        pruning = OptunaPruning(trial, monitor)
        cli.trainer.callbacks.append(pruning)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        value = cli.trainer.callback_metrics.get(monitor)
        if value is None:
            raise RuntimeError(f"the trial logged no {monitor!r}: check `monitor` against the module's logged keys.")
        if pruning.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at epoch {pruning.pruned_at}")
        return float(value)

    study.optimize(objective, n_trials=n_trials)
    if out is not None:
        write_outputs(study, Path(out), config, space)
    return study


def _cli(model_cls: Any, data_cls: Any, args: list[str], root: Path) -> Any:
    """A trial's model, data and Trainer; its files go under ``root`` (not the working directory)."""
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(model_cls, data_cls, args=args, run=False, save_config_callback=None,
                        trainer_defaults={"enable_progress_bar": False, "enable_model_summary": False,
                                          "default_root_dir": str(root)})


def _check_keys(model_cls: Any, data_cls: Any, base_args: list[str], space: dict[str, dict[str, Any]]) -> None:
    """Parse the base config with every search key once (no fit): an unknown key is named before any trial runs."""
    from lightning.pytorch.cli import LightningCLI

    probe = []
    for key, spec in space.items():
        kind = next(k for k in spec if k in DISTRIBUTIONS)
        probe.append(f"--{key}={spec[kind][0]}")
    try:
        LightningCLI(model_cls, data_cls, args=[*base_args, *probe], run=False, save_config_callback=None,
                     parser_kwargs={"exit_on_error": False}, auto_configure_optimizers=False)
    except (SystemExit, Exception) as error:  # jsonargparse reports an unknown key as a parse error
        raise ValueError(f"the search space keys {sorted(space)} do not all parse as arguments of "
                         f"{model_cls.__name__}/{getattr(data_cls, '__name__', None)} with the base config: {error}"
                         ) from None
