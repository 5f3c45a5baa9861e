"""ctypes mirror of cpp/include/llama-visionpulse.h (our additions to libllama).

Like llama-cpp-python's own layer: plain structs and functions, bound from the
libllama that llama_cpp already loaded (one copy per process).
"""

from __future__ import annotations

from collections.abc import Sequence
from ctypes import (
    POINTER,
    Structure,
    byref,
    c_bool,
    c_char_p,
    c_float,
    c_int,
    c_int32,
    c_int64,
    c_uint32,
    c_void_p,
    create_string_buffer,
)

from ._libs import llama_cpp as L

_lib = L._lib

LLAMA_VP_MODE_NONE = -1
LLAMA_VP_MODE_DENSE = 0
LLAMA_VP_MODE_DYNAMIC = 1
LLAMA_VP_MODE_FIXED = 2
LLAMA_VP_MODE_RANDOM = 3
LLAMA_VP_MODE_STATIC = 4
LLAMA_VP_MODE_FORCED = 5

LLAMA_VP_ATTN_AUTO = 0
LLAMA_VP_ATTN_MASK = 1
LLAMA_VP_ATTN_GATHER = 2

LLAMA_VP_QUEST_OFF = 0
LLAMA_VP_QUEST_BOUND = 1
LLAMA_VP_QUEST_RANDOM = 2


class llama_vp_params(Structure):
    _fields_ = [
        ("mode", c_int),  # enum llama_vp_mode
        ("attn", c_int),  # enum llama_vp_attn
        ("anchor_layer", c_int32),
        ("first_pruned_layer", c_int32),
        ("tau", c_float),
        ("budget_min", c_float),
        ("budget_max", c_float),
        ("ratio", c_float),
        ("seed", c_uint32),
        ("prune_anchor", c_bool),
        ("auto_mark", c_bool),
        ("lagged", c_bool),
        ("prune_swa", c_bool),
        ("min_pruned_layers", c_int32),
        ("quest", c_int),  # enum llama_vp_quest
        ("quest_page", c_int32),
        ("quest_first_layer", c_int32),
        ("quest_budget_min", c_float),
        ("quest_budget_max", c_float),
    ]


class llama_vp_stats(Structure):
    _fields_ = [
        ("step", c_int64),
        ("n_kv", c_int32),
        ("n_visual", c_int32),
        ("n_kept", c_int32),
        ("mass", c_float),
        ("mass_kept", c_float),
        ("skipped", c_int32),
    ]


class llama_vp_quest_stats(Structure):
    _fields_ = [
        ("n_layers", c_int32),
        ("n_pages", c_int32),
        ("n_kept", c_int32),
        ("n_refreshed", c_int32),
        ("page", c_int32),
    ]


def _bind(name: str, argtypes: list, restype):
    f = getattr(_lib, name)
    f.argtypes, f.restype = argtypes, restype
    return f


_ctx = c_void_p
llama_vp_default_params = _bind("llama_vp_default_params", [], llama_vp_params)
llama_vp_preset_params = _bind("llama_vp_preset_params", [c_int32], llama_vp_params)
llama_vp_enable = _bind("llama_vp_enable", [_ctx, POINTER(llama_vp_params)], c_int32)
llama_vp_check_params = _bind("llama_vp_check_params", [POINTER(llama_vp_params)], c_int32)
llama_vp_disable = _bind("llama_vp_disable", [_ctx], None)
llama_vp_enabled = _bind("llama_vp_enabled", [_ctx], c_bool)
llama_vp_anchor_layer = _bind("llama_vp_anchor_layer", [_ctx], c_int32)
llama_vp_last_error = _bind("llama_vp_last_error", [], c_char_p)
llama_vp_last_attn = _bind("llama_vp_last_attn", [_ctx], c_int32)
llama_vp_last_probe = _bind("llama_vp_last_probe", [_ctx], c_int32)
llama_vp_skip_reason = _bind("llama_vp_skip_reason", [_ctx], c_char_p)
llama_vp_mark_visual = _bind("llama_vp_mark_visual", [_ctx, c_int32, c_int32, c_int32], c_int32)
llama_vp_clear_marks = _bind("llama_vp_clear_marks", [_ctx, c_int32], c_int32)
llama_vp_n_visual = _bind("llama_vp_n_visual", [_ctx, c_int32], c_int32)
llama_vp_set_forced = _bind("llama_vp_set_forced", [_ctx, c_int32, POINTER(c_int32), c_int32], c_int32)
llama_vp_get_stats = _bind("llama_vp_get_stats", [_ctx, c_int32, POINTER(llama_vp_stats)], c_int32)
llama_vp_get_quest_stats = _bind("llama_vp_get_quest_stats", [_ctx, c_int32, POINTER(llama_vp_quest_stats)], c_int32)
llama_vp_set_quest_pages = _bind("llama_vp_set_quest_pages", [_ctx, c_int32, POINTER(c_int32), c_int32], c_int32)
llama_vp_get_kept = _bind("llama_vp_get_kept", [_ctx, c_int32, POINTER(c_int32), c_int32], c_int32)
llama_vp_reset = _bind("llama_vp_reset", [_ctx, c_int32], None)
llama_vp_begin_generation = _bind("llama_vp_begin_generation", [_ctx, c_int32], None)
llama_vp_set_k = _bind("llama_vp_set_k", [_ctx, c_int32, c_int32], c_int32)
llama_vp_trace_backends = _bind("llama_vp_trace_backends", [_ctx, c_bool], None)
llama_vp_op_backends = _bind("llama_vp_op_backends", [_ctx, c_char_p, c_int32], c_int32)


def get_kept(ctx, seq: int) -> list[int]:
    n = llama_vp_get_kept(ctx, seq, None, 0)
    buf = (c_int32 * max(n, 1))()
    n = llama_vp_get_kept(ctx, seq, buf, len(buf))
    return list(buf[:n])


def op_backends(ctx) -> dict[str, dict[str, int]]:
    """The last traced step: op -> backend -> how many of the op it ran (llama_vp_trace_backends)."""
    n = llama_vp_op_backends(ctx, None, 0)
    buf = create_string_buffer(max(n, 0) + 1)
    llama_vp_op_backends(ctx, buf, len(buf))
    out: dict[str, dict[str, int]] = {}
    for line in buf.value.decode().splitlines():
        op, count, backend = line.split(" ", 2)  # a backend's name may hold spaces
        out.setdefault(op, {})[backend] = int(count)
    return out


def set_forced(ctx, seq: int, ordinals: Sequence[int]) -> None:
    """FORCED mode's kept ordinals for seq."""
    arr = (c_int32 * max(1, len(ordinals)))(*ordinals)
    if llama_vp_set_forced(ctx, seq, arr, len(ordinals)) != 0:
        raise ValueError(f"VisionPulse: {last_error()}")


def set_quest_pages(ctx, seq: int, pages: Sequence[int]) -> None:
    """Quest's kept candidate pages for seq, in every Quest layer and KV head (empty: the bounds choose)."""
    arr = (c_int32 * max(1, len(pages)))(*pages)
    if llama_vp_set_quest_pages(ctx, seq, arr, len(pages)) != 0:
        raise ValueError(f"VisionPulse: {last_error()}")


def quest_stats(ctx, seq: int) -> llama_vp_quest_stats | None:
    """Quest pages of seq's last step, or None."""
    st = llama_vp_quest_stats()
    return st if llama_vp_get_quest_stats(ctx, seq, byref(st)) == 0 else None


def quest_share(ctx, seq: int) -> float | None:
    """The kept share of Quest's candidate pages at seq's last step, None where no layer kept pages."""
    q = quest_stats(ctx, seq)
    return q.n_kept / q.n_pages if q is not None and q.n_layers > 0 and q.n_pages > 0 else None


def step_no(ctx, seq: int) -> int:
    """The number of seq's last selection step (0 before the first)."""
    st = llama_vp_stats()
    return int(st.step) if llama_vp_get_stats(ctx, seq, byref(st)) == 0 else 0


def last_error() -> str:
    e = llama_vp_last_error()
    return e.decode(errors="replace") if e else ""
