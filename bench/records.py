"""What the benchmarks write: JSON lines appended to a record, and a figure's median and range."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def spread(values: Sequence[float], digits: int = 3) -> dict[str, float]:
    """The median and range of repeated runs (never the best run alone)."""
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def append_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Add one JSON line per row to `path`, its folder made if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
