"""Every callback and ``recipe()`` under FSDP2 (``ModelParallelStrategy`` + ``fully_shard``), 2 CPU processes, gloo.

``ModelParallelStrategy`` starts rank 1 by re-executing the running script, so the cases live in
``tests/fsdp2_script.py`` and run in one subprocess (shared by the tests below); their assertions run inside both
ranks, and each test checks that its case passed on both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = ("monitor", "monitor_nan", "early_stopping", "recipe", "schedule_and_mixing", "distillation", "ema", "swa",
         "lr_find", "finetune_and_scaling", "l1", "init_weights", "docs_mesh", "resume_keeps_callback_state",
         "average_as_weights_refused")


def run_cases(out: Path, cases: tuple[str, ...], devices: int = 2) -> str:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "FSDP2_DEVICES": str(devices)}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "fsdp2_script.py"), str(out), *cases],
                          cwd=out, env=env, capture_output=True, text=True, timeout=900)
    return (done.stdout + done.stderr)[-6000:]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("fsdp2")
    return out, run_cases(out, CASES)


@pytest.mark.parametrize("case", CASES)
def test_under_fsdp2(case: str, two_processes: tuple[Path, str]) -> None:
    out, log = two_processes
    missing = [rank for rank in (0, 1) if not (out / f"{case}.rank{rank}.ok").exists()]
    assert not missing, f"case {case} did not pass on ranks {missing}\n{log}"


def test_a_checkpoint_written_by_2_processes_is_read_by_1(two_processes: tuple[Path, str]) -> None:
    """The callbacks' shards are resharded by the distributed checkpoint: EMA, SWA and the best weights read by one
    process equal what two wrote."""
    out, _ = two_processes
    if not (out / "written_by_2.pt").exists():
        pytest.fail("the 2-process case resume_keeps_callback_state did not write its checkpoint")
    log = run_cases(out, ("reshard_read",), devices=1)
    assert (out / "reshard_read.rank0.ok").exists(), log
