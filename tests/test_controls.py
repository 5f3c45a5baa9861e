"""The controls beside VisionPulse, and settings that stay put across generations."""

from __future__ import annotations

import pytest

from vp_gguf import VisionPulse
from vp_gguf import _vp_ctypes as V
from vp_gguf._libs import llama_cpp as L

from test_visionpulse import FAMILIES, P, WIDE, dense_tokens


@pytest.mark.parametrize("mode", ["random", "fixed", "visionpulse"])
@pytest.mark.parametrize("family", FAMILIES)
def test_k_per_step_replays_another_runs_budget(load_model, images, family, mode):
    """The budget-matched control: K at each step is the VisionPulse run's, the choice is the mode's."""
    m = load_model(family)
    toks = dense_tokens(m, [images["a"]])
    ks = [[2, 9, 4, 1, 7][i % 5] for i in range(len(toks) - 1)]  # another run's per-step K
    _, ctl = m.teacher_forced(P, [images["a"]], toks, VisionPulse(mode=mode, seed=5, k_per_step=ks, **WIDE))
    assert [s.n_kept for s in ctl.steps] == ks
    if mode == "random":  # the same budget, another choice than the ranking's
        _, ranked = m.teacher_forced(P, [images["a"]], toks, VisionPulse(mode="fixed", k_per_step=ks))
        assert [s.kept for s in ctl.steps] != [s.kept for s in ranked.steps]
    # generation: the list's last K once it ends
    r = m.generate(P, [images["a"]], max_tokens=6, visionpulse=VisionPulse(mode="random", k_per_step=[3, 1]))
    assert [s.n_kept for s in r.visionpulse.steps] == [3, 1, 1, 1, 1]


def test_k_per_step_is_checked():
    with pytest.raises(ValueError, match="k_per_step"):
        VisionPulse(mode="static", k_per_step=[2]).check()
    with pytest.raises(ValueError, match="k_per_step"):
        VisionPulse(mode="random", k_per_step=[0]).check()


@pytest.mark.parametrize("fa", ["on", "off"])
def test_consecutive_generations_reuse_the_graph_at_every_step(load_model, images, fa, monkeypatch):
    """Settings applied once: no generation re-enables VisionPulse (which would block graph reuse), so
    every decode step after the first of each generation reuses the previous step's graph."""
    m = load_model("llava", flash_attn=fa)
    toks = dense_tokens(m, [images["a"]])
    spec = VisionPulse(mode="fixed", ratio=0.25)

    def reuses():
        counts = []
        m.teacher_forced(P, [images["a"]], toks, spec,
                         before_step=lambda model, i: counts.append(L.llama_perf_context(model.context).n_reused))
        counts.append(L.llama_perf_context(m.context).n_reused)
        return [b - a for a, b in zip(counts, counts[1:])]  # per step: 1 if it reused a graph

    calls = []
    for name in ("llama_vp_enable", "llama_vp_disable"):
        f = getattr(V, name)
        monkeypatch.setattr(V, name, lambda *a, _f=f, _n=name: calls.append(_n) or _f(*a))
    for _ in range(3):  # the first step follows the prompt's graph; every later one reuses its predecessor's
        assert reuses() == [0] + [1] * (len(toks) - 2)
    assert calls in ([], ["llama_vp_enable"])  # switched on once at most (if another test left other settings)
    m.generate(P, [images["a"]], max_tokens=2)
    assert calls[-1] == "llama_vp_disable"


def test_prompt_processing_is_no_step_in_c(load_model, images):
    """llama_vp_reset starts a prompt: a one-token decode is then neither pruned nor a step, until
    llama_vp_begin_generation."""
    m = load_model("llava")
    m.generate(P, [images["a"]], max_tokens=3, visionpulse=VisionPulse(mode="fixed", ratio=0.25))
    ctx, tok = m.context, (L.llama_token * 1)(11)
    V.llama_vp_reset(ctx, 0)
    assert L.llama_decode(ctx, L.llama_batch_get_one(tok, 1)) == 0
    assert V.step_no(ctx, 0) == 0 and V.get_kept(ctx, 0) == []
    V.llama_vp_begin_generation(ctx, 0)
    assert L.llama_decode(ctx, L.llama_batch_get_one(tok, 1)) == 0
    assert V.step_no(ctx, 0) == 1 and 0 < len(V.get_kept(ctx, 0)) < V.llama_vp_n_visual(ctx, 0)
