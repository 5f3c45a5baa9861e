"""Pictures of what VisionPulse keeps, step by step.

    res = vm.generate(prompt, images=[...], videos=[...], visionpulse=5)
    vp_gguf.viz.visualize(vm, res, images, "out/", videos=[...])  # strip.png, steps.gif, stats.png, frames.png

Each frame shows every image chunk of the prompt in a grid (at most ``per_row`` a row), the
patches kept at that step outlined in red and the rest dimmed, with the token the step produced
under it. Patches are placed with the token grids libmtmd reports (``GenerationResult.images``),
so this works for every projector family, for several images and for videos: a video's chunk
shows the frame it starts with, decoded again through libmtmd's helper so it is the frame the
model saw, and labelled with its frame number. With a video, frames.png has one row per frame
chunk and one column per chosen step.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from .result import ImageSpan, locate
from .video import as_video, read_frames

_RED = (220, 30, 30)
_GREY = (90, 90, 90)
_WHITE = (255, 255, 255)
_GAP = 8
_CAP_H = 40
_PER_ROW = 8  # parts a canvas row holds before it wraps (a video has tens of chunks)
_LABEL_H = 14  # the band under a video frame that names it
_FRAME_W = 192  # a video frame's width on the canvas, so that tens of frames stay on screen
_HDR_H = 36  # frames.png: the header row naming each step's token
_ROW_CAP_W = 64  # frames.png: the column naming each row's frame


def _open(img: Any) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    if isinstance(img, np.ndarray):
        return Image.fromarray(img).convert("RGB")
    if isinstance(img, (bytes, bytearray)):
        import io

        return Image.open(io.BytesIO(img)).convert("RGB")
    return Image.open(img).convert("RGB")


def _blank_rows_from(img: Image.Image, rows: int) -> int:
    """The number of token rows that hold anything (trailing white rows are cut)."""
    ink = np.nonzero((np.asarray(img.convert("L")) < 250).any(axis=1))[0]
    return int(ink[-1] * rows // img.height) + 1 if len(ink) else rows


def _bitmap_image(M: Any, bmp: int) -> Image.Image:
    """A copy of an mtmd bitmap's pixels (RGB, row-major), so the bitmap can be freed at once."""
    nx, ny = M.mtmd_bitmap_get_nx(bmp), M.mtmd_bitmap_get_ny(bmp)
    n = M.mtmd_bitmap_get_n_bytes(bmp)
    if n != nx * ny * 3:
        raise ValueError(f"a video frame of {nx}x{ny} holds {n} bytes, not RGB")
    return Image.frombytes("RGB", (nx, ny), ctypes.string_at(M.mtmd_bitmap_get_data(bmp), n))


def video_frames(model: Any, video: Any, media: int = 0) -> list[Image.Image]:
    """The frames of a video (path, bytes or Video) as the model saw them: read by the same helper,
    at the same frame rate and cap, so frame k of the list is frame k of the model's chunks."""
    from ._libs import mtmd_cpp as M  # loads libmtmd: not at import time

    parts = read_frames(M, model._mctx, as_video(video), media)
    try:
        return [_bitmap_image(M, p[0]) for p in parts if not isinstance(p, str)]
    finally:  # every bitmap, also when a copy failed
        for p in parts:
            if not isinstance(p, str):
                M.mtmd_bitmap_free(p[0])


def span_pictures(model: Any, spans: Sequence[ImageSpan], images: Any = (), videos: Any = ()) -> list[Any]:
    """One picture per image chunk: its still image, or the video frame the chunk starts with.
    Media are numbered as generate numbers them: images (a Video among them in its place), then videos."""
    from .prompt import media_list  # loads libllama: not at import time

    media = media_list(images, videos)
    if all(sp.frame < 0 for sp in spans) and len(media) == len(spans):
        return media  # one image per chunk, in order: as before chunks named their media
    wanted = {sp.media for sp in spans if sp.frame >= 0}
    frames = {k: video_frames(model, media[k], k) for k in sorted(wanted) if k < len(media)}
    bad = [sp for sp in spans if sp.media >= len(media) or sp.frame >= len(frames.get(sp.media, ()))]
    if bad:  # other media than the generation's, or a Video with another fps or cap
        raise ValueError(
            f"an image chunk is media {bad[0].media} frame {bad[0].frame}, not among the images and videos given: "
            "pass the ones given to generate"
        )
    return [media[sp.media] if sp.frame < 0 else frames[sp.media][sp.frame] for sp in spans]


def _frame_label(sp: ImageSpan) -> str:
    """'f12', or 'f12-13' for a chunk of merged frames (Qwen-VL's pairs)."""
    last = sp.frame + sp.n_frames - 1
    return f"f{sp.frame}" if last == sp.frame else f"f{sp.frame}-{last}"


class _Canvas:
    """The prompt's image chunks scaled and laid in a grid, with each visual ordinal's box."""

    def __init__(
        self,
        images: Sequence[Any],
        spans: Sequence[ImageSpan],
        scale: float,
        crop_blank: bool,
        keep_rows: dict[int, int],
        per_row: int = _PER_ROW,
    ) -> None:
        if len(images) != len(spans):
            raise ValueError(f"{len(images)} images for {len(spans)} image spans")
        if per_row < 1:
            raise ValueError(f"per_row must be >= 1, got {per_row}")
        self.spans = list(spans)
        self.parts = [
            self._scaled(_open(img), sp, scale, crop_blank, keep_rows.get(i, 0))
            for i, (img, sp) in enumerate(zip(images, spans))
        ]
        self.offsets: list[tuple[int, int]] = []
        self._lay_out(per_row)

    @staticmethod
    def _scaled(
        base: Image.Image, sp: ImageSpan, scale: float, crop_blank: bool, keep_row: int
    ) -> tuple[Image.Image, float, float]:
        """The picture enlarged (a video frame to about _FRAME_W), with its patch width and height."""
        rows, cols = sp.grid
        f = scale if sp.frame < 0 else min(scale, _FRAME_W / base.width)
        f = max(f, 6.0 * cols / base.width)  # at least 6 px per patch
        w, h = round(base.width * f), round(base.height * f)
        big = base.resize((w, h), Image.Resampling.NEAREST)
        shown = max(_blank_rows_from(base, rows), keep_row + 1) if crop_blank else rows
        big = big.crop((0, 0, w, round(shown * h / rows)))
        return big, w / cols, h / rows

    def _label_h(self, i: int) -> int:
        return _LABEL_H if self.spans[i].frame >= 0 else 0

    def _lay_out(self, per_row: int) -> None:
        """Rows of at most per_row parts; one row (as for a few images) is exactly the old strip."""
        y, width = 0, 1
        for start in range(0, len(self.parts), per_row):
            row = range(start, min(start + per_row, len(self.parts)))
            x = 0
            for i in row:
                self.offsets.append((x, y))
                x += self.parts[i][0].width + _GAP
            width = max(width, x - _GAP)
            y += max(self.parts[i][0].height + self._label_h(i) for i in row) + _GAP
        self.width, self.height = width, max(1, y - _GAP)

    def cells(self, kept: Sequence[int]) -> dict[int, list[tuple[int, int]]]:
        """The kept ordinals as (row, col) patches, by part."""
        out: dict[int, list[tuple[int, int]]] = {}
        for o in kept:
            i, r, c = locate(self.spans, o)
            out.setdefault(i, []).append((r, c))
        return out

    def part(self, i: int, cells: Sequence[tuple[int, int]]) -> Image.Image:
        """Part i dimmed, its kept patches in full colour and outlined."""
        big, pw, ph = self.parts[i]
        out = Image.blend(big, Image.new("RGB", big.size, _WHITE), 0.6)
        d = ImageDraw.Draw(out)
        for r, c in cells:
            box = (int(c * pw), int(r * ph), int((c + 1) * pw) - 1, int((r + 1) * ph) - 1)
            if box[1] >= big.height:  # a row crop_blank cut
                continue
            out.paste(big.crop(box), box[:2])
            d.rectangle(box, outline=_RED, width=2)
        return out

    def frame(self, kept: Sequence[int]) -> Image.Image:
        out = Image.new("RGB", (self.width, self.height), _WHITE)
        d = ImageDraw.Draw(out)
        font = ImageFont.load_default(size=11)
        by_part = self.cells(kept)
        for i, (x, y) in enumerate(self.offsets):
            out.paste(self.part(i, by_part.get(i, [])), (x, y))
            if self.spans[i].frame >= 0:  # frames look alike: say which one this is
                d.text((x + 2, y + self.parts[i][0].height + 1), _frame_label(self.spans[i]), fill=_GREY, font=font)
        return out


def _captioned(frame: Image.Image, step: int, caption: str, n_kept: int) -> Image.Image:
    font = ImageFont.load_default(size=14)
    out = Image.new("RGB", (max(frame.width, 150), frame.height + _CAP_H), _WHITE)
    out.paste(frame, (0, 0))
    d = ImageDraw.Draw(out)
    d.text((4, frame.height + 4), f"step {step + 1}: {caption!r}", fill=(0, 0, 0), font=font)
    d.text((4, frame.height + 21), f"kept {n_kept}", fill=_GREY, font=font)
    return out


def pick_steps(n: int, n_frames: int = 8, every: int | None = None) -> list[int]:
    """Every ``every``-th step, else ``n_frames`` spread from the first to the last."""
    if n <= 0:
        return []
    if every:
        return list(range(0, n, every))
    k = min(n_frames, n)  # fewer steps than frames: every step (spreading over n_frames lost the last ones)
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def _canvas(
    images: Sequence[Any],
    spans: Sequence[ImageSpan],
    kept_per_step: Sequence[Sequence[int]],
    scale: float,
    crop_blank: bool,
    per_row: int = _PER_ROW,
) -> _Canvas:
    last: dict[int, int] = {}
    if crop_blank:  # a cut never hides a patch some step kept
        for kept in kept_per_step:
            for o in kept:
                i, r, _ = locate(list(spans), o)
                last[i] = max(last.get(i, 0), r)
    return _Canvas(images, spans, scale, crop_blank, last, per_row)


def _save(img: Image.Image, out_path: str | Path, **kw: Any) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    img.save(out_path, **kw)
    return out_path


def kept_strip(
    images: Sequence[Any],
    spans: Sequence[ImageSpan],
    kept_per_step: Sequence[Sequence[int]],
    captions: Sequence[str],
    out_path: str | Path,
    n_frames: int = 8,
    every: int | None = None,
    scale: float = 2,
    crop_blank: bool = False,
    per_row: int = _PER_ROW,
) -> Path:
    """A PNG strip of frames, early to late (or every k steps); ``images``: one picture per span
    (``span_pictures`` finds them for a prompt with videos)."""
    cv = _canvas(images, spans, kept_per_step, scale, crop_blank, per_row)
    frames = [
        _captioned(cv.frame(kept_per_step[s]), s, captions[s], len(kept_per_step[s]))
        for s in pick_steps(len(kept_per_step), n_frames, every)
    ]
    # a grid (wrapped rows, labelled frames) would run into the next step's: set the steps apart
    grid = len(spans) > per_row or any(sp.frame >= 0 for sp in spans)
    sep = 4 * _GAP if grid else _GAP
    w = sum(f.width for f in frames) + sep * max(0, len(frames) - 1)
    strip = Image.new("RGB", (max(w, 1), cv.height + _CAP_H), _WHITE)
    d = ImageDraw.Draw(strip)
    x = 0
    for f in frames:
        if grid and x:
            d.line((x - sep // 2, 0, x - sep // 2, strip.height), fill=(200, 200, 200), width=2)
        strip.paste(f, (x, 0))
        x += f.width + sep
    return _save(strip, out_path)


def kept_gif(
    images: Sequence[Any],
    spans: Sequence[ImageSpan],
    kept_per_step: Sequence[Sequence[int]],
    captions: Sequence[str],
    out_path: str | Path,
    every: int = 1,
    scale: float = 2,
    frame_ms: int = 250,
    crop_blank: bool = False,
    per_row: int = _PER_ROW,
) -> Path:
    """An animated GIF, one frame per step (or every k steps), each the whole grid of spans."""
    cv = _canvas(images, spans, kept_per_step, scale, crop_blank, per_row)
    frames = [
        _captioned(cv.frame(kept_per_step[s]), s, captions[s], len(kept_per_step[s]))
        for s in pick_steps(len(kept_per_step), every=max(1, every))
    ]
    if not frames:
        raise ValueError("no VisionPulse steps to draw")
    return _save(frames[0], out_path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)


def _row_label(sp: ImageSpan, several: bool) -> str:
    """A frame chunk's name; with several videos, which video too (its media index)."""
    return f"#{sp.media} {_frame_label(sp)}" if several else _frame_label(sp)


def _step_header(step: int, caption: str, width: int) -> str:
    """The step and its token, cut to what a column of ``width`` px holds (about 7 px a character)."""
    text = f"{step + 1}: {caption!r}"
    room = max(4, width // 7)
    return text if len(text) <= room else text[: room - 1] + "…"


def kept_frames(
    images: Sequence[Any],
    spans: Sequence[ImageSpan],
    kept_per_step: Sequence[Sequence[int]],
    captions: Sequence[str],
    out_path: str | Path,
    n_frames: int = 8,
    every: int | None = None,
    scale: float = 2,
    crop_blank: bool = False,
) -> Path:
    """A PNG with one row per video frame chunk and one column per chosen step (the steps of
    ``kept_strip``): how the selection moves along the video over the answer. The PNG's text
    says what it holds: "rows" (frame chunks), "frames" (their first frames), "steps" (0-based)."""
    cv = _canvas(images, spans, kept_per_step, scale, crop_blank)
    rows = [i for i, sp in enumerate(cv.spans) if sp.frame >= 0]
    if not rows:
        raise ValueError("no video frame among the image spans: frames.png is for prompts with a video")
    steps = pick_steps(len(kept_per_step), n_frames, every)
    col_w = max(max(cv.parts[i][0].width for i in rows), 96)  # room for the token
    heights = [cv.parts[i][0].height for i in rows]
    out = Image.new("RGB", (_ROW_CAP_W + len(steps) * (col_w + _GAP), _HDR_H + sum(heights) + _GAP * len(rows)), _WHITE)
    d = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=12)
    for j, s in enumerate(steps):
        x = _ROW_CAP_W + j * (col_w + _GAP)
        d.text((x + 2, 4), f"step {_step_header(s, captions[s], col_w)}", fill=(0, 0, 0), font=font)
        d.text((x + 2, 19), f"kept {len(kept_per_step[s])}", fill=_GREY, font=font)
    several = len({cv.spans[i].media for i in rows}) > 1
    y = _HDR_H
    cells = [cv.cells(kept_per_step[s]) for s in steps]
    for i, h in zip(rows, heights):
        d.text((4, y + 2), _row_label(cv.spans[i], several), fill=(0, 0, 0), font=font)
        for j, by_part in enumerate(cells):
            out.paste(cv.part(i, by_part.get(i, [])), (_ROW_CAP_W + j * (col_w + _GAP), y))
        y += h + _GAP
    info = PngImagePlugin.PngInfo()
    info.add_text("rows", str(len(rows)))
    info.add_text("frames", ",".join(str(cv.spans[i].frame) for i in rows))
    info.add_text("steps", ",".join(map(str, steps)))
    return _save(out, out_path, pnginfo=info)


def stats_plot(report: Any, out_path: str | Path) -> Path:
    """Visual mass, budget (clamped mass) and K per step (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the stats plot needs matplotlib: pip install matplotlib") from None
    steps = report.steps
    x = [s.step for s in steps]
    s = report.settings
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(x, [st.mass for st in steps], label="visual mass M", color="tab:blue")
    ax.plot(
        x,
        [min(max(st.mass, s["budget_min"]), s["budget_max"]) for st in steps],
        label="budget clamp(M)",
        color="tab:orange",
    )
    ax.plot(x, [st.retention for st in steps], label="kept K / N_v", color="tab:red", linestyle="--")
    ax.set_xlabel("decode step")
    ax.set_ylabel("fraction")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot(x, [st.n_kept for st in steps], color="tab:gray", alpha=0.4, label="K")
    ax2.set_ylabel("K (tokens kept)")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"VisionPulse {report.mode}, anchor layer {report.anchor_layer}")
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def visualize(
    model: Any,
    result: Any,
    images: Sequence[Any],
    out_dir: str | Path,
    n_frames: int = 8,
    every: int | None = None,
    gif: bool = True,
    plot: bool = True,
    crop_blank: bool = False,
    videos: Sequence[Any] = (),
    per_row: int = _PER_ROW,
) -> dict[str, Path]:
    """strip.png (+ steps.gif, stats.png) for one generation with VisionPulse; with videos (the ones
    given to generate: paths, bytes or Video) also frames.png, one row per frame chunk."""
    rep = result.visionpulse
    if rep is None or not rep.steps:
        raise ValueError(
            "this generation has no VisionPulse steps: generate with visionpulse=5 (or 10) and at least two tokens"
        )
    kept = [s.kept for s in rep.steps]
    caps = [model.token_to_bytes(t).decode("utf-8", errors="replace") for t in result.tokens[1 : 1 + len(kept)]]
    caps += [""] * (len(kept) - len(caps))
    spans = result.images
    pics = span_pictures(model, spans, images, videos)  # each video decoded once, for every picture
    out = Path(out_dir)
    res = {
        "strip": kept_strip(
            pics, spans, kept, caps, out / "strip.png", n_frames, every, crop_blank=crop_blank, per_row=per_row
        )
    }
    if gif:
        res["gif"] = kept_gif(
            pics, spans, kept, caps, out / "steps.gif", every or 1, crop_blank=crop_blank, per_row=per_row
        )
    if any(sp.frame >= 0 for sp in spans):
        res["frames"] = kept_frames(pics, spans, kept, caps, out / "frames.png", n_frames, every, crop_blank=crop_blank)
    if plot:
        res["plot"] = stats_plot(rep, out / "stats.png")
    return res
