"""Search spaces for :func:`lightning_tricks.tuning.search.tune`: CLI keys mapped to distributions, checked, and
sampled by an Optuna trial."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from lightning_tricks.functional._checks import check_number

__all__ = ["DISTRIBUTIONS", "GUIDE_SPACE", "load_space", "sample"]

DISTRIBUTIONS = ("log_uniform", "uniform", "int", "choice")
#: The guide's ranges (section 10), on the keys of the example's ConvBaseClassifier and MNIST1DDataModule; add
#: ``model.dropout: {uniform: [0.1, 0.5]}`` for a model with dropout.
GUIDE_SPACE: dict[str, dict[str, Any]] = {
    "model.lr": {"log_uniform": [1e-5, 1e-2]},
    "model.weight_decay": {"log_uniform": [1e-6, 1e-3]},
    "data.batch_size": {"int": [16, 128], "log": True},
}


def load_space(space: str | Path | dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A search space from a dict, a YAML file, or ``"guide"``, checked: each key maps to one distribution of
    :data:`DISTRIBUTIONS` with valid bounds."""
    if isinstance(space, str) and space == "guide":
        space = copy.deepcopy(GUIDE_SPACE)
    elif isinstance(space, (str, Path)):
        import yaml

        path = Path(space)
        if not path.exists():
            raise FileNotFoundError(f"search space file {str(path)!r} does not exist (or use `space='guide'`).")
        space = yaml.safe_load(path.read_text()) or {}
    if not isinstance(space, dict) or not space:
        raise ValueError(f"the search space is empty or not a mapping of CLI keys to distributions: {space!r}.")
    for key, spec in space.items():
        if not isinstance(spec, dict):
            raise ValueError(f"search space key {key!r}: expected a mapping such as {{log_uniform: [1e-5, 1e-2]}}, "
                             f"got {spec!r}.")
        kinds = [k for k in spec if k in DISTRIBUTIONS]
        extra = [k for k in spec if k not in (*DISTRIBUTIONS, "log", "step")]
        if len(kinds) != 1 or extra:
            raise ValueError(f"search space key {key!r}: give exactly one of {', '.join(DISTRIBUTIONS)} (plus 'log' or "
                             f"'step' for int), got {sorted(spec)}.")
        kind, value = kinds[0], spec[kinds[0]]
        if kind == "choice":
            if not isinstance(value, list) or not value:
                raise ValueError(f"search space key {key!r}: `choice` needs a non-empty list, got {value!r}.")
            continue
        if not (isinstance(value, list) and len(value) == 2):
            raise ValueError(f"search space key {key!r}: `{kind}` needs [low, high], got {value!r}.")
        low, high = value
        check_number(f"{key}.{kind}[0]", low, integer=kind == "int")
        check_number(f"{key}.{kind}[1]", high, integer=kind == "int")
        if low >= high:
            raise ValueError(f"search space key {key!r}: `{kind}` needs low < high, got [{low!r}, {high!r}].")
        if (kind == "log_uniform" or spec.get("log")) and low <= 0:
            raise ValueError(f"search space key {key!r}: a log scale needs low > 0, got {low!r}.")
    return space


def sample(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    values = {}
    for key, spec in space.items():
        if "log_uniform" in spec:
            values[key] = trial.suggest_float(key, *spec["log_uniform"], log=True)
        elif "uniform" in spec:
            values[key] = trial.suggest_float(key, *spec["uniform"])
        elif "int" in spec:
            values[key] = trial.suggest_int(key, *spec["int"], log=bool(spec.get("log", False)),
                                            step=int(spec.get("step", 1)))
        else:
            values[key] = trial.suggest_categorical(key, spec["choice"])
    return values
