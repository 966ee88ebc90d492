"""What a search leaves in its output folder: ``trials.csv``, ``best.json``, ``best.yaml`` and the plots."""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["set_dotted", "write_outputs"]


def write_outputs(study: Any, out: Path, config: Sequence[str | Path], space: dict[str, dict[str, Any]]) -> list[Path]:
    """``trials.csv``, ``best.json``, ``best.yaml`` (the base config with the best values) and the plots."""
    import optuna
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    keys = list(space)
    with open(out / "trials.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["number", "state", "value", *keys])
        for t in study.trials:
            writer.writerow([t.number, t.state.name, t.value, *(t.params.get(k) for k in keys)])
    written = [out / "trials.csv"]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        (out / "best.json").write_text(json.dumps({"number": best.number, "value": best.value,
                                                   "params": best.params}, indent=1))
        merged: dict[str, Any] = {}
        for c in config:
            _merge(merged, yaml.safe_load(Path(c).read_text()) or {})
        for key, value in best.params.items():
            set_dotted(merged, key, value)
        (out / "best.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
        written += [out / "best.json", out / "best.yaml"]
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*experimental.*")  # Optuna's matplotlib plots say they are experimental
        if complete:
            ax = plot_optimization_history(study)
            ax.figure.savefig(out / "history.png", dpi=100, bbox_inches="tight")  # type: ignore[union-attr]
            written.append(out / "history.png")
        if len(complete) >= 2 and len(keys) >= 2:
            ax = plot_param_importances(study)
            ax.figure.savefig(out / "importance.png", dpi=100, bbox_inches="tight")  # type: ignore[union-attr]
            written.append(out / "importance.png")
    return written


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
