"""Pictures of what VisionPulse keeps, step by step.

    res = vm.generate(prompt, images=[...], visionpulse=5)
    vp_gguf.viz.visualize(vm, res, images, "out/")   # strip.png, steps.gif, stats.png

Each frame shows every image of the prompt side by side, the patches kept at that
step outlined in red and the rest dimmed, with the token the step produced under it.
Patches are placed with the token grids libmtmd reports (``GenerationResult.images``),
so this works for every projector family and for several images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .result import ImageSpan, locate

_RED = (220, 30, 30)
_GAP = 8
_CAP_H = 40


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


class _Canvas:
    """The prompt's images scaled and laid side by side, with each visual ordinal's box."""

    def __init__(
        self,
        images: Sequence[Any],
        spans: Sequence[ImageSpan],
        scale: float,
        crop_blank: bool,
        keep_rows: dict[int, int],
    ) -> None:
        if len(images) != len(spans):
            raise ValueError(f"{len(images)} images for {len(spans)} image spans")
        self.spans = list(spans)
        self.parts, self.offsets = [], []
        x = 0
        for i, (img, sp) in enumerate(zip(images, spans)):
            base = _open(img)
            rows, cols = sp.grid
            f = max(scale, 6.0 * cols / base.width)  # at least 6 px per patch
            w, h = round(base.width * f), round(base.height * f)
            big = base.resize((w, h), Image.Resampling.NEAREST)
            shown = max(_blank_rows_from(base, rows), keep_rows.get(i, 0) + 1) if crop_blank else rows
            big = big.crop((0, 0, w, round(shown * h / rows)))
            self.parts.append((big, w / cols, h / rows))
            self.offsets.append(x)
            x += w + _GAP
        self.width = max(1, x - _GAP)
        self.height = max(p[0].height for p in self.parts)

    def frame(self, kept: Sequence[int]) -> Image.Image:
        out = Image.new("RGB", (self.width, self.height), (255, 255, 255))
        for (big, _, _), x in zip(self.parts, self.offsets):
            out.paste(Image.blend(big, Image.new("RGB", big.size, (255, 255, 255)), 0.6), (x, 0))
        d = ImageDraw.Draw(out)
        for o in kept:
            i, r, c = locate(self.spans, o)
            big, pw, ph = self.parts[i]
            box = (int(c * pw), int(r * ph), int((c + 1) * pw) - 1, int((r + 1) * ph) - 1)
            if box[1] >= big.height:
                continue
            out.paste(big.crop(box), (box[0] + self.offsets[i], box[1]))
            d.rectangle((box[0] + self.offsets[i], box[1], box[2] + self.offsets[i], box[3]), outline=_RED, width=2)
        return out


def _captioned(frame: Image.Image, step: int, caption: str, n_kept: int) -> Image.Image:
    font = ImageFont.load_default(size=14)
    out = Image.new("RGB", (max(frame.width, 150), frame.height + _CAP_H), (255, 255, 255))
    out.paste(frame, (0, 0))
    d = ImageDraw.Draw(out)
    d.text((4, frame.height + 4), f"step {step + 1}: {caption!r}", fill=(0, 0, 0), font=font)
    d.text((4, frame.height + 21), f"kept {n_kept}", fill=(90, 90, 90), font=font)
    return out


def pick_steps(n: int, n_frames: int = 8, every: int | None = None) -> list[int]:
    """Every ``every``-th step, else ``n_frames`` spread from the first to the last."""
    if n <= 0:
        return []
    if every:
        return list(range(0, n, every))
    return sorted({round(i * (n - 1) / max(n_frames - 1, 1)) for i in range(min(n_frames, n))})


def _canvas(images, spans, kept_per_step, scale, crop_blank) -> _Canvas:
    last: dict[int, int] = {}
    if crop_blank:
        for kept in kept_per_step:
            for o in kept:
                i, r, _ = locate(list(spans), o)
                last[i] = max(last.get(i, 0), r)
    return _Canvas(images, spans, scale, crop_blank, last)


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
) -> Path:
    """A PNG strip of frames, early to late (or every k steps)."""
    cv = _canvas(images, spans, kept_per_step, scale, crop_blank)
    frames = [
        _captioned(cv.frame(kept_per_step[s]), s, captions[s], len(kept_per_step[s]))
        for s in pick_steps(len(kept_per_step), n_frames, every)
    ]
    w = sum(f.width for f in frames) + _GAP * max(0, len(frames) - 1)
    strip = Image.new("RGB", (max(w, 1), cv.height + _CAP_H), (255, 255, 255))
    x = 0
    for f in frames:
        strip.paste(f, (x, 0))
        x += f.width + _GAP
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(out_path)
    return out_path


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
) -> Path:
    """An animated GIF, one frame per step (or every k steps)."""
    cv = _canvas(images, spans, kept_per_step, scale, crop_blank)
    frames = [
        _captioned(cv.frame(kept_per_step[s]), s, captions[s], len(kept_per_step[s]))
        for s in pick_steps(len(kept_per_step), every=max(1, every))
    ]
    if not frames:
        raise ValueError("no VisionPulse steps to draw")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(out_path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return out_path


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
) -> dict[str, Path]:
    """strip.png (+ steps.gif, stats.png) for one generation with VisionPulse."""
    rep = result.visionpulse
    if rep is None or not rep.steps:
        raise ValueError(
            "this generation has no VisionPulse steps: generate with visionpulse=5 (or 10) and at least two tokens"
        )
    kept = [s.kept for s in rep.steps]
    caps = [model.token_to_bytes(t).decode("utf-8", errors="replace") for t in result.tokens[1 : 1 + len(kept)]]
    caps += [""] * (len(kept) - len(caps))
    out = Path(out_dir)
    res = {
        "strip": kept_strip(
            images, result.images, kept, caps, out / "strip.png", n_frames, every, crop_blank=crop_blank
        )
    }
    if gif:
        res["gif"] = kept_gif(images, result.images, kept, caps, out / "steps.gif", every or 1, crop_blank=crop_blank)
    if plot:
        res["plot"] = stats_plot(rep, out / "stats.png")
    return res
