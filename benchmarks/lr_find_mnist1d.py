"""The LR finder against a grid of lrs on MNIST-1D, with Lightning's Tuner.lr_find beside it.

For each seed: short runs (10 epochs, the demo's ConvBase with label smoothing 0.1, mixup 0.2 and warmup + cosine,
or the same at a constant lr) at 8 lrs spaced geometrically from 1e-4 to 3e-1 give the best lr by validation accuracy
(the 500 held-out sequences);
``lightning_tricks.tuning.lr_find`` (100 steps from 1e-6 to 1, with the same tricks) gives its suggestions, and
Lightning's ``Tuner.lr_find`` (same range and steps) its own. Writes the table into docs/results.md.

Usage::

    python benchmarks/lr_find_mnist1d.py                       # seeds 0 1 2, about 1 minute on 2 cores
    python benchmarks/lr_find_mnist1d.py --schedule constant   # the grid at a constant lr
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks._results import write_block
from lightning_tricks import LabelSmoothing, Mixup, WarmupCosine
from lightning_tricks.demo.data import mnist1d_splits
from lightning_tricks.demo.model import Classifier, ConvBase
from lightning_tricks.tuning import lr_find

GRID = [float(v) for v in np.geomspace(1e-4, 3e-1, 8)]


def _quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)


def grid_run(lr: float, seed: int, epochs: int, schedule: str) -> float:
    _quiet()
    train, val, _ = mnist1d_splits()
    pl.seed_everything(seed, verbose=False)
    callbacks = [LabelSmoothing(0.1), Mixup(0.2)] + ([WarmupCosine(0.1)] if schedule == "cosine" else [])
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, deterministic=True, callbacks=callbacks)
    trainer.fit(Classifier(ConvBase(), lr=lr), DataLoader(train, batch_size=100, shuffle=True),
                DataLoader(val, batch_size=1000))
    return float(trainer.callback_metrics["val_acc"])


def finders(seed: int) -> tuple[float, float, float, float | None]:
    _quiet()
    train, _, _ = mnist1d_splits()
    loader = DataLoader(train, batch_size=100, shuffle=True)
    pl.seed_everything(seed, verbose=False)
    ours = lr_find(Classifier(ConvBase(), lr=1e-3), loader, min_lr=1e-6, max_lr=1.0, num_steps=100,
                   callbacks=[LabelSmoothing(0.1), Mixup(0.2)])
    from lightning.pytorch.tuner import Tuner

    pl.seed_everything(seed, verbose=False)
    model = Classifier(ConvBase(), lr=1e-3)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[LabelSmoothing(0.1), Mixup(0.2)],
                         default_root_dir=str(Path(__file__).resolve().parent / ".lr_find_tmp"))
    found = Tuner(trainer).lr_find(model, train_dataloaders=loader, min_lr=1e-6, max_lr=1.0, num_training=100,
                                   update_attr=False)
    return ours.valley, ours.steep, ours.minimum, found.suggestion() if found is not None else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                    help="the grid's runs: warmup + cosine (the recipe's) or a constant lr")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
        grid = {(lr, s): pool.submit(grid_run, lr, s, args.epochs, args.schedule) for s in args.seeds for lr in GRID}
        found = {s: pool.submit(finders, s) for s in args.seeds}
        accs = {k: f.result() for k, f in grid.items()}
        suggestions = {s: f.result() for s, f in found.items()}
    wall = time.perf_counter() - start
    lines = [
        f"Command: `python benchmarks/lr_find_mnist1d.py --seeds {' '.join(map(str, args.seeds))} --schedule "
        f"{args.schedule}`; {wall:.0f} s on 2 CPU cores. Grid: {args.epochs}-epoch runs "
        f"({'warmup + cosine' if args.schedule == 'cosine' else 'constant lr'}) at lrs "
        f"{', '.join(f'{v:.2g}' for v in GRID)}, validation accuracy on the held-out split; finders: 100 steps from "
        "1e-6 to 1 with label smoothing and mixup on.",
        "",
        "| seed | best grid lr (val acc %) | valley (x best) | steep (x best) | minimum / 10 (x best) | "
        "Lightning's suggestion (x best) |",
        "|---|---|---|---|---|---|",
    ]
    for s in args.seeds:
        best_lr = max(GRID, key=lambda lr: accs[(lr, s)])
        valley, steep, minimum, theirs = suggestions[s]

        def ratio(v: float | None, best: float = best_lr) -> str:
            return "-" if v is None else f"{v:.2g} ({v / best:.2g}x)"

        lines.append(f"| {s} | {best_lr:.2g} ({100 * accs[(best_lr, s)]:.1f}) | {ratio(valley)} | {ratio(steep)} | "
                     f"{ratio(minimum)} | {ratio(theirs)} |")
    lines.append("")
    lines.append("Grid validation accuracy (%) per lr, by seed: " + "; ".join(
        f"seed {s}: " + ", ".join(f"{100 * accs[(lr, s)]:.1f}" for lr in GRID) for s in args.seeds) + ".")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        key = "lr_find" if args.schedule == "cosine" else "lr_find_constant"
        print(f"wrote {write_block(key, table, 'The LR finder against a grid: MNIST-1D')}")


if __name__ == "__main__":
    main()
