"""The kept-patch strip."""
from __future__ import annotations

from PIL import Image

from vp_gguf import VisionPulse
from vp_gguf.testbed.viz import kept_strip


def test_kept_strip_draws_frames(load_model, images, tmp_path):
    m = load_model("qwen2vl")
    r = m.generate("Describe.", images=[images["a"]], max_tokens=10,
                   visionpulse=VisionPulse(mode="fixed", ratio=0.25))
    caps = [m.token_to_bytes(t).decode(errors="replace") for t in r.tokens[1:]]
    out = kept_strip(images["a"], r.images, [s.kept for s in r.visionpulse.steps], caps,
                     tmp_path / "strip.png", n_frames=4)
    img = Image.open(out)
    w = Image.open(images["a"]).width * 2
    assert img.width == 4 * (w + 8)
    # kept patches are outlined in red
    import numpy as np
    px = np.asarray(img.convert("RGB")).reshape(-1, 3)
    assert ((px == (220, 30, 30)).all(axis=1)).any()
