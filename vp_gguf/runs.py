"""Helpers for long runs (benchmarks, eval, the testbed): a progress line, JSONL reading,
resumable result logs and a lock on an output folder."""

from __future__ import annotations

import fcntl
import json
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from typing_extensions import Self

from .errors import VPGGUFError


class Progress:
    """Items done of a total, what runs now and an ETA, as one line on stderr (tqdm): benchmarks and
    evaluations take minutes. ``at(total, ...)`` ends the line; so does leaving a ``with`` block."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, disable=not enabled, file=sys.stderr, unit="item", dynamic_ncols=True)

    def at(self, done: int, label: str) -> None:
        """``done`` items finished; ``label``: the one running now (or "done")."""
        self._bar.set_postfix_str(label[:34], refresh=False)
        self._bar.update(done - self._bar.n)
        if done >= (self._bar.total or 0):
            self.close()

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for every non-empty line; a bad line is a ValueError naming it."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e})") from None


def read_log(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, row) for every row of an append-only JSONL log, which is left ready to append to.

    A crash while a row was being written leaves a torn last line: it is cut off the file (with a
    note on stderr), so that resuming loses only that row. A bad line anywhere else is not a crash's
    doing: a ValueError names the file and the line. A last row without its newline gets one."""
    path = Path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    rows, end = [], 0  # end: the byte offset just past the last good line
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                if any(rest.strip() for rest in lines[n:]):
                    raise ValueError(f"{path}:{n}: not JSON ({e}); fix or delete that line to resume") from None
                print(f"{path}:{n}: a torn last line (an interrupted write) was dropped", file=sys.stderr)
                with open(path, "r+b") as f:
                    f.truncate(end)
                return rows
        end += len(line) + 1
    if data and not data.endswith(b"\n"):
        with open(path, "ab") as f:
            f.write(b"\n")
    return rows


class FolderBusyError(VPGGUFError):
    """Another process or thread holds the folder's lock (another run writes there)."""


_held: dict[Path, int] = {}  # folder -> the thread that holds its lock (a nested lock_folder is a no-op)


@contextmanager
def lock_folder(folder: str | Path, what: str = "run") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (a ``.lock`` file in it) for the ``with`` block, or raise
    FolderBusyError at once: two runs appending to one results file would interleave their rows.
    The lock is the kernel's (flock): a process that dies releases it, nothing stale is left to clear.
    The thread that holds it may take it again (a command that locks around a library call that locks)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if _held.get(key) == threading.get_ident():
        yield folder
        return
    busy = FolderBusyError(
        f"{folder}: another {what} is writing to this folder; wait for it to finish or choose another folder"
    )
    if key in _held:
        raise busy
    with open(folder / ".lock", "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy from None
        _held[key] = threading.get_ident()
        try:
            yield folder
        finally:
            del _held[key]  # and closing the file releases the lock
