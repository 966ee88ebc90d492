"""Every callback and ``recipe()`` under FSDP2 (``ModelParallelStrategy`` + ``fully_shard``), 2 CPU processes, gloo.

``ModelParallelStrategy`` starts rank 1 by re-executing the running script, so the cases live in
``tests/fsdp2_script.py`` and run in a subprocess; their assertions run inside both ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("monitor", "monitor_nan", "early_stopping", "recipe", "schedule_and_mixing", "distillation", "ema", "swa",
         "lr_find", "finetune_and_scaling", "l1", "init_weights", "docs_mesh")


def test_every_callback_under_fsdp2(tmp_path: Path) -> None:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "fsdp2_script.py"), str(tmp_path), *CASES],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, log
    missing = [f"{case}.rank{rank}" for case in CASES for rank in (0, 1)
               if not (tmp_path / f"{case}.rank{rank}.ok").exists()]
    assert not missing, f"cases that did not pass on a rank: {missing}\n{log}"
