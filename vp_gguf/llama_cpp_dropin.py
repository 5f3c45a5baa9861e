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
embeddings, which marks their KV cells as visual, and every decode step of the
generation after them selects. Prompt processing stays dense and is no step,
however llama-cpp-python splits it (a one-token last ``n_batch`` piece, the last
token re-evaluated on a cache hit): the library is told when the prompt ends.
"static" ranks the image at the first generated token's step. Text-only requests
have no visual cells and are untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .visionpulse import VisionPulse, VisionPulseControl, VisionPulseReport


class VisionPulseSession:
    """What ``enable_visionpulse`` installs on a Llama; ``disable()`` restores it."""

    def __init__(self, llm: Any, vp: VisionPulse, per_step: bool = False) -> None:
        self.llm, self.vp, self.per_step = llm, vp, per_step
        self.last_report: VisionPulseReport | None = None
        self._orig = llm.create_chat_completion
        self._control = VisionPulseControl(self._ctx)
        self._control.apply(vp)  # refuses bad settings (e.g. an anchor out of range) now
        llm.create_chat_completion = self.create_chat_completion
        llm.visionpulse = self

    @property
    def _ctx(self):
        return self.llm._ctx.ctx

    def disable(self) -> None:
        self._control.apply(None)
        self.llm.create_chat_completion = self._orig
        if getattr(self.llm, "visionpulse", None) is self:
            del self.llm.visionpulse

    # -- per request ------------------------------------------------------------------

    def _usage(self, report: VisionPulseReport) -> dict[str, Any] | None:
        report.record(self._ctx, self.per_step)  # the last step decoded after the last sampling
        self.last_report = report
        return report.usage(self.per_step)

    def create_chat_completion(self, *args: Any, **kwargs: Any):
        import llama_cpp

        self._control.new_prompt()  # however the handler and Llama.eval split the prompt, it is no step
        user_lp = kwargs.get("logits_processor")
        report: VisionPulseReport | None = None

        def record(input_ids, scores):  # called once per generated token, after its step's decode
            nonlocal report
            if report is not None:
                report.record(self._ctx, self.per_step)
            else:  # the first call: the logits of the (dense) prompt; from the next decode on, steps
                self._control.begin_generation()
                report = self._control.report()
            self._control.before_step(len(report.steps) + 1)
            return scores

        kwargs["logits_processor"] = llama_cpp.LogitsProcessorList([record, *(user_lp or [])])
        out = self._orig(*args, **kwargs)
        if not kwargs.get("stream"):
            u = self._usage(report) if report is not None else None
            if u is not None:
                out.setdefault("usage", {})["visionpulse"] = u
            return out
        return self._stream(out, lambda: report)

    def _stream(self, chunks: Iterator[dict], report_of: Callable[[], VisionPulseReport | None]) -> Iterator[dict]:
        prev = None
        for ch in chunks:
            if prev is not None:
                yield prev
            prev = ch
        if prev is not None:
            report = report_of()  # known once the first token was sampled
            u = self._usage(report) if report is not None else None  # include_usage: on the last chunk
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
    from . import _log

    # llama-cpp-python routes libllama's logs by its verbose flag but leaves libmtmd printing its
    # per-image debug lines: ours route both, quiet unless the Llama is verbose
    _log.install(bool(getattr(llm, "verbose", False)))
    old = getattr(llm, "visionpulse", None)
    if isinstance(old, VisionPulseSession):
        old.disable()
    return VisionPulseSession(llm, vp, per_step)
