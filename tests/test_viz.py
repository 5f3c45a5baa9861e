"""Pictures of the kept patches: strip, GIF, stats plot, `vp-gguf viz`."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vp_gguf import VisionPulse, locate
from vp_gguf.viz import kept_strip, pick_steps, visualize

RED = (220, 30, 30)


def _red(img: Image.Image) -> int:
    px = np.asarray(img.convert("RGB")).reshape(-1, 3)
    return int((px == RED).all(axis=1).sum())


def test_kept_strip_draws_frames(load_model, images, tmp_path):
    m = load_model("qwen2vl")
    r = m.generate("Describe.", images=[images["a"]], max_tokens=10,
                   visionpulse=VisionPulse(mode="fixed", ratio=0.25))
    caps = [m.token_to_bytes(t).decode(errors="replace") for t in r.tokens[1:]]
    kept = [s.kept for s in r.visionpulse.steps]
    out = kept_strip([images["a"]], r.images, kept, caps, tmp_path / "strip.png", n_frames=4)
    img = Image.open(out)
    w = Image.open(images["a"]).width * 2
    assert img.width == 4 * w + 3 * 8
    assert _red(img) > 0  # kept patches are outlined in red
    none = kept_strip([images["a"]], r.images, [[] for _ in kept], caps, tmp_path / "none.png", n_frames=4)
    assert _red(Image.open(none)) == 0


@pytest.mark.parametrize("family", ["llava", "qwen2vl", "gemma3"])
def test_visualize_two_images(load_model, images, tmp_path, family):
    m = load_model(family)
    imgs = [images["a"], images["b"]]
    r = m.generate(f"Left {m.marker} right {m.marker}.", images=imgs, max_tokens=8,
                   visionpulse=VisionPulse(mode="fixed", ratio=0.3))
    paths = visualize(m, r, imgs, tmp_path, n_frames=3)
    strip = Image.open(paths["strip"])
    assert _red(strip) > 0
    gif = Image.open(paths["gif"])
    assert 1 <= gif.n_frames <= len(r.visionpulse.steps)  # Pillow merges identical consecutive frames
    assert Image.open(paths["plot"]).width > 100
    # every kept ordinal lands in one of the two images: both get boxes over the steps
    assert {locate(r.images, o)[0] for s in r.visionpulse.steps for o in s.kept} == {0, 1}


def test_pick_steps():
    assert pick_steps(10, 3) == [0, 4, 9] or pick_steps(10, 3) == [0, 5, 9]
    assert pick_steps(10, every=4) == [0, 4, 8]
    assert pick_steps(0) == []


def test_viz_cli(tiny_paths, images, tmp_path):
    model, mmproj = tiny_paths("llava")
    r = subprocess.run([sys.executable, "-m", "vp_gguf.cli", "viz", "-m", str(model), "--mmproj", str(mmproj),
                        "--image", str(images["a"]), "-p", "Describe.", "-n", "6", "-t", "2",
                        "--visionpulse", "5", "--out", str(tmp_path / "v"), "--every", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for f in ("strip.png", "steps.gif", "stats.png"):
        assert (tmp_path / "v" / f).is_file()
    bad = subprocess.run([sys.executable, "-m", "vp_gguf.cli", "viz", "-m", str(model), "--mmproj", str(mmproj),
                          "--image", str(images["a"]), "-p", "Describe.", "-n", "6", "--out", str(tmp_path / "w")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--visionpulse" in bad.stderr
