"""The doctor's findings and its report: their order, the Markdown and the files."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from lightning_tricks.diagnosis import RULES, SEVERITIES, EpochRecord

__all__ = ["Finding", "fmt", "ordered", "render", "write"]

_ORDER = {code: i for i, code in enumerate(
    ["overfit_check_failed", "nonfinite_data", "nonfinite_loss", *(name for name, _ in RULES[1:]), "unknown",
     "ended_in_warmup", "overfit_check_passed", "too_short", "healthy"])}


@dataclass
class Finding:
    """One diagnosis: what, how bad, the numbers behind it and what to do next."""

    code: str
    severity: str
    title: str
    evidence: dict[str, Any]
    advice: list[str]
    epoch: int
    step: int

    def markdown(self) -> str:
        ev = ", ".join(f"{k} = {fmt(v)}" for k, v in self.evidence.items())
        tips = "".join(f"\n    - {a}" for a in self.advice)
        return f"- **{self.severity.upper()}** [{self.code}] {self.title} (epoch {self.epoch}, step {self.step})\n" \
               f"  - evidence: {ev}\n  - next:{tips}"


def fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def ordered(findings: list[Finding]) -> list[Finding]:
    """Errors, then warnings, then information, each by the rules' priority (the first is the verdict)."""
    rank = {s: i for i, s in enumerate(reversed(SEVERITIES))}
    return sorted(findings, key=lambda f: (rank[f.severity], _ORDER.get(f.code, len(_ORDER))))


def render(findings: list[Finding]) -> str:
    """The findings as Markdown, in report order."""
    lines = ["## TrainingDoctor report", ""]
    lines += [f.markdown() for f in ordered(findings)] or ["(nothing)"]
    return "\n".join(lines)


def write(folder: str, findings: list[Finding], history: list[EpochRecord]) -> list[str]:
    """Write ``doctor_report.md`` and ``doctor_report.json`` (the findings and the per-epoch history) to ``folder``;
    return their paths."""
    os.makedirs(folder, exist_ok=True)
    md, js = os.path.join(folder, "doctor_report.md"), os.path.join(folder, "doctor_report.json")
    with open(md, "w") as f:
        f.write(render(findings) + "\n")
    with open(js, "w") as f:
        json.dump({"findings": [asdict(x) for x in findings], "history": [asdict(e) for e in history]}, f, indent=1,
                  default=str)
    return [md, js]
