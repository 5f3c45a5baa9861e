"""VisionPulse on an existing ``llama_cpp.Llama``, in one call.

    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Qwen25VLChatHandler
    import vp_gguf

    llm = Llama("model.gguf", chat_handler=Qwen25VLChatHandler(clip_model_path="mmproj.gguf"), n_ctx=8192)
    vp_gguf.enable_visionpulse(llm, 5)
    out = llm.create_chat_completion(messages=[...])     # image_url parts, as before
    out["usage"]["visionpulse"]                          # mean retention, steps pruned

``import vp_gguf`` makes ``llama_cpp`` load vp-gguf's patched libraries, so any
multimodal chat handler (``Llava15ChatHandler``, ``Qwen25VLChatHandler``,
``MTMDChatHandler``, ...) works unchanged: image chunks are decoded from
embeddings, which marks their KV cells as visual, and every single-token decode
step of the generation after them selects. Prompt processing stays dense and is
no step, however llama-cpp-python splits it (a one-token last ``n_batch`` piece,
the last token re-evaluated on a cache hit). Text-only requests have no visual
cells and are untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from . import _vp_ctypes as V
from .visionpulse import VisionPulse, VisionPulseReport


class VisionPulseSession:
    """What ``enable_visionpulse`` installs on a Llama; ``disable()`` restores it."""

    def __init__(self, llm: Any, vp: VisionPulse, per_step: bool = False) -> None:
        self.llm, self.vp, self.per_step = llm, vp, per_step
        self.last_report: VisionPulseReport | None = None
        self._orig = llm.create_chat_completion
        vp.enable(self._ctx)  # refuses bad settings (e.g. an anchor out of range) now
        llm.create_chat_completion = self.create_chat_completion
        llm.visionpulse = self

    @property
    def _ctx(self):
        return self.llm._ctx.ctx

    def disable(self) -> None:
        V.llama_vp_disable(self._ctx)
        self.llm.create_chat_completion = self._orig
        if getattr(self.llm, "visionpulse", None) is self:
            del self.llm.visionpulse

    # -- per request ------------------------------------------------------------------

    def _begin(self) -> VisionPulseReport:
        V.llama_vp_reset(self._ctx, -1)
        # the anchor is known once VisionPulse is on again (_start_generation)
        return VisionPulseReport(mode=self.vp.mode, anchor_layer=-1, settings=self.vp.resolved(), steps=[])

    def _usage(self, report: VisionPulseReport) -> dict[str, Any] | None:
        report.record(self._ctx, self.per_step)  # the last step decoded after the last sampling
        self.last_report = report
        return report.usage(self.per_step)

    def _start_generation(self, report: VisionPulseReport) -> None:
        """The prompt is processed: from the next decode on, each one is a step."""
        if self.vp.mode != "static":  # (the reset before each request cleared a forced set: enable sets it again)
            self.vp.enable(self._ctx)
        report.anchor_layer = V.llama_vp_anchor_layer(self._ctx)
        report._last_step = V.step_no(self._ctx, 0)  # what ran before (static's rank-only prompt token) is no step

    def create_chat_completion(self, *args: Any, **kwargs: Any):
        import llama_cpp

        report = self._begin()
        # Dense prompt processing: the handler and Llama.eval may decode its text one token at a time.
        # Static stays on: its one-token decode of the last prompt token ranks the image, pruning nothing.
        if self.vp.mode != "static":
            V.llama_vp_disable(self._ctx)
        user_lp = kwargs.get("logits_processor")
        generating = False

        def record(input_ids, scores):  # called once per generated token, after its step's decode
            nonlocal generating
            if generating:
                report.record(self._ctx, self.per_step)
            else:  # the first call: the logits of the (dense) prompt
                generating = True
                self._start_generation(report)
            return scores

        kwargs["logits_processor"] = llama_cpp.LogitsProcessorList([record, *(user_lp or [])])
        out = self._orig(*args, **kwargs)
        if not kwargs.get("stream"):
            u = self._usage(report)
            if u is not None:
                out.setdefault("usage", {})["visionpulse"] = u
            return out
        return self._stream(out, report)

    def _stream(self, chunks: Iterator[dict], report: VisionPulseReport) -> Iterator[dict]:
        prev = None
        for ch in chunks:
            if prev is not None:
                yield prev
            prev = ch
        if prev is not None:
            u = self._usage(report)  # OpenAI's include_usage convention: usage on the last chunk
            if u is not None:
                prev.setdefault("usage", {})["visionpulse"] = u
            yield prev


def enable_visionpulse(
    llm: Any, visionpulse: VisionPulse | str | int = 5, *, per_step: bool = False
) -> VisionPulseSession:
    """Turn VisionPulse on for ``llm`` (a ``llama_cpp.Llama``); returns the session (``.disable()``).

    ``visionpulse``: 5, 10 or a :class:`VisionPulse`. ``per_step=True`` adds every step's
    kept tokens to ``usage["visionpulse"]["steps"]``."""
    vp = VisionPulse.parse(visionpulse)
    if vp is None:
        raise ValueError(
            "enable_visionpulse needs a preset (5 or 10) or a VisionPulse; to switch it off, "
            "call .disable() on the session it returned"
        )
    vp.check()
    old = getattr(llm, "visionpulse", None)
    if isinstance(old, VisionPulseSession):
        old.disable()
    return VisionPulseSession(llm, vp, per_step)
