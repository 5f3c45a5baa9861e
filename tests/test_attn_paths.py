"""The attention paths of the layers after the anchor (enum llama_vp_attn).

MASK masks the dropped visual cells; GATHER attends to a compact copy of the selected
K and V rows in ascending cell order. With flash attention both give the same result bit
for bit. Without it V is stored transposed and its kept columns are copied on the CPU
(vp_gather_v_trans): the softmax and the weighted sum of V then add the same products
over n_sel cells instead of n_kv, which puts them in other SIMD lanes, so the two paths
agree to float rounding (same kept sets, same greedy tokens), and each is bit for bit its
own replay (test_replay_oracle.py). The full-budget (a) and forced (b) oracles run on both
paths in test_visionpulse.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import vp_gguf
from vp_gguf import VisionPulse

from conftest import FAMILIES
from support.cache_edit import keep_only
from support.capture import tensor_capture

P = "Describe the picture."
WIDE = dict(tau=0.5, budget_min=0.05, budget_max=0.6)


def _both(m, img, spec_kw):
    toks = m.generate(P, images=[img], max_tokens=10).tokens
    out = {}
    for attn in ("mask", "gather"):
        lg, rep = m.teacher_forced(P, [img], toks, VisionPulse(attn=attn, **spec_kw))
        assert rep.attn == attn
        out[attn] = (lg, rep)
    return out


@pytest.mark.parametrize("spec", [dict(mode="fixed", ratio=0.25), dict(mode="visionpulse", **WIDE),
                                  dict(mode="fixed", ratio=0.25, lagged=True)])
@pytest.mark.parametrize("fa", ["on", "off"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gather_equals_mask(load_model, images, family, fa, spec):
    m = load_model(family, flash_attn=fa)
    out = _both(m, images["a"], spec)
    (a, ra), (b, rb) = out["mask"], out["gather"]
    assert [s.kept for s in ra.steps] == [s.kept for s in rb.steps]
    assert all(s.n_kept < s.n_visual for s in ra.steps)
    if fa == "on":
        assert np.array_equal(a, b), float(np.abs(a - b).max())
    else:  # a reordered float sum: rounding, far below what a wrong cell would move
        assert np.array_equal(a.argmax(-1), b.argmax(-1))
        assert np.allclose(a, b, rtol=0, atol=1e-3), float(np.abs(a - b).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_without_flash_attn_the_kept_columns_of_v_are_gathered(tiny_paths, images, family):
    """The layers after the anchor read only V's kept cells: each of them copies n_sel columns of
    the transposed cache (every cell that is not visual, and room for the K kept visual ones)."""
    shapes: dict = {}
    cb, _ = tensor_capture(["vp_v_gath", "kq-0"], shapes)
    model, mmproj = tiny_paths(family)
    spec = VisionPulse(attn="gather", mode="fixed", ratio=0.25)
    with vp_gguf.VisionModel(model, mmproj, n_ctx=1024, n_threads=2, flash_attn="off", cb_eval=cb) as m:
        toks = m.generate(P, images=[images["a"]], max_tokens=4).tokens
        shapes.clear()
        _, rep = m.teacher_forced(P, [images["a"]], toks, spec)
    pruned = [s for s in rep.steps if s.n_kept < s.n_visual]
    assert rep.attn == "gather" and pruned
    gathers, n_kv = shapes.get("vp_v_gath", []), shapes["kq-0"][-1][0]  # layer 0 is dense: all cells
    assert len(gathers) % len(pruned) == 0 and gathers, (len(gathers), len(pruned))
    n_vis = pruned[-1].n_visual
    k_max = math.ceil(spec.ratio * n_vis)
    assert {ne[0] for ne in gathers[-len(gathers) // len(pruned):]} == {n_kv - n_vis + k_max}, (gathers, n_kv)


@pytest.mark.parametrize("family", FAMILIES)
def test_probe_reuses_the_anchor_scores_without_flash_attn(load_model, images, family):
    """Without flash attention the anchor's own kq is the probe: same selection as the
    probe of its own that flash attention needs."""
    spec = VisionPulse(mode="visionpulse", **WIDE)
    runs = {}
    for fa in ("on", "off"):
        m = load_model(family, flash_attn=fa)
        toks = runs["on"][2] if runs else m.generate(P, images=[images["a"]], max_tokens=10).tokens
        lg, rep = m.teacher_forced(P, [images["a"]], toks, spec)
        runs[fa] = (lg, rep, toks)
    on, off = runs["on"][1], runs["off"][1]
    assert (on.probe, off.probe) == ("own", "anchor")
    assert [s.kept for s in on.steps] == [s.kept for s in off.steps]
    assert all(s.n_kept < s.n_visual for s in off.steps)
    # (the masses differ in the 2nd digit: the layers below the anchor round differently with
    # flash attention, amplified by the random weights; the rankings agree)


@pytest.mark.parametrize("family", FAMILIES)
def test_lagged_prunes_below_the_anchor(load_model, images, family):
    m = load_model(family, flash_attn="on")
    toks = m.generate(P, images=[images["a"]], max_tokens=10).tokens
    plain, rp = m.teacher_forced(P, [images["a"]], toks, VisionPulse(mode="fixed", ratio=0.25))
    lag, rl = m.teacher_forced(P, [images["a"]], toks, VisionPulse(mode="fixed", ratio=0.25, lagged=True))
    # step 1 has no previous selection: identical; later steps differ below the anchor
    assert np.array_equal(plain[:2], lag[:2])
    if family == "gemma3":  # every layer below its anchor is sliding-window: lagged leaves those alone
        assert np.array_equal(plain, lag)
    else:
        assert not np.allclose(plain[2:], lag[2:])
    assert all(s.n_kept == p.n_kept for s, p in zip(rl.steps, rp.steps))


@pytest.mark.parametrize("fa,want", [("on", "mask"), ("off", "gather")])
def test_auto_picks_per_backend(load_model, images, fa, want):
    """CPU: flash attention skips masked cells (MASK); the non-FA path reads every cell (GATHER)."""
    m = load_model("llava", flash_attn=fa)
    r = m.generate(P, images=[images["a"]], max_tokens=4, visionpulse=VisionPulse())
    assert r.visionpulse.attn == want


def test_unknown_path_is_a_clear_error(load_model, images):
    m = load_model("llava")
    with pytest.raises(ValueError, match="attention path"):
        m.generate(P, images=[images["a"]], max_tokens=2, visionpulse=VisionPulse(attn="sparse"))
    assert m.generate(P, images=[images["a"]], max_tokens=2).n_generated == 2


@pytest.mark.parametrize("prune_swa", [False, True])
def test_sliding_window_layers(load_model, images, prune_swa):
    """Dense by default (bounded cost, local context); with prune_swa a forced set from layer 0
    equals removing the other image cells, through the base -> window cell map."""
    m = load_model("gemma3", flash_attn="off")
    r = m.generate(P, images=[images["a"]], max_tokens=8)
    keep = [0, 5, 9]
    spec = VisionPulse(mode="forced", forced=keep, first_pruned_layer=0, prune_swa=prune_swa)
    a, _ = m.teacher_forced(P, [images["a"]], r.tokens, spec)

    b, _ = m.teacher_forced(P, [images["a"]], r.tokens, after_prefill=keep_only(keep))
    # removed cells sit elsewhere in the cache, so the sums run in another order: 1.3e-4 apart on
    # an AVX2-only CPU, while pruning differently (prune_swa off) moves the logits by ~1
    same = np.allclose(a[1:], b[1:], rtol=1e-3, atol=1e-3)
    assert same == prune_swa, float(np.abs(a[1:] - b[1:]).max())
