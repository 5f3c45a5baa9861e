"""Videos as frames: libmtmd's video helper (ffmpeg and ffprobe, found at run time) reads them.

A video becomes what llama-mtmd-cli makes of it: the text "Video:", then one bitmap per frame
at the chosen frame rate, with a timestamp ("[0m5.00s]") as text every ``timestamp_ms``. Frames
are mergeable, so models that merge two frames into one chunk (Qwen2/2.5/3-VL) do so. Beyond
llama.cpp's tools, ``max_frames`` caps the frames: a longer video is sampled at a lower rate so
that the frames still cover all of it.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MediaLimitError, VideoError

DEFAULT_FPS = 4.0  # llama.cpp's default (mtmd_helper_video_init_params_default)
DEFAULT_MAX_FRAMES = 64
DEFAULT_TIMESTAMP_MS = 5000  # llama.cpp's default
INSTALL_HINT = (
    "install ffmpeg (Debian/Ubuntu: apt-get install ffmpeg; macOS: brew install ffmpeg; "
    "Windows: winget install ffmpeg), or give the folder that holds ffmpeg and ffprobe (ffmpeg_dir)"
)


@dataclass
class Video:
    """A video and how to sample it: ``fps`` frames per second, at most ``max_frames`` in all
    (spread over the whole video), a timestamp every ``timestamp_ms`` (0: none)."""

    source: str | Path | bytes
    fps: float = DEFAULT_FPS
    max_frames: int = DEFAULT_MAX_FRAMES
    timestamp_ms: int = DEFAULT_TIMESTAMP_MS
    ffmpeg_dir: str | Path | None = None
    # the frames' pixels together (width x height x frames); a video beyond it is refused before its
    # frames are decoded (None: no bound; the server sets its per-request budget here)
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, (str, Path, bytes, bytearray)):
            raise VideoError(f"a video is a path or bytes, got {type(self.source).__name__}")
        if not self.fps > 0:
            raise VideoError(f"video fps must be > 0, got {self.fps}")
        if isinstance(self.max_frames, bool) or not isinstance(self.max_frames, int) or self.max_frames < 1:
            raise VideoError(f"max_frames must be an integer >= 1, got {self.max_frames!r}")
        if self.timestamp_ms < 0:
            raise VideoError(f"timestamp_ms must be >= 0, got {self.timestamp_ms}")

    @property
    def name(self) -> str:
        return f"<{len(self.source)} bytes>" if isinstance(self.source, (bytes, bytearray)) else str(self.source)


VideoInput = str | Path | bytes | Video


def as_video(v: VideoInput) -> Video:
    return v if isinstance(v, Video) else Video(v)


def ffmpeg_folder(ffmpeg_dir: str | Path | None = None) -> str:
    """The folder holding both ffmpeg and ffprobe (given, or found on PATH); a VideoError says how to
    install them when they are missing."""
    where = None if ffmpeg_dir is None else str(ffmpeg_dir)
    found = [shutil.which(name, path=where) for name in ("ffmpeg", "ffprobe")]
    if not all(found):
        missing = " and ".join(n for n, f in zip(("ffmpeg", "ffprobe"), found) if not f)
        place = f"in {ffmpeg_dir}" if ffmpeg_dir is not None else "on PATH"
        raise VideoError(f"video input needs {missing}, not found {place}: {INSTALL_HINT}")
    return str(Path(found[0]).resolve().parent)  # type: ignore[arg-type]


# A part of the prompt a video becomes: a frame (bitmap pointer and frame index) or text.
VideoPart = str | tuple[int, int]


def read_frames(mtmd_cpp: Any, mctx: Any, video: Video, media: int) -> list[VideoPart]:
    """The video's parts in order (text, and (bitmap, frame index) pairs whose bitmaps the caller
    frees). Each frame's id is "<sha256 of the file>+<frame>" (as llama.cpp's helper sets it) prefixed
    by the media index, so that a chunk names its frame and the same video is recognised across turns."""
    from . import _log  # loads libllama: not at import time (the CLI's --help needs no library)

    M = mtmd_cpp
    data = _video_bytes(video)
    digest = hashlib.sha256(data).hexdigest()
    folder = ffmpeg_folder(video.ffmpeg_dir)
    params = M.mtmd_helper_video_init_params_default()
    folder_b = folder.encode()  # kept alive while the helper is created
    params.ffmpeg_bin_dir = folder_b
    params.timestamp_interval_ms = video.timestamp_ms

    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)

    def open_at(fps: float) -> Any:
        params.fps_target = fps
        _log.clear()
        h = M.mtmd_helper_video_init_from_buf(mctx, buf, len(data), params)
        if not h:
            raise VideoError(
                f"video {video.name}: cannot be read as a video ({_log.last_error() or 'ffprobe found no video stream'})"
            )
        return h

    h = open_at(video.fps)
    info = M.mtmd_helper_video_get_info(h)
    # the stream's own length, else the container's (Matroska keeps it there only)
    duration = info.n_frames / info.fps if info.n_frames > 0 else _container_duration(folder, data)
    if duration is not None and duration * video.fps > video.max_frames:  # spread the cap over all of it
        M.mtmd_helper_video_free(h)
        h = open_at(video.max_frames / duration)
    n_expected = video.max_frames if duration is None else min(video.max_frames, max(1, round(duration * video.fps)))
    if video.max_pixels is not None and info.width * info.height * n_expected > video.max_pixels:
        M.mtmd_helper_video_free(h)
        raise MediaLimitError(
            f"video {video.name}: {n_expected} frames of {info.width}x{info.height} are more than the limit of "
            f"{video.max_pixels:,} pixels: lower max_frames or the resolution"
        )
    parts: list[VideoPart] = []
    try:
        n_frames = 0
        out_bmp = ctypes.c_void_p()
        out_txt = ctypes.c_char_p()
        while True:
            rc = M.mtmd_helper_video_read_next(h, ctypes.byref(out_bmp), ctypes.byref(out_txt))
            if rc == -1:
                break
            if rc != 0:
                raise VideoError(
                    f"video {video.name}: ffmpeg decoded no frame ({_log.last_error() or 'corrupt video'})"
                )
            if out_txt.value is not None:
                parts.append(out_txt.value.decode("utf-8", errors="replace"))
                _libc_free(out_txt)
                out_txt.value = None
                continue
            if n_frames == video.max_frames:  # the cap: what came before this frame is the video
                M.mtmd_bitmap_free(out_bmp.value)
                break
            bmp = int(out_bmp.value or 0)
            M.mtmd_bitmap_set_id(bmp, f"{media}:{digest}+{n_frames}".encode())
            parts.append((bmp, n_frames))
            n_frames += 1
        if n_frames == 0:
            raise VideoError(f"video {video.name}: no frame could be decoded")
    except BaseException:
        for p in parts:
            if not isinstance(p, str):
                M.mtmd_bitmap_free(p[0])
        raise
    finally:
        M.mtmd_helper_video_free(h)
    return parts


def _container_duration(folder: str, data: bytes) -> float | None:
    """The video's length in seconds as its container states it (None if it does not)."""
    cmd = [str(Path(folder) / "ffprobe"), "-v", "quiet", "-show_entries", "format=duration", "-of", "csv=p=0", "-"]
    try:
        out = subprocess.run(cmd, check=False, input=data, capture_output=True, timeout=60).stdout.decode().strip()
        seconds = float(out)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    return seconds if seconds > 0 else None


def _video_bytes(video: Video) -> bytes:
    if isinstance(video.source, (bytes, bytearray)):
        data = bytes(video.source)
    else:
        p = Path(video.source).expanduser()
        if not p.is_file():
            raise VideoError(f"video {p}: no such file")
        data = p.read_bytes()
    if not data:
        raise VideoError(f"video {video.name}: the file is empty")
    return data


_libc = ctypes.CDLL(None)
_libc.free.argtypes = [ctypes.c_void_p]


def _libc_free(s: ctypes.c_char_p) -> None:
    """Free a string llama.cpp's helper allocated with strdup (its contract: the caller frees)."""
    _libc.free(ctypes.cast(s, ctypes.c_void_p))
