"""What EMA, SWA and EarlyStopping keep across a resume, under DDP and from old checkpoints (FSDP2: see
tests/fsdp2_script.py's case resume_keeps_callback_state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tricks import EMA, SWA, EarlyStopping
from tests.conftest import TinyNet, loader, quiet_trainer


class SaveFinal(pl.Callback):
    """Rank 0 writes the final EMA and SWA averages and the best weights to a file (DDP children's callbacks do not
    come back to the main process)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            ema, swa, stop = (next(c for c in trainer.callbacks if isinstance(c, k)) for k in (EMA, SWA, EarlyStopping))
            torch.save({"EMA": ema.averaged_state_dict(), "SWA": swa.averaged_state_dict(),
                        "EarlyStopping": dict(stop.best_weights)}, self.path)


class SaveState(pl.Callback):
    """Rank 0 writes the callbacks' state at each checkpoint save (`saved-<step>.pt`) and right after a resume's
    restore (`restored.pt`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _write(self, trainer: pl.Trainer, name: str) -> None:
        if trainer.is_global_zero:
            ema, swa, stop = (next(c for c in trainer.callbacks if isinstance(c, k)) for k in (EMA, SWA, EarlyStopping))
            state = {"EMA": ema.averaged_state_dict() if ema.has_average else None,
                     "SWA": swa.averaged_state_dict() if swa.has_average else None,
                     "EarlyStopping": None if stop.best_weights is None else dict(stop.best_weights)}
            torch.save(state, self.folder / name)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Any) -> None:
        self._write(trainer, f"saved-{trainer.global_step}.pt")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step:
            self._write(trainer, "restored.pt")


def fit(root: Path, result: Path, ckpt: str | None = None, every_n_train_steps: int | None = None) -> None:
    pl.seed_everything(0, verbose=False)
    root.mkdir(parents=True, exist_ok=True)
    saver = ModelCheckpoint(dirpath=root / "ckpt", filename="{step}", save_top_k=-1,
                            every_n_train_steps=every_n_train_steps, every_n_epochs=None if every_n_train_steps else 1)
    callbacks = [EMA(0.9, evaluate_with_ema=False, keep_ema_at_end=False), SWA(start=1, keep_swa_at_end=False),
                 EarlyStopping("val_loss", patience=10, restore_best_weights=True, checkpoint_on_stop=False),
                 SaveFinal(result), SaveState(root), saver]
    trainer = quiet_trainer(devices=2, strategy="ddp_fork", max_epochs=4, enable_checkpointing=True,
                            default_root_dir=root, callbacks=callbacks)
    trainer.fit(TinyNet(), loader(64, 8), loader(32, 8, seed=1), ckpt_path=ckpt)


def test_ddp_resume_ends_with_the_uninterrupted_state(tmp_path: Path) -> None:
    fit(tmp_path / "full", tmp_path / "full.pt")
    fit(tmp_path / "resumed", tmp_path / "resumed.pt", ckpt=str(tmp_path / "full" / "ckpt" / "step=8.ckpt"))
    full, resumed = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "resumed.pt")
    for name in ("EMA", "SWA", "EarlyStopping"):
        assert full[name].keys() == resumed[name].keys()
        for key, value in full[name].items():
            assert torch.allclose(resumed[name][key].float(), value.float(), atol=1e-6), (name, key)


def test_ddp_mid_epoch_resume_restores_the_saved_state(tmp_path: Path) -> None:
    """4 batches an epoch per rank: step 10 is mid-epoch 2, after SWA's first average (the end of epoch 1)."""
    fit(tmp_path / "run", tmp_path / "run.pt", every_n_train_steps=10)
    fit(tmp_path / "again", tmp_path / "again.pt", ckpt=str(tmp_path / "run" / "ckpt" / "step=10.ckpt"),
        every_n_train_steps=10)
    saved, restored = torch.load(tmp_path / "run" / "saved-10.pt"), torch.load(tmp_path / "again" / "restored.pt")
    for name in ("EMA", "SWA", "EarlyStopping"):
        assert saved[name] is not None and saved[name].keys() == restored[name].keys()
        for key, value in saved[name].items():
            assert torch.allclose(restored[name][key].float(), value.float(), atol=1e-6), (name, key)


@pytest.mark.parametrize("cls", [EMA, SWA])
def test_an_old_checkpoint_without_the_average_says_what_restarts(cls: Any) -> None:
    callback = cls()
    with pytest.warns(UserWarning, match=rf"{cls.__name__}: the checkpoint holds no average.*restarts"):
        callback.load_state_dict({"updates": 12})
    assert callback.updates == 0


def test_the_average_is_a_copy() -> None:
    """averaged_state_dict() gives copies: holding on to them is safe while the average moves on."""
    ema = EMA(0.5, warmup=False)
    trainer = quiet_trainer(max_steps=2, callbacks=[ema])
    trainer.fit(TinyNet(), loader())
    first = ema.averaged_state_dict()
    with torch.no_grad():
        trainer.lightning_module.head.weight.add_(1.0)  # new weights, then one more update moves the average
    ema.update(trainer.lightning_module)
    assert not torch.equal(first["head.weight"], ema.averaged_state_dict()["head.weight"])
