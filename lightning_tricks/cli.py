"""The lightning-tricks command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_tricks import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-tricks",
                                     description="Proven training tricks as PyTorch Lightning callbacks.")
    parser.add_argument("--version", action="version", version=f"lightning-tricks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from lightning_tricks.demo import run

    demo = sub.add_parser(
        "demo", help="train a plain baseline and the guide's recipe on MNIST-1D and compare them",
        description="Train the MNIST-1D ConvBase with plain AdamW and with the guide's recipe, for each seed; "
                    "validate on a split held out of the training set and report the test set once at the end. "
                    "About 3 minutes on 2 CPU cores.")
    run.add_arguments(demo)
    search = sub.add_parser(
        "tune", help="search hyper-parameters with Optuna over LightningCLI keys",
        description="Search hyper-parameters with Optuna: each trial fits --model/--data from the --config files "
                    "plus the trial's values of the --space keys. Other --trainer.*, --model.* and --data.* arguments "
                    "go to LightningCLI as they are. Needs the [tune] extra.")
    search.add_argument("--model", required=True, help="the LightningModule class, as a dotted path")
    search.add_argument("--data", default=None, help="the LightningDataModule class, as a dotted path")
    search.add_argument("--config", action="append", default=[], help="a base LightningCLI config (repeatable)")
    search.add_argument("--space", default="guide", help="a YAML search space, or 'guide' (the default)")
    search.add_argument("--trials", type=int, default=20, help="trials this process runs (default 20)")
    search.add_argument("--monitor", default="val_acc", help="the validation metric (default val_acc)")
    search.add_argument("--mode", choices=("min", "max"), default=None, help="default: from the metric's name")
    search.add_argument("--sampler", choices=("tpe", "random", "grid"), default="tpe")
    search.add_argument("--no-prune", action="store_true", help="run every trial to the end")
    search.add_argument("--storage", default=None,
                        help="an RDB URL (sqlite:///study.db) or a journal file (journal:/shared/study.log) that "
                             "several workers share; default in memory")
    search.add_argument("--study-name", default="lightning-tricks")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--out", type=Path, default=Path("tune_out"), help="output folder (default ./tune_out)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        if rest:
            demo.error(f"unrecognized arguments: {' '.join(rest)}")
        run.check_arguments(demo, args)
        run.main(args)
    elif args.command == "tune":
        from lightning_tricks.tuning.search import tune

        # `--model my_project.Net` from the folder holding my_project.py: the console script, unlike `python -m`,
        # does not put the working directory on the import path
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        study = tune(args.model, args.data, space=args.space, config=args.config, args=rest, n_trials=args.trials,
                     monitor=args.monitor, mode=args.mode, sampler=args.sampler, prune=not args.no_prune,
                     storage=args.storage, study_name=args.study_name, seed=args.seed, out=args.out)
        done = [t for t in study.trials if t.value is not None]
        if done:
            print(f"best trial {study.best_trial.number}: {args.monitor} = {study.best_value:.4g} with "
                  f"{study.best_params}; {len(study.trials)} trials in the study; wrote {args.out}/best.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
