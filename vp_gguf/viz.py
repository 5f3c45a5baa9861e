"""Pictures of what VisionPulse keeps, step by step.

    res = vm.generate(prompt, images=[...], videos=[...], visionpulse=5)
    vp_gguf.viz.visualize(vm, res, images, "out/", videos=[...])  # strip.png, steps.gif, stats.png, frames.png

strip.png is a grid of the chosen steps, at most 4 a row and about 2000 px wide so that it reads
at 100%. Each frame shows every image chunk of the prompt (at most ``per_row`` a row), the patches
kept at that step outlined in red and the rest dimmed, under it the step, the token it produced and
how many patches it kept. Blank rows and columns at the bottom and right of an image (a glyph
image's empty lines) are cut unless ``crop_blank=False``; a patch some step kept is never cut.
Patches are placed with the token grids libmtmd reports (``GenerationResult.images``), so this
works for every projector family, for several images and for videos: a video's chunk shows the
frame it starts with, decoded again through libmtmd's helper so it is the frame the model saw, and
labelled with its frame number. With a video, frames.png has one row per frame chunk and one
column per chosen step. stats.png plots the visual mass, the budget and K per step (matplotlib).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from .result import ImageSpan, locate
from .video import as_video, read_frames
from .viz_stats import plot_missing, report_setting, stats_figure, stats_plot

__all__ = [
    "kept_frames",
    "kept_gif",
    "kept_strip",
    "pick_steps",
    "plot_missing",
    "span_pictures",
    "stats_figure",
    "stats_plot",
    "video_frames",
    "visualize",
]

if TYPE_CHECKING:
    from .visionpulse import VisionPulse

_RED = (220, 30, 30)
_GREY = (90, 90, 90)
_BLACK = (0, 0, 0)
_WHITE = (255, 255, 255)
_RULE = (205, 205, 205)  # the lines between the grid's frames
_GAP = 8  # between the image chunks of one frame
_PAD = 16  # around and between the grid's frames
_TEXT_PX = 20  # captions: capitals and digits 14 px tall, read at 100% zoom
_TITLE_PX = 24
_LINE_H = _TEXT_PX + 6
_CAP_H = 2 * _LINE_H + 8  # a frame's caption: step and token, then what it kept
_COLUMNS = 4  # frames a grid row holds
_MAX_WIDTH = 2000  # px: what a screen shows at 100%
_MIN_PATCH = 10  # px: frames shrink to fit the width only while a patch keeps this much
_MIN_CELL_W = 280  # a frame's cell is at least this wide: its caption needs the room
_PER_ROW = 8  # image chunks a frame's row holds before it wraps (a video has tens of chunks)
_LABEL_PX = 16
_LABEL_H = _LABEL_PX + 6  # the band under a video frame that names it
_FRAME_W = 192  # a video frame's width on the canvas, so that tens of frames stay on screen
_HDR_H = 2 * _LINE_H + 10  # frames.png: the header row naming each step's token
_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@functools.cache
def _font(px: int) -> _Font:
    return ImageFont.load_default(size=px)


def _fit_text(text: str, font: _Font, width: float) -> str:
    """``text``, cut with an ellipsis to what ``width`` px hold."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _open(img: Any) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    if isinstance(img, np.ndarray):
        return Image.fromarray(img).convert("RGB")
    if isinstance(img, (bytes, bytearray)):
        import io

        return Image.open(io.BytesIO(img)).convert("RGB")
    return Image.open(img).convert("RGB")


def _ink_extent(img: Image.Image, rows: int, cols: int) -> tuple[int, int]:
    """The token rows and columns, counted from the top left, up to the last that holds anything."""
    ink = np.asarray(img.convert("L")) < 250
    ys, xs = np.nonzero(ink.any(axis=1))[0], np.nonzero(ink.any(axis=0))[0]
    if not len(ys):
        return rows, cols
    return int(ys[-1] * rows // img.height) + 1, int(xs[-1] * cols // img.width) + 1


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
        keep: dict[int, tuple[int, int]],
        per_row: int = _PER_ROW,
        shrink: float = 1.0,
    ) -> None:
        if len(images) != len(spans):
            raise ValueError(f"{len(images)} images for {len(spans)} image spans")
        if per_row < 1:
            raise ValueError(f"per_row must be >= 1, got {per_row}")
        self.spans = list(spans)
        self.cut: set[str] = set()  # "rows", "columns": what blank edges were cut
        self.parts = [
            self._scaled(_open(img), sp, scale, shrink, crop_blank, keep.get(i, (0, 0)))
            for i, (img, sp) in enumerate(zip(images, spans))
        ]
        self.offsets: list[tuple[int, int]] = []
        self.gaps = 0  # px of gaps in the widest row: they do not shrink with the pictures
        self._lay_out(per_row)

    def _scaled(
        self, base: Image.Image, sp: ImageSpan, scale: float, shrink: float, crop_blank: bool, keep: tuple[int, int]
    ) -> tuple[Image.Image, float, float]:
        """The picture enlarged (a video frame to about _FRAME_W), shrunk to fit the grid, blank edges
        cut; with its patch width and height."""
        rows, cols = sp.grid
        f = (scale if sp.frame < 0 else min(scale, _FRAME_W / base.width)) * shrink
        f = max(f, 6.0 * cols / base.width)  # at least 6 px per patch
        w, h = round(base.width * f), round(base.height * f)
        # enlarged tiles stay sharp; a shrunk photo is filtered, not aliased
        big = base.resize((w, h), Image.Resampling.NEAREST if f >= 1 else Image.Resampling.LANCZOS)
        if crop_blank:
            ink_rows, ink_cols = _ink_extent(base, rows, cols)
            shown = max(ink_rows, keep[0] + 1), max(ink_cols, keep[1] + 1)
            if shown[0] < rows or shown[1] < cols:
                self.cut |= {"rows"} if shown[0] < rows else set()
                self.cut |= {"columns"} if shown[1] < cols else set()
                big = big.crop((0, 0, round(shown[1] * w / cols), round(shown[0] * h / rows)))
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
            if x - _GAP > width:
                width, self.gaps = x - _GAP, _GAP * (len(row) - 1)
            y += max(self.parts[i][0].height + self._label_h(i) for i in row) + _GAP
        self.width, self.height = width, max(1, y - _GAP)

    @property
    def min_patch(self) -> float:
        """The smallest patch side drawn, px."""
        return min(min(pw, ph) for _img, pw, ph in self.parts)

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
            if box[0] >= big.width or box[1] >= big.height:  # cut as blank (crop_blank keeps kept ones)
                continue
            out.paste(big.crop(box), box[:2])
            d.rectangle(box, outline=_RED, width=2)
        return out

    def frame(self, kept: Sequence[int]) -> Image.Image:
        out = Image.new("RGB", (self.width, self.height), _WHITE)
        d = ImageDraw.Draw(out)
        by_part = self.cells(kept)
        for i, (x, y) in enumerate(self.offsets):
            out.paste(self.part(i, by_part.get(i, [])), (x, y))
            if self.spans[i].frame >= 0:  # frames look alike: say which one this is
                d.text(
                    (x + 2, y + self.parts[i][0].height + 2),
                    _frame_label(self.spans[i]),
                    fill=_GREY,
                    font=_font(_LABEL_PX),
                )
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
    shrink: float = 1.0,
) -> _Canvas:
    last: dict[int, tuple[int, int]] = {}
    if crop_blank:  # a cut never hides a patch some step kept
        for kept in kept_per_step:
            for o in kept:
                i, r, c = locate(list(spans), o)
                lr, lc = last.get(i, (0, 0))
                last[i] = max(lr, r), max(lc, c)
    return _Canvas(images, spans, scale, crop_blank, last, per_row, shrink)


def _fitted(
    images: Sequence[Any],
    spans: Sequence[ImageSpan],
    kept_per_step: Sequence[Sequence[int]],
    scale: float,
    crop_blank: bool,
    per_row: int,
    n: int,
    columns: int,
    max_width: int,
) -> tuple[_Canvas, int]:
    """The canvas and the grid's columns: the most frames a row (up to ``columns``, ``n`` frames)
    that ``max_width`` holds with every patch at least _MIN_PATCH px, frames shrunk to fit; one
    column, shrunk to the width, where none does."""
    cv = _canvas(images, spans, kept_per_step, scale, crop_blank, per_row)
    for cols in range(max(1, min(columns, n)), 0, -1):
        room = (max_width - (cols + 1) * _PAD) / cols
        shrink = min(1.0, (room - cv.gaps - len(spans)) / max(1, cv.width - cv.gaps))  # a px a part for rounding
        if cols > 1 and (room < _MIN_CELL_W or shrink * cv.min_patch < _MIN_PATCH):
            continue
        if shrink < 1:
            cv = _canvas(images, spans, kept_per_step, scale, crop_blank, per_row, max(shrink, 1e-3))
        return cv, cols
    return cv, 1  # not reached: one column always returns


def _text_band(lines: Sequence[tuple[str, int, tuple[int, int, int]]], width: int) -> Image.Image:
    """Lines of (text, px, colour) over a white band at least ``width`` wide (wider if a line needs it)."""
    need = max(_font(px).getlength(text) for text, px, _c in lines) + 2 * _PAD
    out = Image.new("RGB", (max(width, int(need) + 1), _PAD + sum(px + 8 for _t, px, _c in lines)), _WHITE)
    d = ImageDraw.Draw(out)
    y = _PAD
    for text, px, colour in lines:
        d.text((_PAD, y), text, fill=colour, font=_font(px))
        y += px + 8
    return out


def _cell(
    frame: Image.Image, width: int, step: int, n_steps: int, token: str, n_kept: int, n_visual: int
) -> Image.Image:
    """One step's frame over its caption: the step, its token, and how much it kept."""
    font = _font(_TEXT_PX)
    out = Image.new("RGB", (width, frame.height + _CAP_H), _WHITE)
    out.paste(frame, (0, 0))
    d = ImageDraw.Draw(out)
    y = frame.height + 8
    d.text(
        (0, y), _fit_text(f"step {step + 1} of {n_steps}: {_token_text(token)}", font, width), fill=_BLACK, font=font
    )
    share = f" ({100 * n_kept / n_visual:.1f}%)" if n_visual else ""
    kept = _fit_text(f"kept {n_kept} of {n_visual} patches{share}", font, width)
    d.text((0, y + _LINE_H), kept, fill=_GREY, font=font)
    return out


def _grid(cells: Sequence[Image.Image], cols: int, header: Image.Image) -> Image.Image:
    """The header above the cells, ``cols`` a row, each in a light frame."""
    cw, ch = cells[0].size
    rows = -(-len(cells) // cols)
    out = Image.new("RGB", (max(cols * (cw + _PAD) + _PAD, header.width), header.height + rows * (ch + _PAD) + _PAD))
    out.paste(_WHITE, (0, 0, out.width, out.height))
    out.paste(header, (0, 0))
    d = ImageDraw.Draw(out)
    for k, cell in enumerate(cells):
        x, y = _PAD + (k % cols) * (cw + _PAD), header.height + _PAD + (k // cols) * (ch + _PAD)
        out.paste(cell, (x, y))
        h = _PAD // 2
        d.rectangle((x - h, y - h, x + cw + h - 1, y + ch + h - 1), outline=_RULE)
    return out


def _header(setting: str | None, steps: str, cut: set[str], width: int) -> Image.Image:
    """What the picture shows, for someone who has never seen one: the settings, how to read the
    boxes, which steps, and what was cut (``steps`` such as "8 of 81 steps", or "")."""
    what = "the image patches kept at each step"
    edges = {"rows": "blank rows at the bottom", "columns": "blank columns at the right"}
    cuts = " and ".join(edges[k] for k in sorted(cut, reverse=True))
    note = "; ".join(t for t in (steps, cuts and f"{cuts} not drawn") if t)
    lines = [
        (f"{setting}: {what}" if setting else what[0].upper() + what[1:], _TITLE_PX, _BLACK),
        ("red boxes: the patches kept, in full colour; the dimmed rest was dropped", _TEXT_PX, _GREY),
    ]
    return _text_band(lines + ([(note, _TEXT_PX, _GREY)] if note else []), width)


def _token_text(token: str) -> str:
    """A token as the caption shows it: quoted, and whitespace named (a quoted space reads as nothing)."""
    names = {" ": "a space", "\n": "a newline", "\t": "a tab"}
    if token and not token.strip():
        return names.get(token, f"{len(token)} whitespace characters")
    return repr(token)


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
    crop_blank: bool = True,
    per_row: int = _PER_ROW,
    setting: str | None = None,
    columns: int = _COLUMNS,
    max_width: int = _MAX_WIDTH,
) -> Path:
    """A PNG grid of frames, early to late (or every k steps): at most ``columns`` a row and
    ``max_width`` px wide, frames shrunk to fit while a patch keeps _MIN_PATCH px. ``images``: one
    picture per span (``span_pictures`` finds them for a prompt with videos); ``setting``: the
    settings' name for the title (``VisionPulse.label()``). The PNG's text says what it holds:
    "steps" (0-based), "columns" and "rows" of the grid."""
    steps = pick_steps(len(kept_per_step), n_frames, every)
    if not steps:
        raise ValueError("no VisionPulse steps to draw")
    cv, cols = _fitted(images, spans, kept_per_step, scale, crop_blank, per_row, len(steps), columns, max_width)
    n_visual = sum(sp.n_tokens for sp in spans)
    width = max(cv.width, _MIN_CELL_W)
    cells = [
        _cell(cv.frame(kept_per_step[s]), width, s, len(kept_per_step), captions[s], len(kept_per_step[s]), n_visual)
        for s in steps
    ]
    grid_w = cols * (width + _PAD) + _PAD
    header = _header(setting, f"{len(steps)} of {len(kept_per_step)} steps", cv.cut, grid_w)
    info = PngImagePlugin.PngInfo()
    info.add_text("steps", ",".join(map(str, steps)))
    info.add_text("columns", str(cols))
    info.add_text("rows", str(-(-len(steps) // cols)))
    return _save(_grid(cells, cols, header), out_path, pnginfo=info)


def kept_gif(
    images: Sequence[Any],
    spans: Sequence[ImageSpan],
    kept_per_step: Sequence[Sequence[int]],
    captions: Sequence[str],
    out_path: str | Path,
    every: int = 1,
    scale: float = 2,
    frame_ms: int = 250,
    crop_blank: bool = True,
    per_row: int = _PER_ROW,
    setting: str | None = None,
    max_width: int = _MAX_WIDTH,
) -> Path:
    """An animated GIF, one frame per step (or every k steps), each the whole grid of spans."""
    steps = pick_steps(len(kept_per_step), every=max(1, every))
    if not steps:
        raise ValueError("no VisionPulse steps to draw")
    cv, _cols = _fitted(images, spans, kept_per_step, scale, crop_blank, per_row, 1, 1, max_width)
    n_visual = sum(sp.n_tokens for sp in spans)
    width = max(cv.width, _MIN_CELL_W)
    header = _header(setting, "", cv.cut, width + 2 * _PAD)
    frames = [
        _grid(
            [
                _cell(
                    cv.frame(kept_per_step[s]),
                    width,
                    s,
                    len(kept_per_step),
                    captions[s],
                    len(kept_per_step[s]),
                    n_visual,
                )
            ],
            1,
            header,
        )
        for s in steps
    ]
    return _save(frames[0], out_path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)


def _row_label(sp: ImageSpan, several: bool) -> str:
    """A frame chunk's name; with several videos, which video too (its media index)."""
    return f"#{sp.media} {_frame_label(sp)}" if several else _frame_label(sp)


def kept_frames(
    images: Sequence[Any],
    spans: Sequence[ImageSpan],
    kept_per_step: Sequence[Sequence[int]],
    captions: Sequence[str],
    out_path: str | Path,
    n_frames: int = 8,
    every: int | None = None,
    scale: float = 2,
    crop_blank: bool = True,
) -> Path:
    """A PNG with one row per video frame chunk and one column per chosen step (the steps of
    ``kept_strip``): how the selection moves along the video over the answer. The PNG's text
    says what it holds: "rows" (frame chunks), "frames" (their first frames), "steps" (0-based)."""
    cv = _canvas(images, spans, kept_per_step, scale, crop_blank)
    rows = [i for i, sp in enumerate(cv.spans) if sp.frame >= 0]
    if not rows:
        raise ValueError("no video frame among the image spans: frames.png is for prompts with a video")
    steps = pick_steps(len(kept_per_step), n_frames, every)
    font = _font(_TEXT_PX)
    several = len({cv.spans[i].media for i in rows}) > 1
    labels = [_row_label(cv.spans[i], several) for i in rows]
    cap_w = int(max(font.getlength(t) for t in labels)) + 2 * _GAP
    col_w = max(max(cv.parts[i][0].width for i in rows), 150)  # room for the token
    heights = [cv.parts[i][0].height for i in rows]
    out = Image.new("RGB", (cap_w + len(steps) * (col_w + _GAP), _HDR_H + sum(heights) + _GAP * len(rows)), _WHITE)
    d = ImageDraw.Draw(out)
    for j, s in enumerate(steps):
        x = cap_w + j * (col_w + _GAP)
        d.text((x, 4), _fit_text(f"step {s + 1}: {_token_text(captions[s])}", font, col_w), fill=_BLACK, font=font)
        d.text((x, 4 + _LINE_H), _fit_text(f"kept {len(kept_per_step[s])}", font, col_w), fill=_GREY, font=font)
    y = _HDR_H
    cells = [cv.cells(kept_per_step[s]) for s in steps]
    for i, h, label in zip(rows, heights, labels):
        d.text((_GAP // 2, y + 2), label, fill=_BLACK, font=font)
        for j, by_part in enumerate(cells):
            out.paste(cv.part(i, by_part.get(i, [])), (cap_w + j * (col_w + _GAP), y))
        y += h + _GAP
    info = PngImagePlugin.PngInfo()
    info.add_text("rows", str(len(rows)))
    info.add_text("frames", ",".join(str(cv.spans[i].frame) for i in rows))
    info.add_text("steps", ",".join(map(str, steps)))
    return _save(out, out_path, pnginfo=info)


def visualize(
    model: Any,
    result: Any,
    images: Sequence[Any],
    out_dir: str | Path,
    n_frames: int = 8,
    every: int | None = None,
    gif: bool = True,
    plot: bool = True,
    crop_blank: bool = True,
    videos: Sequence[Any] = (),
    per_row: int = _PER_ROW,
    setting: VisionPulse | None = None,
) -> dict[str, Path]:
    """strip.png (+ steps.gif, stats.png) for one generation with VisionPulse; with videos (the ones
    given to generate: paths, bytes or Video) also frames.png, one row per frame chunk. ``setting``:
    the VisionPulse given to generate, for the titles (default: what the report tells of it)."""
    rep = result.visionpulse
    if rep is None or not rep.steps:
        raise ValueError(
            "this generation has no VisionPulse steps: generate with visionpulse=5 (or 10) and at least two tokens"
        )
    setting = setting or report_setting(rep)
    name = setting.label()
    kept = [s.kept for s in rep.steps]
    caps = [model.token_to_bytes(t).decode("utf-8", errors="replace") for t in result.tokens[1 : 1 + len(kept)]]
    caps += [""] * (len(kept) - len(caps))
    spans = result.images
    pics = span_pictures(model, spans, images, videos)  # each video decoded once, for every picture
    out = Path(out_dir)
    res = {
        "strip": kept_strip(
            pics,
            spans,
            kept,
            caps,
            out / "strip.png",
            n_frames,
            every,
            crop_blank=crop_blank,
            per_row=per_row,
            setting=name,
        )
    }
    if gif:
        res["gif"] = kept_gif(
            pics, spans, kept, caps, out / "steps.gif", every or 1, crop_blank=crop_blank, per_row=per_row, setting=name
        )
    if any(sp.frame >= 0 for sp in spans):
        res["frames"] = kept_frames(pics, spans, kept, caps, out / "frames.png", n_frames, every, crop_blank=crop_blank)
    if plot:
        res["plot"] = stats_plot(rep, out / "stats.png", setting)
    return res
