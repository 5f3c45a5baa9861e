"""What a generation returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # visionpulse loads libllama; a result can be read without it
    from .visionpulse import VisionPulseReport


@dataclass
class Timings:
    """Wall-clock timings of one generation, in milliseconds (rates in tokens/s)."""

    image_encode_ms: float = 0.0  # vision encoder + projector, all images
    prefill_ms: float = 0.0  # text and image-embedding prefill into the KV cache
    decode_ms: float = 0.0  # generated tokens after the first
    n_decode: int = 0  # tokens timed by decode_ms

    @property
    def prefill_tok_s(self) -> float:
        return 0.0 if self.prefill_ms <= 0 else 1000.0 * self._n_prefill / self.prefill_ms

    @property
    def decode_tok_s(self) -> float:
        return 0.0 if self.decode_ms <= 0 else 1000.0 * self.n_decode / self.decode_ms

    _n_prefill: int = field(default=0, repr=False)

    def to_dict(self) -> dict[str, float]:
        return {
            "image_encode_ms": round(self.image_encode_ms, 3),
            "prefill_ms": round(self.prefill_ms, 3),
            "prefill_tok_s": round(self.prefill_tok_s, 2),
            "decode_ms": round(self.decode_ms, 3),
            "decode_tok_s": round(self.decode_tok_s, 2),
        }


@dataclass
class ImageSpan:
    """Where one image chunk sits in the sequence: its first position, its token grid."""

    pos: int  # position of its first token
    n_tokens: int
    n_pos: int  # positions it takes (M-RoPE: max(nx, ny); else n_tokens)
    nx: int  # token grid columns, as libmtmd reports them
    ny: int  # token grid rows (1 for projectors that report a flat sequence)
    media: int = 0  # which image or video of the request (in the order they were given)
    frame: int = -1  # a video's first frame in this chunk (-1: a still image)
    n_frames: int = 1  # frames in this chunk (2 where the model merges frame pairs, as Qwen-VL does)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the image's tokens; a flat square sequence is read as a square."""
        if self.ny > 1:
            return self.ny, self.nx
        side = round(self.n_tokens**0.5)
        return (side, side) if side * side == self.n_tokens else (1, self.n_tokens)


def locate(spans: list[ImageSpan], ordinal: int) -> tuple[int, int, int]:
    """(image index, row, col) of a visual-token ordinal (as VisionPulse reports kept tokens)."""
    if ordinal < 0:
        raise IndexError(ordinal)
    for i, sp in enumerate(spans):
        if ordinal < sp.n_tokens:
            _rows, cols = sp.grid
            return i, ordinal // cols, ordinal % cols
        ordinal -= sp.n_tokens
    raise IndexError("ordinal beyond the images of this prompt")


def locate_frame(spans: list[ImageSpan], ordinal: int) -> tuple[int, int, int, int]:
    """(media index, frame, row, col) of a visual-token ordinal; frame -1 for a still image, and a
    chunk of merged frames answers its first frame."""
    i, row, col = locate(spans, ordinal)
    return spans[i].media, spans[i].frame, row, col


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    n_prompt_tokens: int  # every position in the prompt: text and image tokens
    n_image_tokens: int  # of which image tokens
    n_generated: int
    stop_reason: str  # "eos" | "stop" (a stop string) | "length" | "context"
    timings: Timings
    visionpulse: VisionPulseReport | None = None  # when a selection mode was on
    images: list[ImageSpan] = field(default_factory=list)
    n_cached_tokens: int = 0  # prompt tokens whose KV an earlier request left in the cache (cache_prompt)

    def to_dict(self, per_step: bool = True) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("timings", "visionpulse", "images")}
        d["timings"] = self.timings.to_dict()
        if self.visionpulse is not None:
            d["visionpulse"] = self.visionpulse.to_dict(per_step=per_step)
        return d
