"""Model set-up on MNIST-1D: initialisation schemes, L1 and stochastic depth, one change at a time.

Every run trains a ``ResConv1d`` (stem, 4 residual blocks, head) for 30 epochs on the 3,500 training sequences
(AdamW lr 1e-2, weight decay 0.01, warmup + cosine, batch 100, no other trick), validates on the 500 held-out ones
and is tested once on the 1,000 test sequences, with no model selection. The baseline keeps torch's default
initialisation; each other row changes one thing.

Usage::

    python benchmarks/setup_ablation_mnist1d.py         # seeds 0 1 2, about 2-3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from benchmarks._results import percent_spread, write_block
from lightning_tricks import L1, WarmupCosine, add_drop_path, init_weights
from lightning_tricks.demo.data import mnist1d_splits
from lightning_tricks.demo.model import Classifier, ResConv1d

CONFIGS = {
    "baseline (torch's default init)": {},
    "init: Kaiming normal, fan_out (the guide's)": {"init": dict(scheme="kaiming_normal")},
    "init: Kaiming + zero-init residual": {"init": dict(scheme="kaiming_normal", zero_init_residual=True)},
    "init: Xavier normal": {"init": dict(scheme="xavier_normal")},
    "init: LeCun normal": {"init": dict(scheme="lecun_normal")},
    "L1 1e-4 (proximal)": {"l1": 1e-4},
    "L1 1e-3 (proximal)": {"l1": 1e-3},
    "DropPath 0.1": {"drop_path": 0.1},
    "DropPath 0.2": {"drop_path": 0.2},
}


def run(config: str, seed: int, epochs: int) -> tuple[float, float, float | None]:
    import logging

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    spec = CONFIGS[config]
    train, val, test = mnist1d_splits()
    pl.seed_everything(seed, verbose=False)
    net = ResConv1d()
    if "init" in spec:
        init_weights(net, **spec["init"])
    if "drop_path" in spec:
        add_drop_path(net, spec["drop_path"])
    callbacks: list[pl.Callback] = [WarmupCosine(0.1)]
    l1 = L1(spec["l1"]) if "l1" in spec else None
    if l1 is not None:
        callbacks.append(l1)
    model = Classifier(net, lr=1e-2)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", callbacks=callbacks,
                         log_every_n_steps=35)
    trainer.fit(model, DataLoader(train, batch_size=100, shuffle=True), DataLoader(val, batch_size=500))
    model.eval()
    with torch.no_grad():
        x, y = test.tensors
        test_acc = float((model(x).argmax(-1) == y).float().mean())
    return float(trainer.callback_metrics["val_acc"]), test_acc, (l1.sparsity if l1 is not None else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
        futures = {(c, s): pool.submit(run, c, s, args.epochs) for c in CONFIGS for s in args.seeds}
        results = {k: f.result() for k, f in futures.items()}
    wall = time.perf_counter() - start

    base = "baseline (torch's default init)"
    lines = [
        f"Command: `python benchmarks/setup_ablation_mnist1d.py --seeds {' '.join(map(str, args.seeds))} --epochs "
        f"{args.epochs}`; {wall:.0f} s on 2 CPU cores. Mean ± std over {len(args.seeds)} seeds; differences to the "
        "baseline paired by seed.",
        "",
        "| configuration | validation acc % | test acc % | test: difference to baseline (per seed) |",
        "|---|---|---|---|",
    ]
    for config in CONFIGS:
        vals = [results[(config, s)][0] for s in args.seeds]
        tests = [results[(config, s)][1] for s in args.seeds]
        diffs = ", ".join(f"{100 * (results[(config, s)][1] - results[(base, s)][1]):+.1f}" for s in args.seeds)
        sparsity = [results[(config, s)][2] for s in args.seeds]
        note = f" (weights exactly 0: {100 * statistics.mean(sparsity):.0f} %)" if sparsity[0] is not None else ""
        diffs = "-" if config == base else diffs
        lines.append(f"| {config}{note} | {percent_spread(vals)} | {percent_spread(tests)} | {diffs} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        print(f"wrote {write_block('setup_ablation', table, 'Model set-up: init, L1, DropPath on MNIST-1D')}")


if __name__ == "__main__":
    main()
