"""Does distillation help on MNIST-1D? A wide CNN teacher distilled into the paper's ConvBase, paired by seed.

1. Train the teacher once (ConvBase with ``--teacher-channels`` channels, the demo's recipe: warmup-cosine, label
   smoothing 0.1, mixup 0.2).
2. For each seed, train the student (ConvBase, ``--student-channels``) twice from the same initialisation and data
   order: without a teacher, and with ``Distillation(teacher, temperature, alpha)``. Both use AdamW 1e-2 and
   warmup-cosine; nothing else differs.
3. Print the table (test accuracy per seed, the paired difference, mean +- sd).

Usage::

    python benchmarks/distillation_mnist1d.py                       # the guide's defaults T=3, alpha=0.7
    python benchmarks/distillation_mnist1d.py --temperature 4 --alpha 0.9 --student-channels 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lightning_tricks import Distillation, LabelSmoothing, Mixup, WarmupCosine
from lightning_tricks.demo.data import mnist1d
from lightning_tricks.demo.model import Classifier, ConvBase


def fit(model: Classifier, callbacks: list[pl.Callback], epochs: int, data: tuple, seed: int) -> float:
    pl.seed_everything(seed, verbose=False)
    train, test = data
    trainer = pl.Trainer(default_root_dir=tempfile.mkdtemp(prefix="lt-bench-"),  # stop checkpoints, doctor reports
                         max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=callbacks, deterministic=True)
    trainer.fit(model, DataLoader(train, batch_size=100, shuffle=True), DataLoader(test, batch_size=1000))
    return float(trainer.callback_metrics["val_acc"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--teacher-channels", type=int, default=128)
    ap.add_argument("--student-channels", type=int, default=25)
    ap.add_argument("--temperature", type=float, default=3.0)
    ap.add_argument("--alpha", type=float, default=0.7)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    data = mnist1d()

    start = time.perf_counter()
    pl.seed_everything(100, verbose=False)
    teacher = Classifier(ConvBase(channels=args.teacher_channels))
    teacher_acc = fit(teacher, [WarmupCosine(0.1), LabelSmoothing(0.1), Mixup(0.2)], args.epochs, data, 100)
    n_teacher = sum(p.numel() for p in teacher.parameters())
    print(f"teacher: ConvBase({args.teacher_channels} channels), {n_teacher} parameters, test accuracy "
          f"{100 * teacher_acc:.1f} % ({time.perf_counter() - start:.0f} s)", flush=True)

    rows = []
    for seed in args.seeds:
        pl.seed_everything(seed, verbose=False)
        init = Classifier(ConvBase(channels=args.student_channels)).state_dict()
        accs = []
        for distil in (False, True):
            student = Classifier(ConvBase(channels=args.student_channels))
            student.load_state_dict(init)  # the same initialisation for both
            callbacks: list[pl.Callback] = [WarmupCosine(0.1)]
            if distil:
                callbacks.append(Distillation(teacher.net, temperature=args.temperature, alpha=args.alpha))
            accs.append(fit(student, callbacks, args.epochs, data, seed))
        rows.append((seed, *accs))
        print(f"seed {seed}: student alone {100 * accs[0]:.1f} %, distilled {100 * accs[1]:.1f} %", flush=True)

    n_student = sum(p.numel() for p in ConvBase(channels=args.student_channels).parameters())
    alone, distilled = [r[1] for r in rows], [r[2] for r in rows]
    deltas = [d - a for a, d in zip(alone, distilled)]

    def ms(v: list[float]) -> str:
        return f"{100 * statistics.fmean(v):.1f} ± {100 * (statistics.stdev(v) if len(v) > 1 else 0):.1f}"

    lines = [
        f"teacher ConvBase({args.teacher_channels}) {n_teacher} params: {100 * teacher_acc:.1f} %; student "
        f"ConvBase({args.student_channels}) {n_student} params; T={args.temperature}, alpha={args.alpha}, "
        f"{args.epochs} epochs",
        "",
        "| seed | student alone % | distilled % | paired delta (points) |",
        "|---|---|---|---|",
        *[f"| {s} | {100 * a:.1f} | {100 * d:.1f} | {100 * (d - a):+.1f} |" for s, a, d in rows],
        f"| mean ± sd | {ms(alone)} | {ms(distilled)} | {100 * statistics.fmean(deltas):+.1f} |",
        "",
        f"total time {time.perf_counter() - start:.0f} s",
    ]
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
