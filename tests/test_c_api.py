"""The C API (cpp/include/llama-visionpulse.h) on bad arguments: an error code, never a crash.

Every call gets a null context, a sequence outside the context's own [0, n_seq_max) (here 2,
not LLAMA_MAX_SEQ), negative counts, null arrays with non-zero counts, bad position ranges,
negative ordinals or k. Each group runs in a subprocess (a segfault or abort fails the test,
not pytest), which then checks that the context still generates what it did before them.
`make sanitize` runs this file on the AddressSanitizer build too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
N_SEQ_MAX = 2
BAD_SEQS = (N_SEQ_MAX, 5, 255, 2**31 - 1)  # 5 aborted in the KV cache; 255 < LLAMA_MAX_SEQ
NEG = -(2**31)
COUNT = ">0"  # the kept count of the last step (the selection runs: min_pruned_layers 0)
PROMPT = "Describe the picture."


def _cases(V, ctx):
    """group -> [(name, call returning an int, wanted)]: the bad calls, checked in the worker."""
    from ctypes import POINTER, byref, c_int32, create_string_buffer

    null_i32 = POINTER(c_int32)()
    buf = (c_int32 * 16)()
    text = create_string_buffer(64)
    st = V.llama_vp_stats()

    def arr(*xs):
        return (c_int32 * max(1, len(xs)))(*xs)

    def params(**kw):
        p = V.llama_vp_default_params()
        for k, v in kw.items():
            setattr(p, k, v)
        return p

    def void(f, *a):
        """A void function: did it refuse, with a reason naming the context's range?"""
        V.llama_vp_check_params(None)  # another error first: a range message must come from f
        f(*a)
        return -1 if "out of range [0, 2)" in V.last_error() else 0

    seqs = [(f"seq {s}", s) for s in BAD_SEQS]
    return {
        "params": [
            ("check_params NULL", lambda: V.llama_vp_check_params(None), -1),
            ("check_params mode 99", lambda: V.llama_vp_check_params(byref(params(mode=99))), -1),
            ("check_params mode NONE", lambda: V.llama_vp_check_params(byref(params(mode=-1))), -1),
            ("check_params attn 7", lambda: V.llama_vp_check_params(byref(params(attn=7))), -1),
            ("check_params tau nan", lambda: V.llama_vp_check_params(byref(params(tau=float("nan")))), -1),
            ("check_params budget_min > max", lambda: V.llama_vp_check_params(byref(params(budget_min=0.5))), -1),
            ("check_params min_pruned -1", lambda: V.llama_vp_check_params(byref(params(min_pruned_layers=-1))), -1),
            ("enable NULL ctx", lambda: V.llama_vp_enable(None, byref(params())), -1),
            ("enable NULL params", lambda: V.llama_vp_enable(ctx, None), -1),
            ("enable anchor 99", lambda: V.llama_vp_enable(ctx, byref(params(anchor_layer=99))), -1),
            ("enable anchor 2^31-1", lambda: V.llama_vp_enable(ctx, byref(params(anchor_layer=2**31 - 1))), -1),
            ("enable first_pruned 1000", lambda: V.llama_vp_enable(ctx, byref(params(first_pruned_layer=1000))), -1),
        ],
        "null_ctx": [
            ("enabled", lambda: int(V.llama_vp_enabled(None)), 0),
            ("anchor_layer", lambda: V.llama_vp_anchor_layer(None), -1),
            ("last_attn", lambda: V.llama_vp_last_attn(None), -1),
            ("last_probe", lambda: V.llama_vp_last_probe(None), -1),
            ("skip_reason", lambda: 0 if V.llama_vp_skip_reason(None) is None else 1, 0),
            ("disable", lambda: V.llama_vp_disable(None) or 0, 0),
            ("mark_visual", lambda: V.llama_vp_mark_visual(None, 0, 0, 4), -1),
            ("clear_marks", lambda: V.llama_vp_clear_marks(None, -1), -1),
            ("n_visual", lambda: V.llama_vp_n_visual(None, 0), -1),
            ("set_forced", lambda: V.llama_vp_set_forced(None, 0, arr(1), 1), -1),
            ("get_stats", lambda: V.llama_vp_get_stats(None, 0, byref(st)), -1),
            ("get_kept", lambda: V.llama_vp_get_kept(None, 0, buf, 16), -1),
            ("reset", lambda: V.llama_vp_reset(None, 0) or 0, 0),
            ("begin_generation", lambda: V.llama_vp_begin_generation(None, -1) or 0, 0),
            ("set_k", lambda: V.llama_vp_set_k(None, 0, 3), -1),
        ],
        "marks": [
            *[(f"mark_visual {n}", lambda s=s: V.llama_vp_mark_visual(ctx, s, 0, 4), -1) for n, s in seqs],
            ("mark_visual seq -1", lambda: V.llama_vp_mark_visual(ctx, -1, 0, 4), -1),
            ("mark_visual p0 > p1", lambda: V.llama_vp_mark_visual(ctx, 1, 9, 3), -1),
            ("mark_visual p0 = p1", lambda: V.llama_vp_mark_visual(ctx, 1, 3, 3), -1),
            ("mark_visual p0 < 0", lambda: V.llama_vp_mark_visual(ctx, 1, -5, 3), -1),
            ("mark_visual both < 0", lambda: V.llama_vp_mark_visual(ctx, 1, NEG, -1), -1),
            *[(f"clear_marks {n}", lambda s=s: V.llama_vp_clear_marks(ctx, s), -1) for n, s in seqs],
            ("clear_marks seq -1 (all)", lambda: V.llama_vp_clear_marks(ctx, -1), 0),
        ],
        "n_visual": [
            *[(f"n_visual {n}", lambda s=s: V.llama_vp_n_visual(ctx, s), -1) for n, s in seqs],
            ("n_visual seq -1", lambda: V.llama_vp_n_visual(ctx, -1), -1),
            ("n_visual seq -2^31", lambda: V.llama_vp_n_visual(ctx, NEG), -1),
            ("n_visual seq 1 (empty)", lambda: V.llama_vp_n_visual(ctx, 1), 0),
        ],
        "forced": [
            *[(f"set_forced {n}", lambda s=s: V.llama_vp_set_forced(ctx, s, arr(1), 1), -1) for n, s in seqs],
            ("set_forced seq -1", lambda: V.llama_vp_set_forced(ctx, -1, arr(1), 1), -1),
            ("set_forced n -1", lambda: V.llama_vp_set_forced(ctx, 1, arr(1), -1), -1),
            ("set_forced NULL n 10", lambda: V.llama_vp_set_forced(ctx, 1, null_i32, 10), -1),
            ("set_forced ordinal -1", lambda: V.llama_vp_set_forced(ctx, 1, arr(3, -1), 2), -1),
            ("set_forced ordinal -2^31", lambda: V.llama_vp_set_forced(ctx, 1, arr(NEG), 1), -1),
            # past any N_v: accepted, ignored at the step (the images may come later)
            ("set_forced ordinal 2^31-1", lambda: V.llama_vp_set_forced(ctx, 1, arr(2**31 - 1), 1), 0),
            ("set_forced NULL n 0", lambda: V.llama_vp_set_forced(ctx, 1, null_i32, 0), 0),
        ],
        "stats_kept": [
            *[(f"get_stats {n}", lambda s=s: V.llama_vp_get_stats(ctx, s, byref(st)), -1) for n, s in seqs],
            ("get_stats NULL out", lambda: V.llama_vp_get_stats(ctx, 0, None), -1),
            ("get_kept NULL cap 10", lambda: V.llama_vp_get_kept(ctx, 0, null_i32, 10), -1),
            ("get_kept cap -1", lambda: V.llama_vp_get_kept(ctx, 0, buf, -1), -1),
            ("get_kept cap -2^31", lambda: V.llama_vp_get_kept(ctx, 0, buf, NEG), -1),
            *[(f"get_kept {n}", lambda s=s: V.llama_vp_get_kept(ctx, s, buf, 16), -1) for n, s in seqs],
            ("get_kept seq -1", lambda: V.llama_vp_get_kept(ctx, -1, buf, 16), -1),
            ("get_kept NULL cap 0 (count)", lambda: V.llama_vp_get_kept(ctx, 0, null_i32, 0), COUNT),
        ],
        "reset_k": [
            *[(f"reset {n}", lambda s=s: void(V.llama_vp_reset, ctx, s), -1) for n, s in seqs],
            *[(f"begin_generation {n}", lambda s=s: void(V.llama_vp_begin_generation, ctx, s), -1) for n, s in seqs],
            ("reset seq -1 (all)", lambda: void(V.llama_vp_reset, ctx, -1), 0),
            ("begin_generation seq -1 (all)", lambda: void(V.llama_vp_begin_generation, ctx, -1), 0),
            *[(f"set_k {n}", lambda s=s: V.llama_vp_set_k(ctx, s, 3), -1) for n, s in seqs],
            ("set_k seq -1", lambda: V.llama_vp_set_k(ctx, -1, 3), -1),
            ("set_k k -1", lambda: V.llama_vp_set_k(ctx, 0, -1), -1),
            ("set_k k -2^31", lambda: V.llama_vp_set_k(ctx, 0, NEG), -1),
            ("set_k k 0 (the rule)", lambda: V.llama_vp_set_k(ctx, 0, 0), 0),
        ],
        "backends": [
            ("trace_backends NULL ctx", lambda: V.llama_vp_trace_backends(None, True) or 0, 0),
            ("op_backends NULL ctx", lambda: V.llama_vp_op_backends(None, None, 0), -1),
            ("op_backends NULL buf cap 10", lambda: V.llama_vp_op_backends(ctx, None, 10), -1),
            ("op_backends cap -1", lambda: V.llama_vp_op_backends(ctx, text, -1), -1),
            ("op_backends cap -2^31", lambda: V.llama_vp_op_backends(ctx, text, NEG), -1),
            ("op_backends untraced (empty)", lambda: V.llama_vp_op_backends(ctx, text, len(text)), 0),
            ("trace_backends off", lambda: V.llama_vp_trace_backends(ctx, False) or 0, 0),
        ],
    }


GROUPS = ("params", "null_ctx", "marks", "n_visual", "forced", "stats_kept", "reset_k", "backends")
# one KV stream per sequence: the cache asserts on a seq past n_seq_max (unified, past LLAMA_MAX_SEQ)
SPLIT_KV = ("n_visual", "stats_kept")


def _worker(group: str, unified: str, model: str, mmproj: str, image: str) -> None:
    """Run one group's bad calls on a fresh context, print each result, then check the context."""
    import vp_gguf
    from vp_gguf import _vp_ctypes as V

    library = V.llama_vp_default_params

    def defaults():  # as tests/conftest.py: the tiny model's single pruned layer is not skipped
        p = library()
        p.min_pruned_layers = 0
        return p

    V.llama_vp_default_params = defaults
    m = vp_gguf.VisionModel(
        model, mmproj, n_ctx=1024, n_threads=2, n_seq_max=N_SEQ_MAX, kv_unified=unified == "unified"
    )
    ref = m.generate(PROMPT, images=[image], max_tokens=6, visionpulse=5).tokens
    ctx = m._ctx
    for name, call, want in _cases(V, ctx)[group]:
        print(json.dumps({"case": name, "want": want}), flush=True)  # the last line names a crash's case
        print(json.dumps({"case": name, "got": call(), "want": want}), flush=True)
    out = m.generate(PROMPT, images=[image], max_tokens=6, visionpulse=5)
    works = out.tokens == ref and V.llama_vp_n_visual(ctx, 0) > 0 and V.llama_vp_enabled(ctx)
    print(json.dumps({"works": bool(works)}), flush=True)
    m.close()


@pytest.mark.parametrize(("group", "kv"), [(g, "unified") for g in GROUPS] + [(g, "per-seq") for g in SPLIT_KV])
def test_bad_arguments_return_an_error(tiny_paths, images, group, kv):
    model, mmproj = tiny_paths("llava")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, group, kv, str(model), str(mmproj), str(images["a"])]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.returncode == 0, f"crashed (rc {r.returncode}) at {rows[-1] if rows else 'start'}:\n{r.stderr[-3000:]}"
    got = [c for c in rows if "got" in c]
    assert len(got) == len([c for c in rows if "case" in c]) // 2 > 0
    wrong = [c for c in got if not (c["got"] > 0 if c["want"] == COUNT else c["got"] == c["want"])]
    assert not wrong, wrong
    assert rows[-1] == {"works": True}, "the context no longer generates as before the bad calls"


def test_op_backends_text_is_cut_as_snprintf_cuts(load_model, images):
    """The traced record's length is returned whatever the buffer; a short one gets a NUL-ended prefix."""
    from ctypes import create_string_buffer

    from vp_gguf import _vp_ctypes as V

    m = load_model("qwen2vl")
    m.trace_backends()
    try:
        m.generate(PROMPT, images=[images["a"]], max_tokens=3, visionpulse=5)
        n = V.llama_vp_op_backends(m._ctx, None, 0)
        full = create_string_buffer(n + 1)
        assert V.llama_vp_op_backends(m._ctx, full, len(full)) == n > 0
        assert full.value.decode().endswith("\n") and all(len(ln.split(" ", 2)) == 3 for ln in full.value.decode().splitlines())
        short = create_string_buffer(b"x" * 8)
        assert V.llama_vp_op_backends(m._ctx, short, 5) == n
        assert short.raw[:5] == full.value[:4] + b"\0" and short.raw[5:8] == b"xxx"  # nothing past cap
        assert m.op_backends() == {op: {"CPU": c} for op, c in ((ln.split(" ")[0], int(ln.split(" ")[1])) for ln in full.value.decode().splitlines())}
    finally:
        m.trace_backends(False)
    assert V.llama_vp_op_backends(m._ctx, None, 0) == 0  # off: the record is dropped


if __name__ == "__main__":
    _worker(*sys.argv[1:6])
