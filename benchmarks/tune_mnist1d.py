"""A 20-trial Optuna search on MNIST-1D against the recipe's defaults, with two workers sharing one journal file.

Each trial fits `examples/mnist1d/recipe.yaml` for 10 epochs with the guide's ranges (lr log-uniform 1e-5..1e-2, weight
decay 1e-6..1e-3, batch 16..128), TPE, median pruning, validation accuracy on the 500 held-out sequences. The
defaults and the best trial are then fitted once more and read once on the test set. Writes docs/results.md.

Usage::

    python benchmarks/tune_mnist1d.py            # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402

from benchmarks._results import write_block  # noqa: E402
from lightning_tricks.tuning.search import _cli, make_storage  # noqa: E402
from lightning_tricks.tuning.search_outputs import write_outputs  # noqa: E402
from lightning_tricks.tuning.space import GUIDE_SPACE  # noqa: E402

CONFIG = ROOT / "examples" / "mnist1d" / "recipe.yaml"
MODEL, DATA = "lightning_tricks.demo.model.ConvBaseClassifier", "lightning_tricks.demo.data.MNIST1DDataModule"


def fit_and_test(overrides: list[str], root: Path) -> tuple[float, float]:
    """Validation accuracy after the fit and test accuracy, read once."""
    from lightning_tricks.demo.data import MNIST1DDataModule
    from lightning_tricks.demo.model import ConvBaseClassifier

    cli = _cli(ConvBaseClassifier, MNIST1DDataModule, ["--config", str(CONFIG), *overrides], root)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    val = float(cli.trainer.callback_metrics["val_acc"])
    test = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]["test_acc"]
    return val, float(test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tune-mnist1d-"))
    quick = [f"--trainer.max_epochs={args.epochs}", "--trainer.logger=false", "--trainer.enable_checkpointing=false"]
    journal = f"journal:{work / 'study.log'}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    per_worker = [args.trials // 2, args.trials - args.trials // 2]
    workers = [subprocess.Popen([sys.executable, "-m", "lightning_tricks", "tune", "--model", MODEL, "--data", DATA,
                                 "--config", str(CONFIG), "--space", "guide", "--trials", str(n), "--storage", journal,
                                 "--study-name", "mnist1d", "--seed", str(i), "--out", str(work / f"w{i}"), *quick],
                                cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for i, n in enumerate(per_worker)]
    for w in workers:
        _, err = w.communicate()
        if w.returncode:
            raise SystemExit(err[-3000:])
    search_wall = time.perf_counter() - start
    study = optuna.load_study(study_name="mnist1d", storage=make_storage(journal))
    write_outputs(study, work / "out", [CONFIG, *[]], GUIDE_SPACE)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    best = study.best_trial
    states = {s.name: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
    default_val, default_test = fit_and_test(quick, work / "defaults")
    best_val, best_test = fit_and_test([*quick, *(f"--{k}={v}" for k, v in best.params.items())], work / "best")
    params = ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}" for k, v in best.params.items())
    lines = [
        f"Command: `python benchmarks/tune_mnist1d.py` (`lightning-tricks tune` in two worker processes sharing one "
        f"journal file, {args.trials} trials of {args.epochs} epochs, the guide's ranges, TPE, median pruning); the "
        f"search took {search_wall:.0f} s on 2 CPU cores: {states['COMPLETE']} trials complete, "
        f"{states['PRUNED']} pruned.",
        "",
        "| configuration | validation acc % (held-out split) | test acc % (read once) |",
        "|---|---|---|",
        f"| the recipe's defaults (lr 1e-2, weight decay 0.01, batch 100), {args.epochs} epochs | "
        f"{100 * default_val:.1f} | {100 * default_test:.1f} |",
        f"| the best trial ({params}), refitted | {100 * best_val:.1f} (in the search: {100 * best.value:.1f}) | "
        f"{100 * best_test:.1f} |",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        print(f"wrote {write_block('tune', table, 'A 20-trial search: MNIST-1D')}")


if __name__ == "__main__":
    main()
