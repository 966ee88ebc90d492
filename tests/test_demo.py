"""`lightning-tricks demo --fast` prints the comparison table and writes its plots and figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_demo_fast_writes_table_plots_and_figures(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "lightning_tricks", "demo", "--fast", "--distill", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test acc %" in proc.stdout and "baseline" in proc.stdout and "recipe" in proc.stdout
    assert "Tip:" not in proc.stdout + proc.stderr and "GPU available" not in proc.stdout + proc.stderr
    assert "━" not in proc.stdout  # no progress bars when the output is not a terminal
    for name in ("accuracy.png", "lr.png", "loss.png", "grad_norms.png", "results.csv", "results.json"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert {r["config"] for r in results} == {"baseline", "recipe", "distilled"}
    assert "teacher test accuracy" in proc.stdout
    assert "TrainingDoctor report" in proc.stdout  # the demo prints the doctor's report
    assert (out / "recipe_seed0" / "doctor_report.md").exists()  # and writes it next to the run
    recipe = next(r for r in results if r["config"] == "recipe")
    baseline = next(r for r in results if r["config"] == "baseline")
    assert len(recipe["lr"]) == 10  # 2 epochs x 5 batches: one lr per optimizer step
    assert recipe["lr"][0] < recipe["lr"][1]  # warming up
    assert len(set(baseline["lr"])) == 1  # the baseline keeps its lr
    assert all(0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["best_val_acc"] <= 1.0 for r in results)
    assert any(k.startswith("grad/norm/") for e in recipe["epochs"] for k in e)  # the grad-norm plot has data


def test_demo_arguments_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_tricks.cli import main

    for argv, message in ((["--fast", "--epochs", "3"], "--fast runs 2 epochs of 5 batches: drop --epochs"),
                          (["--batch-size", "0"], "--batch-size: must be an integer >= 1, got 0"),
                          (["--epochs", "0"], "--epochs: must be an integer >= 1, got 0"),
                          (["--ema", "1.5"], "--ema must be a decay in [0, 1), got 1.5")):
        with pytest.raises(SystemExit) as stop:
            main(["demo", *argv])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("lightning-tricks ")
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    helptext = capsys.readouterr().out
    assert "``" not in helptext and "--jobs" in helptext
