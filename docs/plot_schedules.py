"""Draw docs/img/schedules.png: the schedules of lightning_tricks.functional over 1000 optimizer steps.

Run: python docs/plot_schedules.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lightning_tricks.functional import constant_with_warmup, linear_decay, step_decay, warmup_cosine


def main(out: Path = Path(__file__).parent / "img" / "schedules.png") -> Path:
    total, warmup = 1000, 100
    steps = range(total)
    curves = {
        "warmup_cosine (default start 1/(W+1))": [warmup_cosine(s, total_steps=total, warmup_steps=warmup)
                                                 for s in steps],
        "warmup_cosine, min_lr_ratio=0.1": [warmup_cosine(s, total_steps=total, warmup_steps=warmup,
                                                          min_lr_ratio=0.1) for s in steps],
        "linear_decay": [linear_decay(s, total_steps=total, warmup_steps=warmup) for s in steps],
        "step_decay (x0.1 every 300)": [step_decay(s, step_size=300, warmup_steps=warmup) for s in steps],
        "constant_with_warmup": [constant_with_warmup(s, warmup_steps=warmup) for s in steps],
    }
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    for name, f in curves.items():
        ax.plot(steps, f, label=name)
    ax.set(xlabel="optimizer step (trainer.global_step)", ylabel="lr factor", title="Schedules, 1000 steps, warmup 100")
    ax.legend(fontsize=8)
    first = range(12)
    zoom.plot(first, [warmup_cosine(s, total_steps=100, warmup_steps=10) for s in first], "o-",
              label="ours: start_factor=None -> (s+1)/(W+1)")
    zoom.plot(first, [warmup_cosine(s, total_steps=100, warmup_steps=10, start_factor=0.0) for s in first], "x--",
              label="transformers: step 0 gets lr 0")
    zoom.set(xlabel="optimizer step", title="The first steps (W = 10)")
    zoom.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(f"wrote {main()}")
