"""Routing of llama.cpp / libmtmd logs.

Quiet by default; with verbose=True they go to stderr. Either way the recent
errors are kept so that exceptions can say what the C side said.
"""

from __future__ import annotations

import collections
import sys
import threading

from ._libs import llama_cpp as L
from ._libs import mtmd_cpp as M

_LEVEL_ERROR, _LEVEL_CONT = 4, 5
_recent: collections.deque[str] = collections.deque(maxlen=16)
_lock = threading.Lock()
_verbose = False
_last_level = 0


@L.llama_log_callback
def _callback(level: int, text: bytes, user_data) -> None:
    global _last_level
    msg = text.decode("utf-8", errors="replace") if text else ""
    if level == _LEVEL_CONT:
        level = _last_level
    else:
        _last_level = level
    if level == _LEVEL_ERROR and msg.strip():
        with _lock:
            _recent.append(msg.strip())
    if _verbose:
        sys.stderr.write(msg)


def install(verbose: bool) -> None:
    """(Re)install our log callback for libllama, ggml and libmtmd."""
    global _verbose
    _verbose = verbose
    L.llama_log_set(_callback, None)
    M.mtmd_helper_log_set(_callback, None)


def clear() -> None:
    with _lock:
        _recent.clear()


def last_error() -> str:
    """The most recent errors from the C side, joined (empty if none)."""
    with _lock:
        msgs = list(_recent)[-3:]
        _recent.clear()
    return " | ".join(msgs)
