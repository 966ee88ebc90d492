"""Writing a benchmark's table into docs/results.md, between the markers that name it."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results.md"


def write_block(name: str, body: str, heading: str) -> Path:
    """Replace the text between ``<!-- name -->`` and ``<!-- /name -->`` in docs/results.md by ``body`` (or append it
    under ``heading`` the first time)."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n{body}\n{end}"
    text = RESULTS.read_text()
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text += f"\n## {heading}\n\n{block}\n"
    RESULTS.write_text(text)
    return RESULTS


def percent_spread(values: list[float]) -> str:
    """Fractions as ``mean ± std`` in percent, over seeds (one value: the value alone)."""
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"
