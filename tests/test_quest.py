"""Quest pages below the anchor (llama_vp_params.quest; beyond the paper, opt-in) on the tiny VLMs.

(a) keeping every page equals VisionPulse without Quest bit for bit (flash attention on and off, F16 and Q8_0);
(b) a forced page set equals removing the other pages' cells from the cache;
(c) the bounds equal a NumPy recomputation from the layer's keys and queries, bound every cell's score,
    and each KV head keeps the pages NumPy ranks first;
(d) page summaries are made once per image and again when the cache rewrites the cells;
(e) fewer pages change the layers below the anchor; the random control keeps as many, other ones;
(f) settings that cannot work are clear errors.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

import vp_gguf
from vp_gguf import VisionPulse
from vp_gguf import _vp_ctypes as V
from vp_gguf._libs import llama_cpp as L

from support.cache_edit import keep_only
from support.capture import tensor_capture

P = "Describe the picture."
N = 8
PAGE = 4  # the tiny images hold a few dozen tokens: pages of 4 make several candidates
# fixed 25% after the anchor; Quest from layer 0 (the tiny models' anchor is layer 2 of 4)
BASE = dict(mode="fixed", ratio=0.25)
QUEST = dict(quest="bound", quest_page=PAGE, quest_first_layer=0)
ON_CPU = os.environ.get("VP_GGUF_TEST_N_GPU_LAYERS", "0") == "0"  # Quest runs where the cache is in host memory
FAMILIES = ["qwen2vl", "llava"]  # gemma3-tiny has only sliding-window layers below its anchor


def _tokens(m, img):
    return m.generate(P, images=[img], max_tokens=N).tokens


def _stats(m):
    st = V.quest_stats(m.context, 0)
    assert st is not None
    return st


# -- (a) ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fa,kv", [("off", "f16"), ("on", "f16"), ("on", "q8_0")])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_page_kept_is_bit_identical_to_visionpulse(load_model, images, family, fa, kv):
    m = load_model(family, flash_attn=fa, type_k=kv, type_v=kv)
    toks = _tokens(m, images["a"])
    plain, rp = m.teacher_forced(P, [images["a"]], toks, VisionPulse(**BASE))
    for quest in ("bound", "random"):
        spec = VisionPulse(**BASE, **{**QUEST, "quest": quest}, quest_budget_min=1.0, quest_budget_max=1.0)
        lg, rq = m.teacher_forced(P, [images["a"]], toks, spec)
        assert np.array_equal(lg, plain), (quest, float(np.abs(lg - plain).max()))
        assert [s.kept for s in rq.steps] == [s.kept for s in rp.steps]
        st = _stats(m)
        assert st.n_kept == st.n_pages > 0 and st.page == PAGE
        assert st.n_layers == (rq.anchor_layer if ON_CPU else 0)  # every layer below the anchor


# -- (b) ------------------------------------------------------------------------------------

def _pages(span, n_kv_pages: int) -> list[list[int]]:
    """The candidate pages of an image span (a fresh one-sequence cache: cell = position), as ordinals."""
    return [[c - span.pos for c in range(j * PAGE, (j + 1) * PAGE)] for j in range(n_kv_pages)
            if span.pos <= j * PAGE and (j + 1) * PAGE <= span.pos + span.n_tokens]


@pytest.mark.parametrize("fa,attn", [("off", "auto"), ("on", "auto"), ("on", "gather")])
def test_forced_pages_equal_removing_the_other_cells(load_model, images, fa, attn):
    """Quest takes the step's path: with flash attention on the CPU (auto) a mask row per query head and no
    copies, else the gathered rows; each equals VisionPulse's own path over the same cells bit for bit."""
    m = load_model("llava", flash_attn=fa)  # one position per image token: seq_rm can drop single cells
    r = m.generate(P, images=[images["a"]], max_tokens=N)
    span = r.images[0]
    pages = _pages(span, 1024 // PAGE)
    forced = [0, 2, len(pages) - 1]
    in_pages = {o for pg in pages for o in pg}
    keep = sorted({o for i in forced for o in pages[i]} | (set(range(span.n_tokens)) - in_pages))

    def force_pages(model, spans):
        V.set_quest_pages(model.context, 0, forced)

    # Quest's forced pages below the anchor, the same cells forced from the anchor on: no layer sees the rest
    anchor = m.generate(P, images=[images["a"]], max_tokens=1, visionpulse=VisionPulse()).visionpulse.anchor_layer
    spec = VisionPulse(mode="forced", forced=keep, first_pruned_layer=anchor, attn=attn, **QUEST)
    a, rep = m.teacher_forced(P, [images["a"]], r.tokens, spec, after_prefill=force_pages)
    st = _stats(m)
    assert (st.n_pages, st.n_kept, st.n_layers) == (len(pages), len(forced), anchor if ON_CPU else 0)
    assert all(s.kept == keep for s in rep.steps)

    b, _ = m.teacher_forced(P, [images["a"]], r.tokens, after_prefill=keep_only(keep))
    # the cells as the layers after the anchor take them on the same path, forced from layer 0: the same
    # rows in the same order (masked in place, or copied), so the same result bit for bit
    path = "gather" if fa == "off" else ("mask" if attn == "auto" else attn)
    g, _ = m.teacher_forced(P, [images["a"]], r.tokens,
                            VisionPulse(mode="forced", forced=keep, first_pruned_layer=0, attn=path))
    assert np.array_equal(a, g), float(np.abs(a - g).max())
    tol = 1e-3 if fa == "off" else 2e-2  # fewer cells in a row put the sums in other SIMD lanes (F16 V with FA)
    assert np.allclose(a[1:], b[1:], rtol=tol, atol=tol), float(np.abs(a[1:] - b[1:]).max())
    assert (a.argmax(1) == b.argmax(1)).all()


# -- (c) ------------------------------------------------------------------------------------

def _numpy_bounds(keys: np.ndarray, q: np.ndarray, cand_cells: list[list[int]]) -> np.ndarray:
    """[H, pages]: sum_i max(q_i m_i, q_i M_i) per query head (keys [H_kv, cells, d], q [H, d])."""
    H, H_kv = q.shape[0], keys.shape[0]
    out = np.empty((H, len(cand_cells)))
    for c, cells in enumerate(cand_cells):
        for h in range(H):
            k = keys[h // (H // H_kv), cells].astype(np.float64)
            out[h, c] = np.maximum(q[h] * k.min(0), q[h] * k.max(0)).sum()
    return out


@pytest.mark.skipif(not ON_CPU, reason="Quest runs where the cache is in host memory")
def test_bounds_and_selection_match_numpy(tiny_paths, images):
    layer = 1  # the one Quest layer (quest_first_layer 1, anchor 2)
    names = [f"Qcur-{layer}", "vp_quest_k", "vp_quest_bounds", "vp_quest_select"]
    cb, cap = tensor_capture(names)
    model, mmproj = tiny_paths("qwen2vl")
    with vp_gguf.VisionModel(model, mmproj, n_ctx=1024, n_threads=2, flash_attn="on", cb_eval=cb) as m:
        toks = _tokens(m, images["a"])
        # the gather path: its copy of the kept keys is a node (the mask path reads the cache in place)
        full = VisionPulse(**BASE, **{**QUEST, "quest_first_layer": layer}, quest_budget_min=1.0,
                           quest_budget_max=1.0, attn="gather")
        cap.clear()
        m.teacher_forced(P, [images["a"]], toks, full)
        st = _stats(m)
        n_dec = len(toks) - 1
        keys = cap["vp_quest_k"][-1][0]  # every cell kept: the cache's keys [cells, H_kv, d]
        keys = keys.transpose(1, 0, 2).astype(np.float32)
        q = cap[f"Qcur-{layer}"][-1].reshape(-1, keys.shape[-1])  # [H, d] of the last step (after RoPE)
        bounds = cap["vp_quest_bounds"][-1]  # [H_kv, G, pages of n_kv]
        n_pages_kv = bounds.shape[-1]
        bounds = bounds.reshape(-1, n_pages_kv)
        span = m.image_spans[0]
        vis = set(range(span.pos, span.pos + span.n_tokens))  # one cell per image token in a fresh cache
        cand = [j for j in range(n_pages_kv) if all(c in vis for c in range(j * PAGE, (j + 1) * PAGE))]
        assert len(cand) == st.n_pages > 2
        cells = [list(range(j * PAGE, (j + 1) * PAGE)) for j in cand]
        ref = _numpy_bounds(keys, q.astype(np.float64), cells)
        got = bounds[:, cand]
        # q meets the F16 summaries in F16: a bound to F16 rounding
        assert np.allclose(got, ref, rtol=2e-3, atol=2e-2 * np.abs(ref).max()), float(np.abs(got - ref).max())
        scores = np.einsum("hd,hcd->hc", q.astype(np.float64),
                           np.repeat(keys, q.shape[0] // keys.shape[0], axis=0).astype(np.float64))
        for c, page in enumerate(cells):  # an upper bound of every query head's score on the page
            assert (got[:, c] + 2e-2 * np.abs(ref).max() >= scores[:, page].max(1)).all()

        # a quarter of the pages: each KV head keeps the ones its query heads bound highest
        cap.clear()
        part = VisionPulse(**BASE, **{**QUEST, "quest_first_layer": layer}, quest_budget_min=0.25,
                           quest_budget_max=0.25, attn="gather")
        m.teacher_forced(P, [images["a"]], toks, part)
        st = _stats(m)
        assert st.n_kept == min(st.n_pages, max(1, math.ceil(0.25 * st.n_pages)))
        assert len(cap["vp_quest_select"]) == n_dec
        for b, sel in zip(cap["vp_quest_bounds"], cap["vp_quest_select"]):
            b = b.reshape(keys.shape[0], -1, n_pages_kv)  # [H_kv, G, pages]
            for h in range(b.shape[0]):
                rel = (b[h][:, cand] - b[h][:, cand].max(1, keepdims=True)).max(0)
                order = sorted(range(len(cand)), key=lambda c: (-rel[c], c))[: st.n_kept]
                dropped = {x for c in set(range(len(cand))) - set(order) for x in cells[c]}
                want = [x for x in range(n_pages_kv * PAGE) if x not in dropped]
                assert sel.reshape(b.shape[0], -1)[h].tolist() == want


# -- (d) ------------------------------------------------------------------------------------

@pytest.mark.skipif(not ON_CPU, reason="Quest runs where the cache is in host memory")
def test_summaries_are_made_once_and_again_when_the_cells_change(load_model, images):
    m = load_model("qwen2vl", flash_attn="on")
    spec = VisionPulse(**BASE, **QUEST, quest_budget_min=0.5, quest_budget_max=0.5)
    seen = []

    def watch(model, i):
        if i > 1:
            seen.append(_stats(model).n_refreshed)
    toks = _tokens(m, images["a"])
    m.teacher_forced(P, [images["a"]], toks, spec, before_step=watch)
    st = _stats(m)
    assert seen[0] == st.n_pages > 0 and seen[1:] == [0] * (len(seen) - 1)  # step 1 made them all, then none
    # the same prompt again, its cache kept: the cells are the same, their summaries still hold
    first = []
    m.teacher_forced(P, [images["a"]], toks, spec, cache_prompt=True,
                     before_step=lambda model, i: first.append(_stats(model).n_refreshed) if i == 2 else None)
    assert first == [0]
    # another image at the same positions: the prefill rewrote the cells, so every page is summarized again
    m.teacher_forced(P, [images["b"]], toks, spec, cache_prompt=True,
                     before_step=lambda model, i: first.append(_stats(model).n_refreshed) if i == 2 else None)
    assert first == [0, st.n_pages]


# -- (e) ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_fewer_pages_change_the_layers_below_the_anchor(load_model, images, family):
    m = load_model(family, flash_attn="on")
    toks = _tokens(m, images["a"])
    plain, rp = m.teacher_forced(P, [images["a"]], toks, VisionPulse(**BASE))
    out = {}
    for quest in ("bound", "random"):
        spec = VisionPulse(**BASE, **{**QUEST, "quest": quest}, quest_budget_min=0.25, quest_budget_max=0.25, seed=3)
        out[quest], _ = m.teacher_forced(P, [images["a"]], toks, spec)
        st = _stats(m)
        assert st.n_kept == max(1, math.ceil(0.25 * st.n_pages)) < st.n_pages
    if not ON_CPU:
        return
    assert np.array_equal(out["bound"][0], plain[0])  # the first token comes from the dense prefill
    assert not np.allclose(out["bound"][1:], plain[1:])
    assert not np.allclose(out["bound"][1:], out["random"][1:])


def test_the_budget_follows_the_previous_steps_mass(load_model, images):
    m = load_model("llava", flash_attn="on")
    toks = _tokens(m, images["a"])
    spec = VisionPulse(mode="visionpulse", tau=2.0, **QUEST, quest_budget_min=0.05, quest_budget_max=1.0)
    kept = []  # kept[s]: pages kept at step s + 1 (read before the next step)

    def watch(model, i):
        if i > 1:
            kept.append(_stats(model).n_kept)
    _, rep = m.teacher_forced(P, [images["a"]], toks, spec, before_step=watch)
    n = _stats(m).n_pages
    assert kept[0] == n  # the first step has no previous mass: the upper bound
    unit = -(-n // 64)
    for s in range(1, len(kept)):
        mass = rep.steps[s - 1].mass
        want = min(n, max(1, -(-math.ceil(min(max(mass, 0.05), 1.0) * n) // unit) * unit))
        assert kept[s] == want, (mass, n, kept[s])
    assert len(set(kept)) > 1  # the tiny model's mass moves: so does the budget


# -- (f) ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,match", [
    (dict(quest="bound", lagged=True), "lagged"),
    (dict(quest="bound", quest_page=12), "power of two"),
    (dict(quest="bound", quest_page=512), "power of two"),
    (dict(quest="bound", quest_budget_min=0.5, quest_budget_max=0.2), "exceeds"),
    (dict(quest="bound", quest_budget_max=0.0), r"\(0, 1\]"),
    (dict(quest="pages"), "unknown VisionPulse quest"),
])
def test_impossible_settings_are_clear_errors(load_model, images, spec, match):
    m = load_model("llava")
    with pytest.raises(ValueError, match=match):
        m.generate(P, images=[images["a"]], max_tokens=2, visionpulse=VisionPulse(**spec))
    assert m.generate(P, images=[images["a"]], max_tokens=2).n_generated == 2


def test_presets_with_a_plus_add_quest():
    vp = VisionPulse.parse("5+")
    assert (vp.preset, vp.quest) == (5, "bound")
    assert VisionPulse.parse("10").quest == "off"
    assert vp.label() == "VisionPulse 5, Quest pages below the anchor"
    with pytest.raises(ValueError, match="5\\+"):
        VisionPulse.parse("7+")


def test_bad_page_lists_are_refused(load_model):
    m = load_model("llava")
    with pytest.raises(ValueError, match="negative page"):
        V.set_quest_pages(m.context, 0, [1, -2])
    assert V.llama_vp_set_quest_pages(m.context, 99, None, 0) == -1
    assert V.llama_vp_get_quest_stats(m.context, 0, None) == -1


@pytest.mark.skipif(not ON_CPU, reason="Quest runs where the cache is in host memory")
def test_a_state_load_and_its_marks_drop_the_summaries(load_model, images):
    """A state load writes cells without a decode; the marks it needs (documented) drop the summaries."""
    import ctypes

    m = load_model("llava", flash_attn="on")
    spec = VisionPulse(**BASE, **QUEST, quest_budget_min=0.5, quest_budget_max=0.5)
    toks = _tokens(m, images["a"])
    m.teacher_forced(P, [images["a"]], toks, spec)  # summaries made
    made = []

    def reload_state(model, spans):
        ctx = model.context
        n = L.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * n)()
        assert L.llama_state_seq_get_data(ctx, buf, n, 0) == n
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        assert L.llama_state_seq_set_data(ctx, buf, n, 0) == n
        assert V.llama_vp_mark_visual(ctx, 0, spans[0].pos, spans[0].pos + spans[0].n_tokens) == 0
    try:
        m.teacher_forced(P, [images["a"]], toks, spec, cache_prompt=True, after_prefill=reload_state,
                         before_step=lambda model, i: made.append(_stats(model).n_refreshed) if i == 2 else None)
    finally:
        V.llama_vp_clear_marks(m.context, -1)
    assert made == [_stats(m).n_pages]


@pytest.mark.parametrize("unified", [True, False])
def test_two_sequences_run_those_layers_dense(tiny_paths, images, unified):
    """Quest gathers one sequence's cells of a one-stream cache: a batch of two sequences, or a cache with a
    stream per sequence, keeps the layers below the anchor dense (bit for bit VisionPulse's)."""
    import ctypes

    from vp_gguf._libs import mtmd_cpp as M

    model, mmproj = tiny_paths("llava")
    with vp_gguf.VisionModel(model, mmproj, n_ctx=1024, n_threads=2, n_seq_max=2, kv_unified=unified,
                             flash_attn="on") as m:
        pos = {}
        for s, img in enumerate(("a", "b")):
            with m.prepare(P, [images[img]]) as prep:
                n_past = L.llama_pos(0)
                assert M.mtmd_helper_eval_chunks(m.mtmd_context, m.context, prep.chunks, 0, s, m.n_batch, True,
                                                 ctypes.byref(n_past)) == 0
                pos[s] = n_past.value
        mem = L.llama_get_memory(m.context)
        batch = L.llama_batch_init(2, 0, 1)
        out = {}
        try:
            for label, spec in (("plain", VisionPulse(**BASE)), ("quest", VisionPulse(**BASE, **QUEST))):
                params = spec.to_c()
                assert V.llama_vp_enable(m.context, ctypes.byref(params)) == 0
                rows = []
                for step in range(3):
                    for s in (0, 1):
                        batch.token[s], batch.pos[s], batch.n_seq_id[s] = 5 + step, pos[s] + step, 1
                        batch.seq_id[s][0], batch.logits[s] = s, 1
                    batch.n_tokens = 2
                    assert L.llama_decode(m.context, batch) == 0
                    rows.append([np.ctypeslib.as_array(L.llama_get_logits_ith(m.context, s), shape=(m.n_vocab,))
                                 .copy() for s in (0, 1)])
                    if label == "quest":
                        assert V.quest_stats(m.context, 0) is None  # no Quest plan for a two-row step
                # one sequence alone: Quest applies where the cache has one stream
                batch.token[0], batch.pos[0], batch.seq_id[0][0], batch.n_tokens = 9, pos[0] + 3, 0, 1
                assert L.llama_decode(m.context, batch) == 0
                if label == "quest":
                    st = V.quest_stats(m.context, 0)
                    assert (st is not None and st.n_layers > 0) == (unified and ON_CPU)
                for s in (0, 1):
                    assert L.llama_memory_seq_rm(mem, s, pos[s], -1)
                out[label] = rows
        finally:
            L.llama_batch_free(batch)
            V.llama_vp_disable(m.context)
    assert all(np.array_equal(a, b) for ra, rb in zip(out["plain"], out["quest"]) for a, b in zip(ra, rb))
