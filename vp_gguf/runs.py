"""Helpers for long runs (benchmarks, eval, the testbed): a one-line progress bar, JSONL reading."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def progress(i: int, n: int, t0: float, label: str) -> None:
    """A one-line progress bar with an ETA on stderr (benchmarks and evaluations take minutes)."""
    done = int(30 * i / max(n, 1))
    eta = (time.time() - t0) / max(i, 1) * (n - i)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {i}/{n} {label[:34]:<34} eta {eta:5.0f}s")
    if i == n:
        sys.stderr.write("\n")
    sys.stderr.flush()


def jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for every non-empty line; a bad line is a ValueError naming it."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e})") from None
