"""Where callbacks write (folders, loggers) and how dotted class paths from configs are loaded."""

from __future__ import annotations

import importlib
from typing import Any

import lightning.pytorch as pl

from lightning_tricks._compat import logger_step


def checkpoint_dir(trainer: pl.Trainer, chosen: str | None) -> str:
    """Where a checkpoint the user asked for goes: ``chosen``, else the logger's ``log_dir``, else the Trainer's
    ``default_root_dir`` (as Lightning's ``ModelCheckpoint``). Call it on every rank: ``log_dir`` broadcasts."""
    return chosen or trainer.log_dir or trainer.default_root_dir


def report_dir(trainer: pl.Trainer, chosen: str | None) -> str | None:
    """Where an optional report goes: ``chosen``, else the logger's ``log_dir``; ``None`` (write nothing) for a
    Trainer without a logger, so a run with ``logger=False`` leaves the working directory alone. Every rank."""
    if chosen is not None:
        return chosen
    return trainer.log_dir if trainer.loggers else None


def log_to_loggers(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Send metrics straight to the loggers (as Lightning's ``LearningRateMonitor`` does), at the step at which
    Lightning hands ``self.log`` metrics to them, so the curves line up."""
    step = logger_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def load_class(path: Any, argument: str) -> Any:
    """The class a dotted path such as ``"pkg.module.Class"`` names (a class is returned as it is); ``argument`` is
    named in the error."""
    if not isinstance(path, str):
        return path
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"`{argument}` must be a class or a dotted path such as 'pkg.module.Class', got {path!r}.")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"`{argument}`: cannot import {path!r} ({err}).") from err
