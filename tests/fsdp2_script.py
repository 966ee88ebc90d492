"""Every callback under FSDP2 (Lightning's ``ModelParallelStrategy``, ``fully_shard``) on 2 CPU processes over gloo.

Run by ``tests/test_sharded.py`` as ``python tests/fsdp2_script.py OUT_DIR [CASE ...]``: Lightning re-executes this
script for rank 1, so each rank runs every case; the assertions run inside both ranks, and each case that passes on a
rank writes ``OUT_DIR/<case>.rank<r>.ok``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import (
    EMA,
    SWA,
    Distillation,
    EarlyStopping,
    GradientMonitor,
    LabelSmoothing,
    Mixup,
    TrainingDoctor,
    TricksMixin,
    WarmupCosine,
    recipe,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root for `tests`
from tests.conftest import MetricsRecorder

warnings.filterwarnings("ignore")


class ShardedNet(TricksMixin, pl.LightningModule):
    """Conv1d + MLP classifier, 4 classes; each layer and the whole net are sharded with ``fully_shard``."""

    num_classes = 4

    def __init__(self, lr: float = 0.02, nan_at: int | None = None) -> None:
        super().__init__()
        self.lr, self.nan_at = lr, nan_at
        self.net = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
                                 nn.Linear(32, 4))

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def data(n: int = 128, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 16, generator=g) + y.float().view(-1, 1, 1)
    return DataLoader(TensorDataset(x, y), batch_size=8)


DEVICES = int(os.environ.get("FSDP2_DEVICES", "2"))  # the reshard case reads with another number of processes


def trainer(out: Path, **kw: Any) -> pl.Trainer:
    args: dict[str, Any] = dict(
        accelerator="cpu", devices=DEVICES,
        strategy=ModelParallelStrategy(data_parallel_size=DEVICES, tensor_parallel_size=1,
                                       timeout=timedelta(seconds=90)),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(out),
    )
    args.update(kw)
    return pl.Trainer(**args)


def gathered(t: pl.Trainer, values: list[float]) -> torch.Tensor:
    return t.strategy.all_gather(torch.tensor(values, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------- cases
class FullNorm(pl.Callback):
    """The reference: the norm of the full (gathered) gradient at each optimizer step."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        full = [p.grad.full_tensor() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.nn.utils.get_total_norm(full)))


def case_monitor(out: Path) -> None:
    ref, mon, rec = FullNorm(), GradientMonitor(log_every_n_steps=1), MetricsRecorder()
    t = trainer(out, max_steps=6, accumulate_grad_batches=2, callbacks=[ref, mon], logger=rec)
    t.fit(ShardedNet(), data())
    assert len(rec.history()) == len(ref.norms) == 6
    for m, r in zip(rec.history(), ref.norms):
        assert abs(m["grad/norm"] - r) <= 1e-5 * r, (m["grad/norm"], r)
    assert isinstance(next(iter(t.lightning_module.parameters())), DTensor)
    both = gathered(t, [m["grad/norm"] for m in rec.history()])
    assert torch.equal(both[0], both[1])  # every rank logs the same figure


class NaNOnOneRank(pl.Callback):
    """Puts a NaN into rank 1's local shard of the head's gradient at optimizer step 3 only."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.global_step == 3 and trainer.global_rank == 1:
            grad = pl_module.net[-1].weight.grad
            grad.to_local().view(-1)[0] = float("nan")


def case_monitor_nan(out: Path) -> None:
    mon = GradientMonitor(log_every_n_steps=2, on_nonfinite="stop", checkpoint_dir=str(out / "nan"))
    t = trainer(out, max_steps=20, callbacks=[NaNOnOneRank(), mon])
    t.fit(ShardedNet(), data())
    assert mon.stopped_step == 3, mon.stopped_step  # rank 0's shards were finite: the reduced decision stops it too
    steps = gathered(t, [float(t.global_step)])
    assert steps[0] == steps[1] == 4
    assert mon.checkpoint_path is not None and os.path.exists(mon.checkpoint_path)


class Scripted(ShardedNet):
    """Logs a scripted val_loss per epoch (best at epoch 1) and keeps each epoch's local shards."""

    SCORES = (1.0, 0.5, 0.9, 0.8, 0.7, 0.95)

    def __init__(self) -> None:
        super().__init__()
        self.shards: list[list[torch.Tensor]] = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.SCORES[self.current_epoch], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.shards.append([p.to_local().detach().clone() for p in self.parameters()])


def case_early_stopping(out: Path) -> None:
    stopper = EarlyStopping("val_loss", patience=3, restore_best_weights=True, checkpoint_dir=str(out / "es"))
    model = Scripted()
    t = trainer(out, max_epochs=6, limit_val_batches=1, callbacks=[stopper])
    t.fit(model, data(64), data(16))
    assert stopper.best_epoch == 1 and t.current_epoch == 5  # stopped after 3 checks without improvement
    now = [p.to_local() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(now, model.shards[1]))  # each rank got its own best shards back
    assert not all(torch.equal(a, b) for a, b in zip(model.shards[1], model.shards[-1]))
    assert stopper.checkpoint_path is not None and os.path.exists(stopper.checkpoint_path)


def case_recipe(out: Path) -> None:
    callbacks = recipe(early_stopping="val_loss", patience=5)
    doctor = next(cb for cb in callbacks if isinstance(cb, TrainingDoctor))
    doctor.out_dir = str(out)  # (the Trainer has no logger: without it, no file)
    t = trainer(out, max_epochs=3, callbacks=callbacks, log_every_n_steps=4)
    t.fit(ShardedNet(), data(), data(32))
    assert len(doctor.history) == 3 and all(math.isfinite(e.step_loss_mean) for e in doctor.history)
    t.strategy.barrier()  # rank 0 has written its report
    reports = sorted(p.name for p in out.iterdir() if p.name.startswith("doctor_report"))
    assert reports == ["doctor_report.json", "doctor_report.md"]  # one report, written by rank 0
    assert json.loads((out / "doctor_report.json").read_text())["history"]
    assert "grad/norm" in t.callback_metrics


class DocsMeshNet(ShardedNet):
    """FSDP2 as Lightning's docs write it: ``self.device_mesh["data_parallel"]`` looked up for every layer (a new
    sub-mesh object per lookup, all over the same ranks)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        for layer in self.net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=self.device_mesh["data_parallel"])
        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])


def case_docs_mesh(out: Path) -> None:
    """Regression: GradientMonitor refused ("sharded in 2 different ways"): it compared meshes by identity."""
    ref, mon, rec = FullNorm(), GradientMonitor(log_every_n_steps=1), MetricsRecorder()
    t = trainer(out, max_steps=4, callbacks=[*recipe(early_stopping=None, doctor=False, monitor=False), ref, mon],
                logger=rec)
    t.fit(DocsMeshNet(), data())
    assert len(rec.history()) == len(ref.norms) == 4
    for m, r in zip(rec.history(), ref.norms):
        assert abs(m["grad/norm"] - r) <= 1e-5 * max(1.0, r)


def case_schedule_and_mixing(out: Path) -> None:
    lrs: list[float] = []

    class Lr(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt: Any) -> None:
            lrs.append(opt.param_groups[0]["lr"])

    mix = Mixup(alpha=1.0)
    t = trainer(out, max_epochs=2, callbacks=[WarmupCosine(warmup=2), LabelSmoothing(0.1), mix, Lr()])
    t.fit(ShardedNet(lr=0.01), data(64))
    from lightning_tricks.functional import warmup_cosine

    assert len(lrs) == 8
    assert all(abs(lr - 0.01 * warmup_cosine(s, total_steps=8, warmup_steps=2)) < 1e-12 for s, lr in enumerate(lrs))
    assert mix.batches_seen == 8 and mix.last_draw is not None
    lams = gathered(t, [float(mix.last_draw[0])])
    assert lams[0] != lams[1]  # one random stream per rank


def case_distillation(out: Path) -> None:
    torch.manual_seed(5)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    distil = Distillation(teacher, temperature=2.0, alpha=0.5)
    t = trainer(out, max_steps=4, callbacks=[distil, Mixup(alpha=0.4)])
    t.fit(ShardedNet(), data())
    assert not isinstance(teacher[1].weight, DTensor)  # the teacher is a full copy on every rank
    assert {"distill/soft", "distill/hard"} <= set(t.callback_metrics)


class LocalShards(pl.Callback):
    """Each rank's local shards after every optimizer step (before EMA's hook: put it first)."""

    def __init__(self) -> None:
        self.after_step: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.after_step.append([p.to_local().detach().clone().double() for p in pl_module.parameters()])


def case_ema(out: Path) -> None:
    shards, ema = LocalShards(), EMA(decay=0.8, warmup=False)
    model = ShardedNet()
    t = trainer(out, max_steps=6, callbacks=[shards, ema])
    t.fit(model, data())
    want = [s.clone() for s in shards.after_step[0]]
    for step in shards.after_step[1:]:
        want = [0.8 * w + 0.2 * s for w, s in zip(want, step)]
    now = [p.to_local().double() for p in model.parameters()]  # the average is left in the module at the end
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(now, want))
    assert isinstance(next(iter(model.parameters())), DTensor)


class EpochEndShards(pl.Callback):
    def __init__(self) -> None:
        self.ends: list[list[torch.Tensor]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ends.append([p.to_local().detach().clone().double() for p in pl_module.parameters()])


def case_swa(out: Path) -> None:
    ends, swa = EpochEndShards(), SWA(start=1)
    model = ShardedNet()
    trainer(out, max_epochs=4, callbacks=[ends, swa]).fit(model, data(64))
    want = [torch.stack(parts).mean(0) for parts in zip(*ends.ends[1:])]
    now = [p.to_local().double() for p in model.parameters()]
    assert swa.updates == 3 and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(now, want))


class KeptState(pl.Callback):
    """Each rank's shards of the EMA and SWA averages and of EarlyStopping's best weights: at every checkpoint save
    (``saved``, by step), right after a resume's restore (``restored``), and at the end of training (``final``).
    Put it after those callbacks."""

    def __init__(self) -> None:
        self.saved: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        self.restored: dict[str, dict[str, torch.Tensor]] | None = None
        self.final: dict[str, dict[str, torch.Tensor]] = {}

    @staticmethod
    def take(trainer: pl.Trainer) -> dict[str, dict[str, torch.Tensor]]:
        """Whole tensors (every rank's shards gathered, laid out as the module's): a collective call."""
        like = trainer.lightning_module.state_dict()

        def whole(key: str, shard: torch.Tensor) -> torch.Tensor:
            ref = like[key]
            if not isinstance(ref, DTensor):
                return shard.detach().clone()
            return DTensor.from_local(shard.to(ref.device), ref.device_mesh, ref.placements, run_check=False,
                                      shape=ref.shape, stride=ref.stride()).full_tensor().clone()

        out: dict[str, dict[str, torch.Tensor]] = {}
        for cb in trainer.callbacks:
            if isinstance(cb, (EMA, SWA)) and cb.has_average:
                out[type(cb).__name__] = {k: whole(k, v) for k, v in cb.averaged_state_dict().items()
                                          if v.is_floating_point()}
            elif isinstance(cb, EarlyStopping) and cb.best_weights is not None:
                out["EarlyStopping"] = {k: whole(k, v) for k, v in cb.best_weights.items()}
        return out

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Any) -> None:
        self.saved[trainer.global_step] = self.take(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.restored = self.take(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.final = self.take(trainer)


def kept(out: Path, epochs: int, ckpt: str | None = None, every_n_train_steps: int | None = None) -> KeptState:
    """EMA, SWA and EarlyStopping's best weights under FSDP2, with checkpoints per epoch (or every n steps)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1, filename="{step}",
                            every_n_train_steps=every_n_train_steps, every_n_epochs=None if every_n_train_steps else 1)
    state = KeptState()
    callbacks = [EMA(0.9, evaluate_with_ema=False, keep_ema_at_end=False), SWA(start=1, keep_swa_at_end=False),
                 EarlyStopping("val_loss", patience=10, restore_best_weights=True, checkpoint_on_stop=False),
                 saver, state]
    t = trainer(out, max_epochs=epochs, enable_checkpointing=True, callbacks=callbacks)
    t.fit(ShardedNet(), data(64), data(32, seed=1), ckpt_path=ckpt)
    return state


def same(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert a.keys() == b.keys() == {"EMA", "SWA", "EarlyStopping"}, (a.keys(), b.keys())
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            x, y = a[name][key].double(), b[name][key].double()
            assert torch.allclose(x, y, atol=1e-6), (name, key, float((x - y).abs().max()))


def case_resume_keeps_callback_state(out: Path) -> None:
    """From an end-of-epoch checkpoint, the resumed run ends with the uninterrupted run's EMA and SWA averages and
    best weights; from a mid-epoch one, each callback's state right after loading is the state that was saved."""
    full = kept(out / "full", epochs=4)
    steps = sorted(full.saved)
    assert len(steps) == 4  # one folder per epoch, each holding the callbacks' shards
    resumed = kept(out / "resumed", epochs=4, ckpt=str(out / "full" / "ckpt" / f"step={steps[1]}.ckpt"))
    assert resumed.restored is not None
    same(resumed.restored, full.saved[steps[1]])
    same(resumed.final, full.final)
    # 4 batches an epoch per rank: step 11 is in epoch 2, after SWA's first update (the end of epoch 1)
    mid = kept(out / "mid", epochs=3, every_n_train_steps=11)
    again = kept(out / "mid_resumed", epochs=3, ckpt=str(out / "mid" / "ckpt" / "step=11.ckpt"),
                 every_n_train_steps=11)
    assert again.restored is not None
    same(again.restored, mid.saved[11])
    if dist.get_rank() == 0:  # for the reshard case: what the 2-process run saved at the end of epoch 1
        torch.save({"path": str(out / "full" / "ckpt" / f"step={steps[1]}.ckpt"), "state": full.saved[steps[1]]},
                   out.parent / "written_by_2.pt")


def case_reshard_read(out: Path) -> None:
    """Run with FSDP2_DEVICES=1 after case_resume_keeps_callback_state: the checkpoint that 2 processes wrote is
    read by 1; each callback's state after loading equals what was saved (resharded by the distributed checkpoint)."""
    written = torch.load(out.parent / "written_by_2.pt", weights_only=False)
    resumed = kept(out / "resumed", epochs=3, ckpt=written["path"])
    assert resumed.restored is not None
    same(resumed.restored, written["state"])


def case_lr_find(out: Path) -> None:
    from lightning_tricks.tuning import lr_find

    model = ShardedNet()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = lr_find(model, data(256), num_steps=12, min_lr=1e-4, max_lr=1e-1, divergence=1e9,
                     callbacks=[LabelSmoothing(0.1)], accelerator="cpu", devices=2, default_root_dir=str(out),
                     strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                                    timeout=timedelta(seconds=90)))
    assert len(result.losses) == 12
    for key, value in model.state_dict().items():  # sharded by the sweep's fit; restored shard by shard
        assert torch.equal(value.full_tensor(), before[key]), key
    both = torch.distributed.all_gather_object  # the same (rank-averaged) curve on every rank
    curves: list[Any] = [None, None]
    both(curves, result.losses)
    assert curves[0] == curves[1]


class PhaseCheck(pl.Callback):
    """Local shards of each layer at the end of every epoch, and the lr at the start."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.states.append({k: v.to_local().clone() for k, v in pl_module.state_dict().items()})

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states.append({k: v.to_local().clone() for k, v in pl_module.state_dict().items()})


def case_finetune_and_scaling(out: Path) -> None:
    from lightning_tricks import Finetune, LRScaling

    check = PhaseCheck()
    scaling = LRScaling(base_batch_size=8)
    t = trainer(out, max_epochs=3, callbacks=[Finetune(["net.0", "net.3"], 1, unfreeze_every=1), scaling, check])
    t.fit(ShardedNet(lr=0.02), data())
    assert scaling.effective_batch_size == 16 and math.isclose(check.lr, 0.04)  # 8 per rank x 2 ranks
    s = check.states
    trained = [[not torch.equal(s[e][f"net.{i}.weight"], s[e + 1][f"net.{i}.weight"]) for i in (0, 3, 5)]
               for e in range(3)]
    assert trained == [[False, False, True], [False, True, True], [True, True, True]], trained


class SGDSharded(ShardedNet):
    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def case_l1(out: Path) -> None:
    from lightning_tricks import L1
    from lightning_tricks.functional import elastic_net_prox_

    # proximal: each rank shrinks its own shards with the formula, no collective; biases untouched
    model = SGDSharded(lr=0.1)
    l1 = L1(0.02, 0.01)
    t = trainer(out, max_steps=3, log_every_n_steps=1, callbacks=[l1])
    t.fit(model, data())
    weights = [m.weight for m in model.net if hasattr(m, "weight")]
    zeros = sum(int((w.to_local() == 0).sum()) for w in weights)
    assert zeros > 0 and l1.sparsity == zeros / sum(w.to_local().numel() for w in weights)
    shard = torch.tensor([0.5, -0.001, 0.003])
    elastic_net_prox_([shard], 0.1, 0.02, 0.01)
    assert torch.allclose(shard, torch.tensor([0.498 / 1.002, 0.0, 0.001 / 1.002]))
    # loss: each rank adds the penalty of its own shards; one SGD step with it differs from one without by exactly
    # -lr * l1 * sign(w) on every penalised weight (the data gradient, averaged over ranks, is the same in both)
    after = []
    for callbacks in ([], [L1(0.5, mode="loss")]):
        pl.seed_everything(0, verbose=False)
        model = SGDSharded(lr=0.1)
        check = PhaseCheck()
        trainer(out, max_steps=1, callbacks=[*callbacks, check]).fit(model, data())
        after.append({k: v.to_local() for k, v in model.state_dict().items()})
    start = check.states[0]
    for key in after[0]:
        expected = -0.1 * 0.5 * start[key].sign() if key.endswith("weight") else torch.zeros_like(start[key])
        assert torch.allclose(after[1][key] - after[0][key], expected, atol=1e-6), key


class InitNet(ShardedNet):
    """A wide layer initialised by init_weights in configure_model, before fully_shard."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 1024), nn.ReLU(),
                                 nn.Linear(1024, 4))

    def configure_model(self) -> None:
        from lightning_tricks import init_weights

        init_weights(self.net)
        super().configure_model()


class InitCheck(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wide = pl_module.net[5].weight.full_tensor()  # fan_out 4: std sqrt(2 / 4)
        assert abs(float(wide.std()) / math.sqrt(2 / 4) - 1) < 0.05, float(wide.std())
        assert float(pl_module.net[3].bias.full_tensor().abs().sum()) == 0.0
        both: list[Any] = [None, None]
        dist.all_gather_object(both, wide.sum().item())
        assert both[0] == both[1]  # every rank sees the same whole parameter


def case_init_weights(out: Path) -> None:
    trainer(out, max_steps=1, callbacks=[InitCheck()]).fit(InitNet(), data())



def case_average_as_weights_refused(out: Path) -> None:
    """A distributed checkpoint cannot hold the average as the module's weights: a clear error before training."""
    try:
        trainer(out, max_steps=2, callbacks=[EMA(checkpoint_weights="average")]).fit(ShardedNet(), data())
    except ValueError as error:
        assert "save_distributed_checkpoint=False" in str(error), error
    else:
        raise AssertionError("EMA(checkpoint_weights='average') trained under a distributed checkpoint")


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}

if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    names = sys.argv[2:] or list(CASES)
    for name in names:
        case_dir = out_dir / name
        case_dir.mkdir(parents=True, exist_ok=True)
        pl.seed_everything(0, verbose=False)
        CASES[name](case_dir)
        rank = dist.get_rank() if dist.is_initialized() else 0
        (out_dir / f"{name}.rank{rank}.ok").write_text("ok")
        print(f"fsdp2 case {name}: ok on rank {rank}", flush=True)
