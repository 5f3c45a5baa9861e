"""Pictures of what VisionPulse keeps: per-step maps of the kept patches over the image."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from ..result import ImageSpan, locate


def kept_strip(image: str | Path | Image.Image, spans: Sequence[ImageSpan], kept_per_step: Sequence[Sequence[int]],
               captions: Sequence[str], out_path: str | Path, n_frames: int = 8, scale: int = 2) -> Path:
    """A strip of frames, early to late steps: the first image with the patches kept at that
    step outlined in red (the rest dimmed), the token the step produced written under it."""
    base = (Image.open(image) if not isinstance(image, Image.Image) else image).convert("RGB")
    rows, cols = spans[0].grid
    W, H = base.width * scale, base.height * scale
    pw, ph = W / cols, H / rows
    # drop the empty rows at the bottom (and keep every row a kept patch is in)
    import numpy as np
    ink_rows = np.nonzero((np.asarray(base.convert("L")) < 250).any(axis=1))[0]
    last = int(ink_rows[-1] * rows // base.height) if len(ink_rows) else 0
    for kept in kept_per_step:
        for o in kept:
            i, r, _ = locate(list(spans), o)
            if i == 0:
                last = max(last, r)
    H = int(round((last + 1) * ph))
    n = len(kept_per_step)
    picks = sorted({round(i * (n - 1) / max(n_frames - 1, 1)) for i in range(min(n_frames, n))}) if n else []
    font = ImageFont.load_default(size=14)
    cap_h = 40
    strip = Image.new("RGB", (max(1, len(picks)) * (W + 8), H + cap_h), (255, 255, 255))
    big = base.resize((W, int(round(rows * ph))), Image.NEAREST).crop((0, 0, W, H))
    for f, step in enumerate(picks):
        frame = Image.blend(big, Image.new("RGB", (W, H), (255, 255, 255)), 0.6)
        d = ImageDraw.Draw(frame)
        for o in kept_per_step[step]:
            img_i, r, c = locate(list(spans), o)
            if img_i != 0:
                continue
            box = (int(c * pw), int(r * ph), int((c + 1) * pw) - 1, int((r + 1) * ph) - 1)
            frame.paste(big.crop(box), box[:2])
            d.rectangle(box, outline=(220, 30, 30), width=2)
        x = f * (W + 8)
        strip.paste(frame, (x, 0))
        d2 = ImageDraw.Draw(strip)
        d2.text((x + 4, H + 4), f"step {step + 1}: {captions[step]!r}", fill=(0, 0, 0), font=font)
        d2.text((x + 4, H + 21), f"kept {len(kept_per_step[step])}", fill=(90, 90, 90), font=font)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(out_path)
    return out_path
