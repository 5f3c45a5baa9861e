"""Pictures of the kept patches: strip, GIF, stats plot, `vp-gguf viz`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vp_gguf import ImageSpan, VisionPulse, locate
from vp_gguf.visionpulse import StepStats, VisionPulseReport, comparison_spec
from vp_gguf.viz import (_CAP_H, _MAX_WIDTH, _MIN_CELL_W, _MIN_PATCH, _PAD, _canvas, _fitted, kept_strip,
                         pick_steps, visualize)
from vp_gguf.viz_stats import report_setting, stats_figure

ROOT = Path(__file__).resolve().parents[1]

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
    # four frames in one row; a 96 px image at scale 2 is narrower than a caption needs
    assert (img.text["columns"], img.text["rows"]) == ("4", "1")
    assert img.width == 4 * (_MIN_CELL_W + _PAD) + _PAD
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


# --- readable at 100%: a grid of frames, big captions, blank edges cut, a plot with a legend ---

def _spans(rows: int, cols: int) -> list[ImageSpan]:
    return [ImageSpan(pos=0, n_tokens=rows * cols, n_pos=rows * cols, nx=cols, ny=rows)]


def _text_lines(band: np.ndarray) -> list[int]:
    """Heights of the runs of pixel rows that hold dark ink (lines of text), top to bottom."""
    ink = (band < 160).any(axis=1)
    runs, n = [], 0
    for dark in list(ink) + [False]:
        if dark:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def _strip(tmp_path, pic, spans, n_steps=20, **kw) -> Image.Image:
    n = spans[0].n_tokens
    kept = [[(7 * s) % n, (7 * s + 1) % n] for s in range(n_steps)]
    caps = ["Hg"] * n_steps
    return Image.open(kept_strip([pic], spans, kept, caps, tmp_path / "strip.png", **kw))


def test_strip_is_a_grid_a_screen_shows(tmp_path):
    """A photo's eight frames: four a row, two rows, shrunk to the screen's width, captions of
    14 px capitals (ascender to descender 18 px and more), each frame's patches at least 10 px."""
    photo = Image.new("RGB", (800, 600), (200, 120, 40))
    img = _strip(tmp_path, photo, _spans(24, 24))
    assert (img.text["columns"], img.text["rows"]) == ("4", "2")
    assert len(img.text["steps"].split(",")) == 8
    assert _MAX_WIDTH - 4 * _PAD <= img.width <= _MAX_WIDTH  # uses the screen, never more
    cv, cols = _fitted([photo], _spans(24, 24), [[0]], 2, True, 8, 8, 4, _MAX_WIDTH)
    assert cols == 4 and cv.min_patch >= _MIN_PATCH and cv.width < 800  # shrunk to fit, patches still seen
    # the caption of the last row's first frame, measured on the picture: two lines of big text
    band = np.asarray(img.convert("L"))[img.height - _PAD - _CAP_H : img.height - _PAD, _PAD : _PAD + 300]
    lines = _text_lines(band)
    assert len(lines) == 2 and min(lines) >= 18, lines


def test_strip_takes_fewer_columns_rather_than_unseeable_patches(tmp_path):
    """64 patches across 800 px: four columns would leave 7 px patches, so three columns of 10 px and more."""
    photo = Image.new("RGB", (800, 800), (30, 60, 90))
    img = _strip(tmp_path, photo, _spans(64, 64))
    assert (img.text["columns"], img.text["rows"]) == ("3", "3") and img.width <= _MAX_WIDTH
    cv, cols = _fitted([photo], _spans(64, 64), [[0]], 2, True, 8, 8, 4, _MAX_WIDTH)
    assert cols == 3 and cv.min_patch >= _MIN_PATCH
    few = _strip(tmp_path, photo, _spans(8, 8), n_frames=3)  # three frames: one row of three
    assert (few.text["columns"], few.text["rows"]) == ("3", "1")


def _glyph_like() -> Image.Image:
    """160x160, a 10x10 grid of 16 px tiles, ink only in the top 2 rows and left 5 columns."""
    img = Image.new("RGB", (160, 160), (255, 255, 255))
    img.paste((0, 0, 0), (2, 2, 78, 30))
    return img


def test_blank_rows_and_columns_are_cut_by_default(tmp_path):
    pic, spans = _glyph_like(), _spans(10, 10)
    cv = _canvas([pic], spans, [[0]], 2, crop_blank=True)
    assert cv.parts[0][0].size == (5 * 32, 2 * 32) and cv.cut == {"rows", "columns"}
    far = _canvas([pic], spans, [[0], [6 * 10 + 8]], 2, crop_blank=True)  # a kept patch at row 6, col 8 stays
    assert far.parts[0][0].size == (9 * 32, 7 * 32)
    whole = _canvas([pic], spans, [[0]], 2, crop_blank=False)
    assert whole.parts[0][0].size == (320, 320) and not whole.cut
    default = _strip(tmp_path, pic, spans, n_steps=4)
    kept = _strip(tmp_path / "all", pic, spans, n_steps=4, crop_blank=False)
    assert default.height < kept.height  # the default draws the cut picture


def test_viz_flags_cut_by_default_and_keep_on_request():
    from vp_gguf.cli import build_parser

    base = ["viz", "-p", "x", "--image", "i.png", "--visionpulse", "5"]
    assert build_parser().parse_args(base).crop_blank is True
    assert build_parser().parse_args([*base, "--no-crop"]).crop_blank is False
    assert build_parser().parse_args([*base, "--crop-blank"]).crop_blank is True  # old scripts keep working


def _report(mode="visionpulse", k=12, n_visual=256, masses=(0.96, 0.4, 0.02, 1.0), **settings) -> VisionPulseReport:
    vp = VisionPulse(mode=mode, **settings)
    steps = [StepStats(step=i + 1, n_kv=300, n_visual=n_visual, n_kept=k, mass=m, mass_kept=0.5)
             for i, m in enumerate(masses)]
    return VisionPulseReport(mode=mode, anchor_layer=11, settings={**vp.resolved(), "prune_anchor": False},
                             steps=steps)


def test_stats_plot_has_a_legend_whole_steps_and_axes_from_zero():
    fig = stats_figure(_report())
    top, low = fig.axes[:2]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("K: ") for t in labels) and any(t.startswith("budget x 256") for t in labels)
    assert any(t.startswith("visual mass M") for t in labels) and any(t.startswith("budget range 1-5%") for t in labels)
    fig.canvas.draw()
    lo, hi = low.get_xlim()
    ticks = [t for t in low.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks)  # no half steps
    # a constant K of 12 gets an axis from 0 with some room above (not 11.4-12.6)
    assert low.get_ylim()[0] == 0 and 12.8 < low.get_ylim()[1] <= 1.5 * 12.8
    assert top.get_ylim()[0] == 0 and top.get_ylim()[1] <= 110
    # K and budget share the token axis; the right axis says the same in percent of the visual tokens
    right = low.child_axes[0]
    assert "256 visual tokens" in right.get_ylabel()
    assert fig._suptitle.get_text().startswith("VisionPulse 5: ")
    fixed = stats_figure(_report("fixed", ratio=0.05))
    assert any(t.get_text().startswith("ratio x 256") for t in fixed.legends[0].get_texts())
    assert fixed._suptitle.get_text().startswith("fixed 5%: ")


@pytest.mark.parametrize(("spec", "name"), [
    (VisionPulse(), "VisionPulse 5"),
    (VisionPulse(preset=10), "VisionPulse 10"),
    (VisionPulse(tau=0.2, budget_min=0.02, budget_max=0.08), "VisionPulse 2-8%, tau 0.2"),
    (VisionPulse(mode="fixed", ratio=0.05), "fixed 5%"),
    (VisionPulse(mode="static", ratio=0.05), "static 5%"),
    (VisionPulse(mode="random"), "random 1-5%"),
    (VisionPulse(mode="dense"), "dense"),
    (VisionPulse(mode="forced", forced=[1, 2, 3]), "forced, 3 tokens"),
    (VisionPulse(lagged=True), "VisionPulse 5, lagged"),
    (comparison_spec("visionpulse-5-anchor-pruned"), "VisionPulse 5, anchor pruned"),
    (comparison_spec("random-5-matched", matched=([3, 4], 0.05)), "random, K given per step"),
])
def test_settings_are_named_as_a_person_would(spec, name):
    assert spec.label() == name


@pytest.mark.parametrize(("spec", "name"), [
    ({}, "VisionPulse 5"), ({"preset": 10}, "VisionPulse 10"), ({"mode": "static", "ratio": 0.05}, "static 5%"),
])
def test_a_report_names_its_settings(spec, name):
    """visualize without the settings (the API) names them from the report: presets recognised."""
    mode = spec.pop("mode", "visionpulse")
    assert report_setting(_report(mode, **spec)).label() == name


def test_viz_without_matplotlib_draws_the_rest(tiny_paths, images, tmp_path):
    """matplotlib missing: strip and GIF written, the plot skipped with one line saying how to get it, exit 0."""
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named matplotlib (test shim)')\n")
    model, mmproj = tiny_paths("llava")
    out = tmp_path / "v"
    env = {**os.environ, "PYTHONPATH": f"{shim.parent}:{ROOT}"}
    r = subprocess.run([sys.executable, "-m", "vp_gguf.cli", "viz", "-m", str(model), "--mmproj", str(mmproj),
                        "--image", str(images["a"]), "-p", "Describe.", "-n", "4", "-t", "2",
                        "--visionpulse", "5", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert (out / "strip.png").is_file() and (out / "steps.gif").is_file() and not (out / "stats.png").exists()
    lines = [ln for ln in r.stderr.splitlines() if "skipped" in ln or "pip install" in ln]
    assert lines == ["stats.png skipped: the stats plot needs matplotlib: pip install 'vp-gguf[viz]'"], r.stderr
    assert "Traceback" not in r.stderr
