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
step after them selects. Text-only requests have no visual cells and are untouched.
"""
from __future__ import annotations

import ctypes
from typing import Any, Iterator

from . import _vp_ctypes as V
from .visionpulse import VisionPulse, VisionPulseReport


class VisionPulseSession:
    """What ``enable_visionpulse`` installs on a Llama; ``disable()`` restores it."""

    def __init__(self, llm: Any, vp: VisionPulse, per_step: bool = False) -> None:
        self.llm, self.vp, self.per_step = llm, vp, per_step
        self.last_report: VisionPulseReport | None = None
        self._orig = llm.create_chat_completion
        params = vp.to_c()
        if V.llama_vp_enable(self._ctx, ctypes.byref(params)) != 0:
            raise ValueError(f"VisionPulse: {V.last_error()}")
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
        return VisionPulseReport(mode=self.vp.mode, anchor_layer=V.llama_vp_anchor_layer(self._ctx),
                                 settings=self.vp.resolved(), steps=[])

    def _usage(self, report: VisionPulseReport) -> dict[str, Any] | None:
        report.record(self._ctx, self.per_step)  # the last step decoded after the last sampling
        self.last_report = report
        return report.usage(self.per_step)

    def create_chat_completion(self, *args: Any, **kwargs: Any):
        import llama_cpp
        report = self._begin()
        user_lp = kwargs.get("logits_processor")

        def record(input_ids, scores):  # called once per generated token, after its step's decode
            report.record(self._ctx, self.per_step)
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


def enable_visionpulse(llm: Any, visionpulse: VisionPulse | str | int = 5, *, per_step: bool = False) -> VisionPulseSession:
    """Turn VisionPulse on for ``llm`` (a ``llama_cpp.Llama``); returns the session (``.disable()``).

    ``visionpulse``: 5, 10 or a :class:`VisionPulse`. ``per_step=True`` adds every step's
    kept tokens to ``usage["visionpulse"]["steps"]``."""
    vp = VisionPulse.parse(visionpulse)
    if vp is None:
        raise ValueError("enable_visionpulse needs a preset (5 or 10) or a VisionPulse; to switch it off, "
                         "call .disable() on the session it returned")
    vp.check()
    old = getattr(llm, "visionpulse", None)
    if isinstance(old, VisionPulseSession):
        old.disable()
    return VisionPulseSession(llm, vp, per_step)
