"""The replay oracle: every pruned step is exactly the step that forces its reported kept set.

For each selection mode (lagged included), attention path, flash-attention setting and anchor
behaviour, the logits of each decode step must equal, bit for bit, those of a replay in which that
step's reported kept set is forced (mode "forced", pruning from the same first layer, stated as a
number; lagged: the previous step's forced set below the anchor). This pins *where* the selection is applied,
not only what it is: a later layer using a previous step's set, or the anchor layer pruned when
it should stay dense, gives other logits than the replay.
"""

from __future__ import annotations

import numpy as np
import pytest

from vp_gguf import VisionPulse
from vp_gguf import _vp_ctypes as V

from test_visionpulse import FAMILIES, P, dense_tokens

# each selection mode with settings that prune on the tiny models; "lagged" also prunes the
# full-attention layers below the anchor with the previous step's set
MODES = {
    "visionpulse": dict(mode="visionpulse", tau=1.0, budget_min=0.2, budget_max=0.5),
    "fixed": dict(mode="fixed", ratio=0.25),
    "random": dict(mode="random", ratio=0.25, seed=3),
    "static": dict(mode="static", ratio=0.25),
    "lagged": dict(mode="fixed", ratio=0.25, lagged=True),
}


def _force_steps(steps):
    def before_step(model, i):
        V.set_forced(model.context, 0, steps[i - 1].kept)
    return before_step


@pytest.mark.parametrize("prune_anchor", [False, True], ids=["anchor-dense", "anchor-pruned"])
@pytest.mark.parametrize("attn", ["mask", "gather"])
@pytest.mark.parametrize("fa", ["on", "off"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", FAMILIES)
def test_each_step_equals_the_replay_of_its_kept_set(load_model, images, family, mode, fa, attn, prune_anchor):
    m = load_model(family, flash_attn=fa)
    toks = dense_tokens(m, [images["a"]])
    spec = VisionPulse(attn=attn, prune_anchor=prune_anchor, **MODES[mode])
    got, rep = m.teacher_forced(P, [images["a"]], toks, spec)
    assert rep is not None and len(rep.steps) == len(toks) - 1
    n_vis = rep.steps[0].n_visual
    assert any(0 < len(s.kept) < n_vis for s in rep.steps), "nothing was pruned: the oracle would prove nothing"
    # the pruned layers said explicitly: a changed default must not move the replay along with the run
    replay_spec = VisionPulse(mode="forced", forced=rep.steps[0].kept, attn=attn, anchor_layer=rep.anchor_layer,
                              first_pruned_layer=rep.anchor_layer + (0 if prune_anchor else 1),
                              lagged=spec.lagged)
    if mode == "static":
        # static decodes the last prompt token alone (its query ranks the image); a replay must lay
        # the prompt out the same way, or that token's K/V come from other kernels. Its ranking is
        # then overridden by the forced set at every step.
        replay_spec = spec
    want, _ = m.teacher_forced(P, [images["a"]], toks, replay_spec, before_step=_force_steps(rep.steps))
    for i in range(1, len(toks)):
        assert np.array_equal(got[i], want[i]), (i, rep.steps[i - 1].kept, float(np.abs(got[i] - want[i]).max()))


def test_the_replay_discriminates(load_model, images):
    """Forcing another step's set changes the logits: the oracle can fail."""
    m = load_model("llava", flash_attn="off")
    toks = dense_tokens(m, [images["a"]])
    spec = VisionPulse(attn="mask", **MODES["fixed"])
    got, rep = m.teacher_forced(P, [images["a"]], toks, spec)
    shifted = [rep.steps[-1], *rep.steps[:-1]]  # each step gets a neighbour's set
    assert any(a.kept != b.kept for a, b in zip(shifted, rep.steps))
    want, _ = m.teacher_forced(P, [images["a"]], toks, VisionPulse(mode="forced", forced=shifted[0].kept,
                                                                    attn="mask", anchor_layer=rep.anchor_layer),
                               before_step=_force_steps(shifted))
    assert not all(np.array_equal(got[i], want[i]) for i in range(1, len(toks)))


def test_a_forced_set_does_not_leak_into_the_next_static_generation(load_model, images):
    """Found by the oracle: a FORCED set left behind was read by the next STATIC run as its ranking."""
    m = load_model("gemma3", flash_attn="on")
    toks = dense_tokens(m, [images["a"]])
    static = VisionPulse(mode="static", ratio=0.25, attn="mask")
    first, r1 = m.teacher_forced(P, [images["a"]], toks, static)
    m.teacher_forced(P, [images["a"]], toks, VisionPulse(mode="forced", forced=[2], attn="mask"))
    again, r2 = m.teacher_forced(P, [images["a"]], toks, static)
    assert r2.steps[0].kept == r1.steps[0].kept != [2]
    assert np.array_equal(first, again)
