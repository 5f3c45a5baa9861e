"""Glyphs: one image patch per token.

Each glyph is a character rendered with Pillow's built-in font into one
patch-sized tile. A glyph image is a grid of such tiles, read row-major, so an
image "spells" a token sequence: the projector (projector.py) maps each tile to
the input embedding of the token it shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PATCH = 14  # CLIP-style patch size of the testbed projector
BLANK = " "  # an empty tile reads as a space token
CHARS = "0123456789ABCDEFGHKLMNPRSUVWXYZ:,.|=- "  # tiles must be linearly independent: no I/T (same tile at 14 px), O/Q (like 0)


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@cache
def tile(ch: str, patch: int = PATCH) -> np.ndarray:
    """The uint8 RGB tile of one character, pure black on white, patch x patch x 3.

    Pure black and white keeps every pixel exact through libmtmd's F16 im2col
    (0 and 1 after normalisation), which the projector's exactness relies on."""
    img = Image.new("L", (patch, patch), 255)
    if ch != BLANK:
        d = ImageDraw.Draw(img)
        f = _font(patch - 2)
        l, t, r, b = d.textbbox((0, 0), ch, font=f)
        d.text(((patch - (r - l)) / 2 - l, (patch - (b - t)) / 2 - t), ch, fill=0, font=f)
    ink = np.asarray(img) < 160
    out = np.full((patch, patch, 3), 255, dtype=np.uint8)
    out[ink] = 0
    return out


@dataclass(frozen=True)
class GlyphGrid:
    """A square image of n_side x n_side tiles."""

    n_side: int
    patch: int = PATCH

    @property
    def size(self) -> int:
        return self.n_side * self.patch

    @property
    def n_cells(self) -> int:
        return self.n_side * self.n_side

    def render(self, text: str, fill: str = BLANK) -> Image.Image:
        """One character per tile, row-major; the rest of the grid holds `fill`."""
        if len(text) > self.n_cells:
            raise ValueError(f"{len(text)} characters do not fit in {self.n_cells} tiles")
        cells = list(text) + [fill] * (self.n_cells - len(text))
        arr = np.empty((self.size, self.size, 3), dtype=np.uint8)
        for i, ch in enumerate(cells):
            if ch not in CHARS:
                raise ValueError(f"no glyph for {ch!r}; glyphs: {CHARS!r}")
            r, c = divmod(i, self.n_side)
            arr[r * self.patch : (r + 1) * self.patch, c * self.patch : (c + 1) * self.patch] = tile(ch, self.patch)
        return Image.fromarray(arr)
