"""Draw docs/img/mixup_digits.png: a MixUp and a CutMix of two of scikit-learn's bundled digits.

Run: python docs/plot_mixup.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from lightning_tricks.demo.data import digits
from lightning_tricks.functional import cutmix, mixup, smooth_targets


def figure() -> plt.Figure:
    train, _ = digits()
    x, y = train.tensors[0][:2], train.tensors[1][:2]
    soft = smooth_targets(y, 10, 0.0)
    index = torch.tensor([1, 0])
    mixed, mixed_t = mixup(x, soft, 0.6, index)
    cut, cut_t = cutmix(x, soft, ((2, 7), (1, 6)), index)
    panels = [(x[0], f"sample a: {y[0].item()}"), (x[1], f"sample b: {y[1].item()}"),
              (mixed[0], "mixup, lam=0.6\n" + _label(mixed_t[0])), (cut[0], "cutmix, box 5x5\n" + _label(cut_t[0]))]
    fig, axes = plt.subplots(1, 4, figsize=(9, 2.8))
    for ax, (img, title) in zip(axes, panels):
        ax.imshow(img[0], cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig


def _label(t: torch.Tensor) -> str:
    top = t.topk(2)
    return ", ".join(f"{v:.2f}·'{i}'" for v, i in zip(top.values.tolist(), top.indices.tolist()))


if __name__ == "__main__":
    out = Path(__file__).parent / "img" / "mixup_digits.png"
    figure().savefig(out, dpi=110)
    print(f"wrote {out}")
