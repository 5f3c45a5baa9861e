"""Video input: frames read by ffmpeg through libmtmd's helper, marked per frame, equal to
llama-mtmd-cli's own video path; bad videos are clear errors; many images in one prompt."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import vp_gguf
from vp_gguf.errors import ContextOverflowError, VideoError
from vp_gguf.result import locate_frame
from vp_gguf.video import Video

from test_oracle import run_cli

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
pytestmark = needs_ffmpeg


def make_video(folder, n_frames: int, fps: int = 4, size: int = 64, codec: str = "ffv1", seed: int = 0):
    """A video of noise frames (lossless with ffv1: the decoded frames equal the PNGs)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_frames):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"f{i:03d}.png")
    out = folder / ("v.mkv" if codec == "ffv1" else "v.mp4")
    extra = ["-c:v", "ffv1"] if codec == "ffv1" else ["-c:v", "libx264", "-pix_fmt", "yuv420p"]
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-framerate", str(fps), "-i", str(folder / "f%03d.png"),
                    *extra, str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("video"), 12)


@pytest.fixture(scope="module")
def video_mp4(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("video_mp4"), 10, codec="h264", seed=1)


def test_frames_are_marked_and_qwen_merges_frame_pairs(load_model, video):
    m = load_model("qwen2vl", n_ctx=4096)
    r = m.generate("What happens?", videos=[video], max_tokens=4)
    frames = [(s.media, s.frame, s.n_frames) for s in r.images]
    # "Video:", frame 0, its timestamp, then the rest of the 12 frames (4 fps = 3 s) merged in pairs
    assert frames == [(0, 0, 1)] + [(0, f, 2) for f in range(1, 11, 2)] + [(0, 11, 1)]
    assert r.n_image_tokens == sum(s.n_tokens for s in r.images)
    first = r.images[1]
    ordinal = sum(s.n_tokens for s in r.images[:1]) + first.nx + 2  # row 1, col 2 of the chunk of frames 1-2
    assert locate_frame(r.images, ordinal) == (0, 1, 1, 2)


def test_images_then_videos_take_the_markers_in_order(load_model, images, video):
    m = load_model("llava", n_ctx=4096)
    mk = m.marker
    r = m.generate(f"Picture {mk} film {mk} done.", images=[images["a"]], videos=[Video(video, max_frames=2)],
                   max_tokens=2)
    assert [(s.media, s.frame) for s in r.images] == [(0, -1), (1, 0), (1, 1)]
    # a Video among the images keeps its place
    r2 = m.generate(f"Film {mk} picture {mk} done.", images=[Video(video, max_frames=2), images["a"]],
                    max_tokens=2)
    assert [(s.media, s.frame) for s in r2.images] == [(0, 0), (0, 1), (1, -1)]


def test_max_frames_spreads_the_frames_over_the_whole_video(load_model, video):
    m = load_model("llava", n_ctx=4096)
    r = m.generate("Go.", videos=[Video(video, max_frames=3)], max_tokens=1)
    assert [s.frame for s in r.images] == [0, 1, 2]
    with m.prepare("Go.", videos=[Video(video, max_frames=3)]) as prep:
        got = [_pixels(b) for b in prep.bitmaps]
    # 12 frames at 4 fps, 3 wanted: one frame a second (ffmpeg's fps filter picks which in each)
    src = [np.asarray(Image.open(video.parent / f"f{i:03d}.png")) for i in range(12)]
    idx = [next(i for i, s in enumerate(src) if np.array_equal(g, s)) for g in got]
    assert np.diff(idx).tolist() == [4, 4] and idx[-1] >= 8


def _pixels(bmp) -> np.ndarray:
    from vp_gguf._libs import mtmd_cpp as M

    nx, ny = M.mtmd_bitmap_get_nx(bmp), M.mtmd_bitmap_get_ny(bmp)
    data = np.ctypeslib.as_array(M.mtmd_bitmap_get_data(bmp), shape=(ny * nx * 3,))
    return data.reshape(ny, nx, 3).copy()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2vl", "llava"])
def test_greedy_on_a_video_matches_llama_mtmd_cli(mtmd_cli, tiny_paths, load_model, video_mp4, family):
    model, mmproj = tiny_paths(family)
    m = load_model(family, flash_attn="off", n_ctx=4096, n_batch=2048, n_ubatch=2048)
    ours = m.generate("Describe the video.", videos=[video_mp4], max_tokens=12)
    assert len(ours.images) > 2
    ref = run_cli(mtmd_cli, model, mmproj, [video_mp4], "Describe the video.", 12, "off", n_ctx=4096)
    ours_bytes = b"".join(m.token_to_bytes(t, special=True) for t in ours.tokens)
    assert ref.rstrip(b"\n") == ours_bytes.rstrip(b"\n")


def test_missing_ffmpeg_says_how_to_install_it(load_model, video, tmp_path, monkeypatch):
    m = load_model("llava", n_ctx=4096)
    monkeypatch.setenv("PATH", str(tmp_path))  # no ffmpeg there
    with pytest.raises(VideoError, match="apt-get install ffmpeg"):
        m.generate("Go.", videos=[video], max_tokens=1)
    with pytest.raises(VideoError, match="ffprobe"):
        m.generate("Go.", videos=[Video(video, ffmpeg_dir=tmp_path)], max_tokens=1)


@pytest.mark.parametrize(
    "bad, match",
    [
        (b"", "empty"),
        (b"\x00\x01 not a video at all" * 40, "cannot be read as a video"),
        ("no-such-video.mp4", "no such file"),
    ],
)
def test_bad_videos_are_clear_errors_and_the_model_stays_usable(load_model, images, bad, match):
    m = load_model("llava", n_ctx=4096)
    with pytest.raises(VideoError, match=match):
        m.generate("Go.", videos=[bad], max_tokens=1)
    assert m.generate("Describe.", images=[images["a"]], max_tokens=3).n_generated == 3


def test_a_truncated_or_frameless_video_is_a_clear_error(load_model, images, video, tmp_path):
    m = load_model("llava", n_ctx=4096)
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(video.read_bytes()[:300])  # the header, no frame
    audio = tmp_path / "audio.mka"  # a file with a sound stream and no picture
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-f", "lavfi", "-i", "anullsrc=r=8000", "-t", "1",
                    str(audio)], check=True)
    for f in (cut, audio):
        with pytest.raises(VideoError, match="video"):
            m.generate("Go.", videos=[f], max_tokens=1)
    assert m.generate("Describe.", images=[images["a"]], max_tokens=2).n_generated == 2


def test_impossible_video_settings_are_refused():
    for kw, match in [({"max_frames": 0}, "max_frames"), ({"fps": 0}, "fps"), ({"timestamp_ms": -1}, "timestamp")]:
        with pytest.raises(VideoError, match=match):
            Video("v.mp4", **kw)


def test_a_video_longer_than_the_context_is_a_clear_error(load_model, images, video):
    m = load_model("llava", n_ctx=256)
    with pytest.raises(ContextOverflowError, match="raise n_ctx"):
        m.generate("Go.", videos=[video], max_tokens=1)
    assert m.generate("Go.", videos=[Video(video, max_frames=2)], max_tokens=2).n_generated == 2


def test_thirty_two_images_in_one_prompt(load_model, images):
    m = load_model("llava", n_ctx=2048)
    pics = [images["a"], images["b"], images["grad"], images["jpeg"]] * 8
    r = m.generate("Which differ?", images=pics, max_tokens=3)
    assert len(r.images) == 32 and [s.media for s in r.images] == list(range(32))
    small = load_model("llava", n_ctx=512)
    with pytest.raises(ContextOverflowError, match="the context holds 512"):
        small.generate("Which differ?", images=pics, max_tokens=3)
    assert small.generate("Which?", images=pics[:2], max_tokens=2).n_generated == 2


def test_the_cli_reads_a_video(tiny_paths, video, tmp_path):
    model, mmproj = tiny_paths("qwen2vl")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VP_GGUF_")}
    cmd = [sys.executable, "-m", "vp_gguf.cli", "run", "-m", str(model), "--mmproj", str(mmproj), "--video", str(video), "-c", "4096",
           "--video-max-frames", "4", "-p", "What happens?", "-n", "3", "--temp", "0", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    bad = subprocess.run(cmd[:-1] + ["--video-max-frames", "0"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and "--video-max-frames: must be an integer in [1," in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


def test_chat_takes_a_video_and_keeps_it_across_turns(tiny_paths, video, tmp_path):
    model, mmproj = tiny_paths("qwen2vl")
    script = (f"/video {video}\nWhat happens?\n/video {tmp_path / 'missing.mp4'}\n"
              "And then?\n/quit\n")
    r = subprocess.run([sys.executable, "-m", "vp_gguf.cli", "chat", "-m", str(model), "--mmproj", str(mmproj),
                        "-n", "4", "-c", "4096", "-t", "2", "--video-max-frames", "4"],
                       input=script, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 2  # two replies
    assert "missing.mp4: no such file" in r.stderr and "Traceback" not in r.stderr


def test_viz_cli_draws_a_video(tiny_paths, video, tmp_path):
    model, mmproj = tiny_paths("llava")
    r = subprocess.run([sys.executable, "-m", "vp_gguf.cli", "viz", "-m", str(model), "--mmproj", str(mmproj),
                        "--video", str(video), "--video-max-frames", "4", "-c", "4096", "-p", "What happens?",
                        "-n", "5", "--visionpulse", "5", "--vp-min-pruned-layers", "0", "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "frames.png").exists() and (tmp_path / "out" / "steps.gif").exists()
