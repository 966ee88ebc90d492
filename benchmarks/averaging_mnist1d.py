"""Weight averaging and ensembles on MNIST-1D: the demo's recipe alone, with EMA, with SWA, and 3-member ensembles.

Every run trains the paper's ConvBase for 100 epochs on 3,500 training sequences with the demo's recipe (warmup +
cosine to 0.1, label smoothing 0.1, mixup 0.2, early stopping on validation accuracy with the best weights restored),
validates on the 500 held-out ones, and is scored once on the 1,000 test sequences: accuracy, NLL and expected
calibration error (15 bins). An ensemble of seed s is the recipe models of seeds s, s + 3 and s + 6; its weights
(``weighted``) are fitted on the validation split. Writes its table into docs/results.md between markers.

Usage::

    python benchmarks/averaging_mnist1d.py            # seeds 0 1 2, about 4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from benchmarks._results import write_block
from lightning_tricks import EMA, SWA, WarmupCosine
from lightning_tricks.demo.data import mnist1d_splits
from lightning_tricks.demo.model import Classifier, ConvBase
from lightning_tricks.demo.run import recipe_callbacks
from lightning_tricks.functional import combine, expected_calibration_error, fit_convex_weights, majority_vote


def _without_schedule() -> list[pl.Callback]:
    return [cb for cb in recipe_callbacks() if not isinstance(cb, WarmupCosine)]


# Each configuration's full callback list: the recipe plus the averaging, or (classic SWA) the recipe without its
# schedule and SWA's own constant lr from half the run.
CONFIGS = {
    "recipe": recipe_callbacks,
    "+ EMA 0.999 (timm warmup)": lambda: [*recipe_callbacks(), EMA(decay=0.999)],
    "+ EMA 0.9998 (timm warmup)": lambda: [*recipe_callbacks(), EMA(decay=0.9998)],
    "+ EMA 0.995, no warmup": lambda: [*recipe_callbacks(), EMA(decay=0.995, warmup=False)],
    "+ SWA from 50 %": lambda: [*recipe_callbacks(), SWA(start=0.5)],
    "+ SWA from 75 %": lambda: [*recipe_callbacks(), SWA(start=0.75)],
    "no schedule + SWA from 50 %, swa_lr 2e-3": lambda: [*_without_schedule(),
                                                        SWA(start=0.5, swa_lr=2e-3, anneal_epochs=5)],
}


def run(config: str, seed: int, epochs: int) -> dict[str, Any]:
    """One training run; returns its validation and test probabilities."""
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    train, val, test = mnist1d_splits()
    pl.seed_everything(seed, verbose=False)
    model = Classifier(ConvBase(), lr=1e-2, weight_decay=0.01)
    trainer = pl.Trainer(default_root_dir=tempfile.mkdtemp(prefix="lt-bench-"),  # stop checkpoints, doctor reports
                         max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         deterministic=True, callbacks=CONFIGS[config]())
    trainer.fit(model, DataLoader(train, batch_size=100, shuffle=True), DataLoader(val, batch_size=1000))
    model.eval()
    with torch.no_grad():
        return {"val": F.softmax(model(val.tensors[0]), -1), "test": F.softmax(model(test.tensors[0]), -1)}


def scores(probs: torch.Tensor, y: torch.Tensor, decision: torch.Tensor | None = None) -> tuple[float, float, float]:
    decision = probs.argmax(-1) if decision is None else decision
    return (float((decision == y).float().mean()), float(F.nll_loss(probs.clamp_min(1e-12).log(), y)),
            float(expected_calibration_error(probs, y)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    _, val, test = mnist1d_splits()
    y_val, y_test = val.tensors[1], test.tensors[1]
    n = len(args.seeds)
    jobs = [(c, s) for s in args.seeds for c in CONFIGS]
    jobs += [("recipe", s + k * n) for s in args.seeds for k in (1, 2)]  # the ensembles' other members
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {job: pool.submit(run, *job, args.epochs) for job in jobs}
        out = {job: f.result() for job, f in futures.items()}
    wall = time.perf_counter() - start

    rows: dict[str, list[tuple[float, float, float]]] = {}
    for config in CONFIGS:
        rows[config] = [scores(out[(config, s)]["test"], y_test) for s in args.seeds]
    for method in ("mean", "weighted", "vote"):
        name = f"ensemble of 3, {method}"
        rows[name] = []
        for s in args.seeds:
            members = [out[("recipe", s + k * n)] for k in range(3)]
            test_probs = torch.stack([m["test"] for m in members])
            weights = fit_convex_weights(torch.stack([m["val"] for m in members]), y_val) if method == "weighted" \
                else None
            combined = combine(test_probs, method, weights)
            rows[name].append(scores(combined, y_test, majority_vote(test_probs) if method == "vote" else None))

    def mean_sd(values: list[float], scale: float = 100.0) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{scale * statistics.fmean(values):.2f} ± {scale * sd:.2f}" if scale == 1.0 else \
            f"{scale * statistics.fmean(values):.1f} ± {scale * sd:.1f}"

    base = rows["recipe"]
    lines = [
        f"Command: `python benchmarks/averaging_mnist1d.py --seeds {' '.join(map(str, args.seeds))} --epochs "
        f"{args.epochs}`; {len(jobs)} runs, {wall:.0f} s on 2 CPU cores (torch {torch.__version__}, Lightning "
        f"{pl.__version__}). Test set read once per model; accuracy and ECE in %, NLL in nats.",
        "",
        "| config | test acc % per seed | acc mean ± sd | paired delta vs recipe | NLL mean ± sd | ECE % mean ± sd |",
        "|---|---|---|---|---|---|",
    ]
    for name, values in rows.items():
        accs = [v[0] for v in values]
        deltas = [100 * (a - b[0]) for a, b in zip(accs, base)]
        delta = "-" if name == "recipe" else f"{statistics.fmean(deltas):+.1f} (" + ", ".join(
            f"{d:+.1f}" for d in deltas) + ")"
        lines.append(f"| {name} | {', '.join(f'{100 * a:.1f}' for a in accs)} | {mean_sd(accs)} | {delta} | "
                     f"{mean_sd([v[1] for v in values], 1.0)} | {mean_sd([v[2] for v in values])} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        results = write_block("averaging", table, "Weight averaging and ensembles: MNIST-1D")
        print(f"wrote {results}")


if __name__ == "__main__":
    main()
