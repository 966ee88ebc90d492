"""The demo's outputs: the comparison table, the plots and the figures (CSV and JSON)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

CONFIGS = ("baseline", "recipe", "distilled")


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):5.1f} ± {100 * sd:3.1f}"


def format_table(results: list[dict[str, Any]]) -> str:
    """Per seed and mean rows: test accuracy (%), final and best validation accuracy, final train loss, wall time."""
    head = (f"{'config':<10} {'seed':>5} {'test acc %':>11} {'val acc %':>10} {'best val %':>11} {'train loss':>10} "
            f"{'wall s':>7}  doctor")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['config']:<10} {r['seed']:>5} {100 * r['test_acc']:>11.1f} {100 * r['final_val_acc']:>10.1f} "
                     f"{100 * r['best_val_acc']:>11.1f} {r['final_train_loss']:>10.3f} {r['wall_s']:>7.1f}"
                     f"  {r.get('doctor', '-')}")
    lines.append("-" * len(head))
    for config in CONFIGS:
        rows = [r for r in results if r["config"] == config]
        if rows:
            lines.append(
                f"{config:<10} {'mean':>5} {_mean_sd([r['test_acc'] for r in rows]):>11} "
                f"{_mean_sd([r['final_val_acc'] for r in rows]):>10} {_mean_sd([r['best_val_acc'] for r in rows]):>11} "
                f"{statistics.fmean(r['final_train_loss'] for r in rows):>10.3f} "
                f"{statistics.fmean(r['wall_s'] for r in rows):>7.1f}"
            )
    return "\n".join(lines)


def write_outputs(results: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write ``results.csv``, ``results.json``, ``accuracy.png``, ``lr.png``, ``loss.png`` and ``grad_norms.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    summary_keys = ("config", "seed", "test_acc", "final_val_acc", "best_val_acc", "final_train_loss", "epochs_run",
                    "wall_s", "doctor", "stopped_early")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=summary_keys)
        writer.writeheader()
        for r in results:
            writer.writerow({k: r[k] for k in summary_keys})
    (out / "results.json").write_text(json.dumps(results, indent=1))

    seeds = sorted({r["seed"] for r in results})
    colour = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(seeds)}
    style = {"baseline": ":", "recipe": "-", "distilled": "--"}

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ep = [e["epoch"] for e in r["epochs"] if "val_acc" in e]
        ax.plot(ep, [100 * e["val_acc"] for e in r["epochs"] if "val_acc" in e], style[r["config"]],
                color=colour[r["seed"]], label=f"{r['config']} seed {r['seed']} (test {100 * r['test_acc']:.1f} %)")
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", ylim=(50, 100),
           title="MNIST-1D ConvBase: validation accuracy per epoch (held-out split)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for config in CONFIGS:
        run = next((r for r in results if r["config"] == config), None)
        if run:
            ax.plot(run["lr"], label=f"{config} (seed {run['seed']})")
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate per optimizer step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "lr.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharex=True)
    for r in results:
        ep = [e["epoch"] for e in r["epochs"]]
        kw = dict(color=colour[r["seed"]], linestyle=style[r["config"]], label=f"{r['config']} s{r['seed']}")
        axes[0].plot(ep, [e.get("train_loss_epoch") for e in r["epochs"]], **kw)
        axes[1].plot(ep, [e.get("val_loss") for e in r["epochs"]], **kw)
    axes[0].set(xlabel="epoch", ylabel="loss", title="train loss (recipe: vs soft targets)")
    axes[1].set(xlabel="epoch", ylabel="loss", title="validation loss (plain cross-entropy)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)

    recipe_runs = [r for r in results if r["config"] == "recipe"]
    if recipe_runs:
        r = recipe_runs[0]
        keys = sorted({k for e in r["epochs"] for k in e if k.startswith("grad/norm/")})
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k in keys:
            ax.plot([e["epoch"] for e in r["epochs"] if k in e], [e[k] for e in r["epochs"] if k in e], marker=".",
                    label=k.removeprefix("grad/norm/"))
        ax.set(xlabel="epoch", ylabel="gradient 2-norm", yscale="log",
               title=f"Per-layer gradient norms (recipe, seed {r['seed']}, GradientMonitor)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "grad_norms.png", dpi=120)
        plt.close(fig)
    return [out / n for n in ("results.csv", "results.json", "accuracy.png", "lr.png", "loss.png", "grad_norms.png")
            if (out / n).exists()]
