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
    assert pick_steps(5) == [0, 1, 2, 3, 4]  # fewer steps than frames: all of them, the last included
    assert pick_steps(2, 8) == [0, 1]


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


@pytest.fixture
def noise_video(tmp_path):
    """8 noise frames of 64x64 at 4 fps in a lossless ffv1 video, and the frames themselves."""
    import shutil

    if not (shutil.which("ffmpeg") and shutil.which("ffprobe")):
        pytest.skip("video input needs ffmpeg and ffprobe")
    rng = np.random.default_rng(7)
    frames = [rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8) for _ in range(8)]
    d = tmp_path / "frames"
    d.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(d / f"f{i:02d}.png")
    path = tmp_path / "v.mkv"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-framerate", "4", "-i", str(d / "f%02d.png"),
                    "-c:v", "ffv1", str(path)], check=True, timeout=60)
    return path, frames


@pytest.mark.parametrize("family", ["qwen2vl", "llava"])
def test_visualize_video(load_model, noise_video, tmp_path, family):
    from vp_gguf.viz import _GAP, _HDR_H, span_pictures, video_frames

    path, frames = noise_video
    m = load_model(family, n_ctx=4096)
    r = m.generate("Describe.", videos=[path], max_tokens=6, visionpulse=5)
    chunks = [sp for sp in r.images if sp.frame >= 0]
    assert chunks and sum(sp.n_frames for sp in chunks) == len(frames)
    # the frames drawn are the frames the model saw: a lossless video decodes to its PNGs exactly
    got = video_frames(m, path)
    assert [np.asarray(g).tolist() == f.tolist() for g, f in zip(got, frames)] == [True] * len(frames)
    assert len(got) == len(frames)
    pics = span_pictures(m, r.images, [], [path])
    assert [np.array_equal(np.asarray(p), frames[sp.frame]) for p, sp in zip(pics, r.images)] == [True] * len(pics)

    paths = visualize(m, r, [], tmp_path / "out", n_frames=3, videos=[path])
    for key, name in [("strip", "strip.png"), ("gif", "steps.gif"), ("plot", "stats.png"), ("frames", "frames.png")]:
        assert paths[key] == tmp_path / "out" / name and paths[key].is_file()
    grid = Image.open(paths["frames"])
    steps = [int(s) for s in grid.text["steps"].split(",")]
    assert steps == pick_steps(len(r.visionpulse.steps), 3)
    # one row per frame chunk: each a 64 px frame drawn at scale 2, under a header
    assert grid.text["rows"] == str(len(chunks))
    assert grid.text["frames"] == ",".join(str(sp.frame) for sp in chunks)
    assert grid.height == _HDR_H + len(chunks) * (128 + _GAP)
    assert _red(grid) > 0 and _red(Image.open(paths["strip"])) > 0


def test_canvas_wraps_and_labels_frames(tmp_path):
    """Many chunks wrap at per_row; a frame gets a label band, a still image none."""
    from vp_gguf import ImageSpan
    from vp_gguf.viz import _GAP, _LABEL_H, _canvas

    pic = Image.new("RGB", (64, 64), (0, 120, 0))
    spans = [ImageSpan(pos=16 * k, n_tokens=16, n_pos=16, nx=4, ny=4, media=0, frame=k) for k in range(10)]
    cv = _canvas([pic] * 10, spans, [[0]], scale=2, crop_blank=False, per_row=4)
    assert cv.width == 4 * 128 + 3 * _GAP
    assert cv.height == 3 * (128 + _LABEL_H) + 2 * _GAP  # 4 + 4 + 2 parts
    assert cv.offsets[4] == (0, 128 + _LABEL_H + _GAP)
    still = [ImageSpan(pos=0, n_tokens=16, n_pos=16, nx=4, ny=4)] * 3
    cv = _canvas([pic] * 3, still, [[0]], scale=2, crop_blank=False)
    assert (cv.width, cv.height) == (3 * 128 + 2 * _GAP, 128)  # the old single row


def test_span_pictures_wants_the_generation_media(load_model, noise_video):
    """A chunk whose media or frame the given images and videos lack is a clear error, not an IndexError."""
    from vp_gguf import ImageSpan
    from vp_gguf.viz import span_pictures

    path, _frames = noise_video
    m = load_model("qwen2vl", n_ctx=4096)
    far = [ImageSpan(pos=0, n_tokens=16, n_pos=4, nx=4, ny=4, media=0, frame=8)]
    with pytest.raises(ValueError, match="pass the ones given to generate"):
        span_pictures(m, far, [], [path])  # the video has 8 frames: 0..7
    with pytest.raises(ValueError, match="pass the ones given to generate"):
        span_pictures(m, [ImageSpan(pos=0, n_tokens=16, n_pos=4, nx=4, ny=4, media=1, frame=0)], [], [path])
