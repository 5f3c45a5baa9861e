"""Stop sequences: text pieces in, the text to show out, until a stop sequence appears.

A piece that could be the start of a stop sequence is held back until the next pieces decide, so
that a stop sequence is never shown, even in part (as llama.cpp's server and OpenAI do)."""

from __future__ import annotations

from collections.abc import Sequence


class StopScanner:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""  # text not shown yet: it may begin a stop sequence
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The part of ``piece`` (with what was held) that is safe to show; sets ``stopped`` when a
        stop sequence is complete (the text before it is returned, the rest dropped)."""
        if not self.stops:
            return piece
        text = self.held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held, self.stopped = "", True
            return text[:cut]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What was held back when generation ends without a stop sequence."""
        out, self.held = self.held, ""
        return out
