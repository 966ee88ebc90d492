"""Step-time overhead of the callbacks against a plain Lightning loop, in one run, through a real Trainer.

Configurations (each a fresh Trainer, run interleaved over repeats so that machine drift hits all alike):

* ``plain``: a plain LightningModule (its own cross-entropy step, the same two logged metrics as the mixin's step;
  the TricksMixin seam and steps bypassed): what a user writes without this library;
* ``grad_norm``: Lightning's documented recipe, ``self.log_dict(grad_norm(self, norm_type=2))`` in
  ``on_before_optimizer_step``;
* ``monitor``: :class:`GradientMonitor` with default settings;
* ``mixup``: :class:`LabelSmoothing` (0.1) + :class:`Mixup` (alpha 0.2);
* ``timm_mixup``: ``timm.data.Mixup(mixup_alpha=0.2, label_smoothing=0.1)`` + ``SoftTargetCrossEntropy`` in the
  training step (the usual way to use it);
* ``all``: WarmupCosine + LabelSmoothing + Mixup + GradientMonitor + EarlyStopping + TrainingDoctor together;
* on request, one callback each: ``schedule``, ``smoothing``, ``mixup_only``, ``early_stopping``, ``doctor``, ``ema``;
  and ``mixin``: the TricksMixin's seam and default steps with no callback.

CPU: step time = time between consecutive ``on_train_batch_end`` calls (so data transfer and the batch seam are
inside); each run's median over non-logging steps after warm-up is divided by that of the ``plain`` run of the same
repeat, and the median and quartiles of these paired ratios are reported (whole runs on a shared 2-core VM differ by
up to 10 %, in slow and fast spells, far more than the callbacks cost); also the pooled median step time.
``--toggle BLOCK`` measures more precisely: one run per repeat that alternates ``plain`` and the configuration every
BLOCK steps (swapping the callback list and the module's variant), so both see the same process, memory and VM
speed; the first step of each block and the logging steps are left out.

GPU: training throughput, the way a real run sees it: the host runs ahead of the device and nothing synchronizes per
step, so host work that overlaps device work costs nothing. One ``torch.cuda.synchronize()`` after the warm-up steps
and one at the end bound a window; the figure is its wall time per step (logging steps included), the median over
repeats, and the ratio is to ``plain``'s median. (A synchronize at every step, as on the CPU, would charge every
microsecond of host work before the forward to the step: the device idles while the host prepares the next batch.)
Host-device syncs are counted with ``torch.cuda.set_sync_debug_mode("warn")`` over the same steps, for steps between
logging intervals and for logging steps separately. ``--toggle BLOCK`` on a GPU alternates the modes inside each run
as on the CPU and times each block (its steps after the first) between two synchronizes: separate runs of the same
plain ResNet-18 differed by 13-15 ms a step on a shared H100, more than the target.

Usage::

    python benchmarks/overhead.py --device cpu                  # 2-core CPU: the MNIST-1D ConvBase, batch 100
    python benchmarks/overhead.py --device cpu --toggle 10      # the same, alternating inside each run (precise)
    python benchmarks/overhead.py --device cuda --out results   # GPU: ResNet-18 @32 px/256, ResNet-50 @160 px/128
    python benchmarks/overhead.py --device cuda --toggle 20     # the same, alternating inside each run (precise)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_tricks import (
    EMA,
    EarlyStopping,
    GradientMonitor,
    LabelSmoothing,
    Mixup,
    TrainingDoctor,
    TricksMixin,
    WarmupCosine,
)
from lightning_tricks.demo.model import ConvBase

CONFIGS = ("plain", "grad_norm", "monitor", "mixup", "timm_mixup", "all")
# Configurations run as a plain LightningModule (no TricksMixin seam or steps): the baseline is what a user writes
# without this library, not the mixin with no callback.
BARE = frozenset({"plain", "grad_norm", "timm_mixup"})
# One callback each, for a breakdown of "all" (not run by default): --configs plain schedule smoothing ... all
SINGLE = {
    "schedule": lambda: [WarmupCosine(warmup=0.1)],
    "smoothing": lambda: [LabelSmoothing(0.1)],
    "mixup_only": lambda: [Mixup(alpha=0.2)],
    "early_stopping": lambda: [EarlyStopping("train_loss_epoch", strict=False)],
    "doctor": lambda: [TrainingDoctor()],
    "ema": lambda: [EMA(decay=0.999)],
    "mixin": lambda: [],  # TricksMixin's seam and default steps with no callback: the mixin's own cost
}


class Batches(Dataset):
    """A few fixed batches, already on the device, served round-robin (no loader cost in the step)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, length: int) -> None:
        self.x, self.y, self.length = x, y, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


class Net(TricksMixin, pl.LightningModule):
    def __init__(self, net: nn.Module, num_classes: int, variant: str, channels_last: bool) -> None:
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.num_classes, self.variant = num_classes, variant
        if variant == "timm_mixup":
            from timm.data import Mixup as TimmMixup
            from timm.loss import SoftTargetCrossEntropy

            self.timm_mixup = TimmMixup(mixup_alpha=0.2, label_smoothing=0.1, num_classes=num_classes)
            self.soft_ce = SoftTargetCrossEntropy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.variant in BARE:  # a plain LightningModule: no TricksMixin seam
            return pl.LightningModule.on_after_batch_transfer(self, batch, dataloader_idx)
        return super().on_after_batch_transfer(batch, dataloader_idx)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.variant not in BARE:  # the mixin's default step, with the callbacks' tricks
            return super().training_step(batch, batch_idx)
        x, y = batch
        if self.variant == "timm_mixup":
            x, target = self.timm_mixup(x.clone(), y)
            logits = self(x)
            loss = self.soft_ce(logits.float(), target)
            hard = target.argmax(-1)
        else:  # what a user writes without this library, with the same logging as the mixin's step
            logits = self(x)
            loss = F.cross_entropy(logits, y)
            hard = y
        acc = (logits.argmax(-1) == hard).float().mean()
        self.log("train_loss", loss, on_step=True, on_epoch=True, batch_size=x.shape[0])
        self.log("train_acc", acc, on_step=False, on_epoch=True, batch_size=x.shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.variant == "grad_norm":
            self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)


class StepTimer(pl.Callback):
    """Time and count syncs between consecutive on_train_batch_end calls (put it last in the callbacks).

    On a GPU it also times the window from the end of step ``warmup`` to the end of training, with one synchronize
    at each end (``window_s``), and never synchronizes in between.
    """

    def __init__(self, cuda: bool, warmup: int) -> None:
        self.cuda, self.warmup = cuda, warmup
        self.rows: list[tuple[float, int, bool]] = []  # (seconds, syncs, logging step)
        self.where: dict[str, int] = {}  # "file:line" of the Python frame that made a sync, non-logging steps
        self.window_s: float | None = None
        self.window_steps = 0
        self._window_start: float | None = None
        self._t: float | None = None
        self._rec: Any = None
        self._ctx: Any = None

    def _arm(self) -> None:
        if self.cuda:
            self._ctx = warnings.catch_warnings(record=True)
            self._rec = self._ctx.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def _disarm(self) -> int:
        if not self.cuda or self._ctx is None:
            return 0
        torch.cuda.set_sync_debug_mode(0)
        hits = [w for w in self._rec if "synchroniz" in str(w.message)]
        n = len(hits)
        self._last_where = [f"{Path(w.filename).name}:{w.lineno}" for w in hits]
        self._ctx.__exit__(None, None, None)
        self._ctx = None
        return n

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self._t = time.perf_counter()
        self._arm()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        syncs = self._disarm()
        now = time.perf_counter()
        logging_step = trainer.global_step % trainer.log_every_n_steps == 0
        self.rows.append((now - self._t, syncs, logging_step))
        if syncs and not logging_step:
            for loc in self._last_where:
                self.where[loc] = self.where.get(loc, 0) + 1
        if self.cuda and len(self.rows) == self.warmup:
            torch.cuda.synchronize()
            self._window_start = time.perf_counter()
        self._t = time.perf_counter()
        self._arm()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._disarm()
        if self.cuda and self._window_start is not None:
            torch.cuda.synchronize()
            self.window_s = time.perf_counter() - self._window_start
            self.window_steps = len(self.rows) - self.warmup


def fit(model: pl.LightningModule, x: torch.Tensor, y: torch.Tensor, device: str, precision: str, steps: int,
        log_every: int, callbacks: list[pl.Callback]) -> None:
    """A quiet Trainer (no logger, checkpoint, progress bar or sanity check) over ``steps`` copies of one batch."""
    trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
                         max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=log_every,
                         default_root_dir=tempfile.mkdtemp(prefix="lt-bench-"), callbacks=callbacks)
    trainer.fit(model, DataLoader(Batches(x, y, steps), batch_size=None))


class Toggle(pl.Callback):
    """Switch between ``plain`` and a configuration every ``block`` steps inside one run (``--toggle``).

    Put it after the :class:`StepTimer`. At a block boundary it swaps the Trainer's callback list (a new list: the
    dispatcher finishes the current hook on the old one) and the module's ``variant``, so the next step runs entirely
    in the other mode. Each timed row is tagged with the mode it ran in.

    With ``windows`` (a GPU, where a step's host time says nothing of its device time) it also times each block
    between two synchronizes, from the end of its first step to the end of its last: ``blocks`` holds (mode, seconds
    per step, whether a logging step fell inside). Two synchronizes per block, the same for both modes; in between the
    host runs ahead of the device as in real training.
    """

    def __init__(self, config: str, callbacks: list[pl.Callback], timer: StepTimer, block: int,
                 windows: bool = False) -> None:
        self.config, self.tricks, self.timer, self.block = config, callbacks, timer, block
        self.mode = config  # the callbacks are there at the start, so that their setup hooks run
        self.modes: list[str] = []  # one per timed row
        self.windows = windows
        self.blocks: list[tuple[str, float, bool]] = []
        self._t0 = 0.0
        self._logged = False

    @staticmethod
    def _sync() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.modes.append(self.mode)
        if self.windows:
            # A block touched by a logging step anywhere is marked: Lightning logs after this hook (so the first
            # step's logging falls inside the window) and the monitor before it (so the last step's does too).
            at = len(self.modes) % self.block
            logging = trainer.global_step % trainer.log_every_n_steps == 0
            if at == 1:  # the block's first step (it carries the switch) is left out
                self._t0, self._logged = self._sync(), logging
            else:
                self._logged |= logging
                if at == 0:
                    self.blocks.append((self.mode, (self._sync() - self._t0) / (self.block - 1), self._logged))
        if len(self.modes) % self.block == 0:
            self.mode = self.config if self.mode == "plain" else "plain"
            rest = [cb for cb in trainer.callbacks if cb not in self.tricks]
            trainer.callbacks = self.tricks + rest if self.mode != "plain" else rest
            pl_module.variant = self.mode


def setup(w: dict[str, Any], config: str, device: str) -> tuple[torch.Tensor, torch.Tensor, Net]:
    """The workload's fixed batch on ``device`` (seeded) and a fresh model in the configuration's variant."""
    torch.manual_seed(0)
    x = torch.randn(*w["shape"], device=device)
    if w["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, w["classes"], (w["shape"][0],), device=device)
    return x, y, Net(w["make"](), w["classes"], config, w["channels_last"])


def run_toggled(w: dict[str, Any], config: str, steps: int, block: int, log_every: int, device: str = "cpu",
                precision: str = "32-true", windows: bool = False) -> tuple[float, float]:
    """One run alternating ``plain`` and ``config`` every ``block`` steps: their median step times (s).

    CPU: the time between consecutive batch ends; the first step of every block is left out (it carries the switch),
    and so are logging steps. GPU (or ``windows``): each block's steps after its first, between two synchronizes
    (:class:`Toggle`), blocks with a logging step left out. The first two blocks are warm-up. Alternating every few
    steps inside one run cancels the machine's slow speed swings (5-6 % between half-second windows on the 2-core
    VM; 13-15 ms for the same ResNet-18 step across separate runs on a shared H100), which separate runs cannot.
    """
    x, y, model = setup(w, config, device)
    timer = StepTimer(cuda=False, warmup=0)  # no sync counting here: the separate runs count syncs
    tricks = callbacks_for(config)
    windows = windows or device == "cuda"
    toggle = Toggle(config, tricks, timer, block, windows=windows)
    fit(model, x, y, device, precision, steps, log_every, [*tricks, timer, toggle])
    kept: dict[str, list[float]] = {"plain": [], config: []}
    if windows:
        for mode, t, logging in toggle.blocks[2:]:
            if not logging:
                kept[mode].append(t)
    else:
        for i, ((t, _, logging), mode) in enumerate(zip(timer.rows, toggle.modes)):
            if i >= 2 * block and i % block != 0 and not logging:
                kept[mode].append(t)
    return statistics.median(kept["plain"]), statistics.median(kept[config])


def callbacks_for(config: str) -> list[pl.Callback]:
    if config in SINGLE:
        return SINGLE[config]()
    if config == "monitor":
        return [GradientMonitor()]
    if config == "mixup":
        return [LabelSmoothing(0.1), Mixup(alpha=0.2)]
    if config == "all":
        return [WarmupCosine(warmup=0.1), LabelSmoothing(0.1), Mixup(alpha=0.2), GradientMonitor(),
                EarlyStopping("train_loss_epoch", strict=False), TrainingDoctor()]
    return []


def workloads(device: str) -> list[dict[str, Any]]:
    if device == "cuda":
        import timm

        return [
            dict(name="resnet18-32px-b256", make=lambda: timm.create_model("resnet18", num_classes=10),
                 shape=(256, 3, 32, 32), classes=10, channels_last=True),
            dict(name="resnet50-160px-b128", make=lambda: timm.create_model("resnet50", num_classes=1000),
                 shape=(128, 3, 160, 160), classes=1000, channels_last=True),
        ]
    # The demo's step (batch 100, about 4 ms). A batch-500 variant was tried: its two-thread kernels made the step
    # times too noisy on a 2-core VM to resolve the callbacks (the same monitor measured +0.1 and +0.4 ms).
    return [dict(name="mnist1d-convbase-b100", make=ConvBase, shape=(100, 1, 40), classes=10, channels_last=False)]


def run_one(w: dict[str, Any], config: str, device: str, steps: int, precision: str, log_every: int,
            warmup: int = 15) -> StepTimer:
    x, y, model = setup(w, config, device)
    timer = StepTimer(cuda=device == "cuda", warmup=warmup)
    fit(model, x, y, device, precision, steps, log_every, [*callbacks_for(config), timer])
    return timer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 120 on GPU, 150 on CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3 on GPU, 20 on CPU)")
    ap.add_argument("--warmup", type=int, default=15, help="leading steps dropped from each run")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=[*CONFIGS, *SINGLE])
    ap.add_argument("--out", type=Path, default=None, help="folder for overhead.json and overhead.md")
    ap.add_argument("--workloads", nargs="+", default=None, help="names of the workloads to run (default: all)")
    ap.add_argument("--toggle", type=int, default=0, metavar="BLOCK",
                    help="instead of separate runs, alternate plain and each configuration every BLOCK steps "
                         "inside one run (600 steps a run unless --steps); on a GPU each block is timed between "
                         "two synchronizes")
    ap.add_argument("--windows", action="store_true",
                    help="with --toggle on the CPU: time blocks as on a GPU (to try that code path)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    device = args.device
    steps = args.steps or (120 if device == "cuda" else 150)
    args.repeats = args.repeats or (3 if device == "cuda" else 20)
    precision = "bf16-mixed" if device == "cuda" else "32-true"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.toggle:
        toggled(args, device, precision)
        return
    machine = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    results: dict[str, Any] = {"machine": machine, "torch": torch.__version__, "lightning": pl.__version__,
                               "precision": precision, "steps": steps, "repeats": args.repeats, "workloads": {}}
    lines = [f"machine: {machine}; torch {torch.__version__}; lightning {pl.__version__}; {precision}; "
             f"{steps} steps x {args.repeats} interleaved repeats; log_every_n_steps={args.log_every}", ""]
    for w in workloads(device):
        if args.workloads and w["name"] not in args.workloads:
            continue
        where: dict[str, dict[str, int]] = {c: {} for c in args.configs}
        times: dict[str, list[float]] = {c: [] for c in args.configs}
        all_times: dict[str, list[float]] = {c: [] for c in args.configs}  # logging steps included
        syncs: dict[str, list[int]] = {c: [] for c in args.configs}
        log_syncs: dict[str, list[int]] = {c: [] for c in args.configs}
        windows: dict[str, list[float]] = {c: [] for c in args.configs}  # GPU: ms/step of each repeat's window
        rep_med: dict[str, list[float]] = {c: [] for c in args.configs}  # CPU: each repeat's median step
        rep_mean: dict[str, list[float]] = {c: [] for c in args.configs}  # CPU: each repeat's mean, logging included
        run_one(w, "plain", device, 20, precision, args.log_every)  # warm-up: cudnn autotune, allocator
        for r in range(args.repeats):
            for c in (args.configs if r % 2 == 0 else args.configs[::-1]):  # alternate the order: drift hits all
                timer = run_one(w, c, device, steps, precision, args.log_every, args.warmup)
                if timer.window_s is not None:
                    windows[c].append(1e3 * timer.window_s / timer.window_steps)
                for loc, k in timer.where.items():
                    where[c][loc] = where[c].get(loc, 0) + k
                rows = timer.rows[args.warmup:]
                times[c] += [t for t, _, logging in rows if not logging]
                all_times[c] += [t for t, _, _ in rows]
                rep_med[c].append(statistics.median([t for t, _, logging in rows if not logging]))
                rep_mean[c].append(statistics.fmean([t for t, _, _ in rows]))
                syncs[c] += [s for _, s, logging in rows if not logging]
                log_syncs[c] += [s for _, s, logging in rows if logging]
        lines.append(f"### {w['name']}")
        lines.append("")
        entry: dict[str, Any] = {}
        if device == "cuda":
            base_w = statistics.median(windows["plain"]) if "plain" in windows else None
            lines.append("| config | ms/step (window, median of repeats) | ratio to plain | each repeat, ms/step | "
                         "syncs/step (non-logging) | syncs at logging steps |")
            lines.append("|---|---|---|---|---|---|")
            for c in args.configs:
                med = statistics.median(windows[c])
                ratio = med / base_w if base_w else float("nan")
                s = statistics.fmean(syncs[c]) if syncs[c] else 0.0
                ls = statistics.fmean(log_syncs[c]) if log_syncs[c] else float("nan")
                each = ", ".join(f"{v:.2f}" for v in windows[c])
                lines.append(f"| {c} | {med:.2f} | {ratio:.3f}x | {each} | {s:.2f} | {ls:.1f} |")
                entry[c] = {"window_ms": med, "ratio": ratio, "repeats_ms": windows[c], "syncs_per_step": s,
                            "syncs_logging": ls, "n_steps": len(syncs[c])}
        else:
            # Runs of one configuration differ by up to 10 % on a shared 2-core VM (slow and fast spells), so the
            # ratio is taken per repeat, against the plain run next to it, and summarised by the median and the
            # quartiles of those paired ratios.
            base = statistics.median(times["plain"]) if "plain" in times else None
            lines.append("| config | median step ms | added ms | ratio to plain (median of paired repeats) | "
                         "quartiles of the paired ratios | same, mean step incl. logging steps |")
            lines.append("|---|---|---|---|---|---|")
            for c in args.configs:
                med = statistics.median(times[c])
                paired = [a / b for a, b in zip(rep_med[c], rep_med.get("plain", []))]
                paired_mean = [a / b for a, b in zip(rep_mean[c], rep_mean.get("plain", []))]
                ratio = statistics.median(paired) if paired else float("nan")
                quart = statistics.quantiles(paired, n=4) if len(paired) > 1 else [ratio, ratio, ratio]
                mean_ratio = statistics.median(paired_mean) if paired_mean else float("nan")
                added = 1e3 * (med - base) if base else float("nan")
                lines.append(f"| {c} | {1e3 * med:.2f} | {added:+.2f} | {ratio:.3f}x | {quart[0]:.3f}-{quart[2]:.3f} | "
                             f"{mean_ratio:.3f}x |")
                entry[c] = {"median_ms": 1e3 * med, "added_ms": added, "ratio": ratio, "ratio_quartiles": quart,
                            "mean_ratio": mean_ratio, "repeat_medians_ms": [1e3 * v for v in rep_med[c]],
                            "n": len(times[c])}
        results["workloads"][w["name"]] = entry
        if device == "cuda":
            for c in args.configs:
                top = sorted(where[c].items(), key=lambda kv: -kv[1])[:4]
                entry[c]["sync_sites"] = top
                lines.append(f"- sync sites, {c}: {top}")
        lines.append("")
        print("\n".join(lines[-(len(args.configs) + 4):]), flush=True)
    report(args.out, "overhead", lines, results)


def report(out: Path | None, stem: str, lines: list[str], results: dict[str, Any]) -> None:
    """Print the table and, with ``--out``, write it as ``<stem>.md`` and the figures as ``<stem>.json``."""
    text = "\n".join(lines)
    print("\n" + text)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
        (out / f"{stem}.md").write_text(text + "\n")


def toggled(args: argparse.Namespace, device: str, precision: str) -> None:
    """``--toggle``: each configuration against ``plain`` inside the same runs (see :func:`run_toggled`)."""
    steps = args.steps or 600
    repeats = args.repeats
    machine = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    how = ("per step, the time between batch ends" if device == "cpu" and not args.windows else
           f"per block, the wall time of its last {args.toggle - 1} steps between two synchronizes")
    lines = [f"machine: {machine}; torch {torch.__version__}; lightning {pl.__version__}; {precision}; {steps} steps "
             f"a run, plain and the configuration alternating every {args.toggle} steps ({how}); {repeats} runs per "
             f"configuration; log_every_n_steps={args.log_every}", ""]
    results: dict[str, Any] = {"machine": machine, "torch": torch.__version__, "lightning": pl.__version__,
                               "precision": precision, "steps": steps, "block": args.toggle, "repeats": repeats,
                               "workloads": {}}
    for w in workloads(device):
        if args.workloads and w["name"] not in args.workloads:
            continue
        lines += [f"### {w['name']} (in-run interleaved)", "",
                  "| config | plain step ms (median) | added ms (median) | ratio to plain (median of runs) | "
                  "range of the runs |", "|---|---|---|---|---|"]
        entry: dict[str, Any] = {}
        if device == "cuda":
            run_one(w, "plain", device, 20, precision, args.log_every)  # warm-up: cudnn autotune, allocator
        for c in [c for c in args.configs if c != "plain"]:
            pairs = [run_toggled(w, c, steps, args.toggle, args.log_every, device, precision, args.windows)
                     for _ in range(repeats)]
            ratios = [a / p for p, a in pairs]
            plain_ms = statistics.median(1e3 * p for p, _ in pairs)
            added = statistics.median(1e3 * (a - p) for p, a in pairs)
            ratio = statistics.median(ratios)
            lines.append(f"| {c} | {plain_ms:.2f} | {added:+.3f} | {ratio:.3f}x | "
                         f"{min(ratios):.3f}-{max(ratios):.3f} |")
            entry[c] = {"ratio": ratio, "ratios": ratios, "plain_ms": plain_ms, "added_ms": added}
            print(lines[-1], flush=True)
        lines.append("")
        results["workloads"][w["name"]] = entry
    report(args.out, "overhead_toggled", lines, results)


if __name__ == "__main__":
    main()
