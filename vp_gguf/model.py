"""VisionModel: a GGUF language model plus its mmproj, generating text from images.

The pipeline is libmtmd's own: the prompt holds one media marker per image,
``mtmd_tokenize`` splits it into text and image chunks, image chunks are
encoded by the projector and decoded into the KV cache by the mtmd helper,
and generation then runs token by token through ``llama_decode``.

The parts, in the order a request meets them: loading.py (files checked, the model, context and
projector loaded), prompt.py (prompt and images -> chunks), decoding.py (prefill, token decodes,
the sampler), visionpulse.VisionPulseControl (the selection's settings and phases); this file
holds the public class and the decode loop.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Iterator, Sequence

from typing_extensions import Self

from . import _log
from ._libs import llama_cpp as L
from .decoding import check_decode, eval_prompt, make_sampler
from .loading import DEFAULT_MARKER, LoadedModel, ModelParams
from .prompt import MediaInput, Prepared, free_prepared, image_spans, media_list, prepare
from .prompt import apply_chat_template as _apply_chat_template
from .result import GenerationResult, ImageSpan, Timings
from .sampling import SamplingParams
from .video import VideoInput
from .visionpulse import VisionPulse, VisionPulseControl, VisionPulseReport

__all__ = ["DEFAULT_MARKER", "ModelParams", "VisionModel"]


class VisionModel(LoadedModel):
    """A language model GGUF and its multimodal projector, ready to generate.

    >>> with VisionModel("model.gguf", "mmproj.gguf") as vm:           # doctest: +SKIP
    ...     print(vm.generate("What is in the image?", images=["cat.png"]).text)
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        mmproj_path: str | os.PathLike,
        params: ModelParams | None = None,
        **overrides,
    ) -> None:
        params = params or ModelParams()
        for k, v in overrides.items():
            if not hasattr(params, k):
                raise TypeError(f"unknown model parameter {k!r}")
            setattr(params, k, v)
        self._lock = threading.Lock()
        self.last_result: GenerationResult | None = None
        self.image_spans: list[ImageSpan] = []  # where the last prompt's images went in the KV cache
        super().__init__(model_path, mmproj_path, params)
        self._vp = VisionPulseControl(self._ctx)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # at interpreter exit the ctypes layer may already be gone: nothing left to free then
        with contextlib.suppress(Exception):
            self.close()

    # -- tokens --------------------------------------------------------------------------
    @property
    def n_embd(self) -> int:
        return L.llama_model_n_embd(self._model)

    def token_to_bytes(self, token: int, special: bool = True) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)]

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        return b"".join(self.token_to_bytes(t, special) for t in tokens).decode("utf-8", errors="replace")

    def apply_chat_template(self, prompt: str | Sequence[dict[str, str]]) -> str:
        """A prompt as one user turn, or a list of {"role", "content"} messages, in the model's own
        chat template, ending with the assistant's turn to speak."""
        return _apply_chat_template(self, prompt)

    def prepare(
        self,
        prompt: str,
        images: Sequence[MediaInput] = (),
        chat_template: bool = False,
        videos: Sequence[VideoInput] = (),
    ) -> Prepared:
        """The prompt and media as libmtmd chunks (a context manager that frees them), for tools of one's own."""
        return prepare(self, prompt, media_list(images, videos), chat_template)

    # -- generation ----------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        images: Sequence[MediaInput] = (),
        max_tokens: int = 128,
        sampling: SamplingParams | None = None,
        chat_template: bool = False,
        visionpulse: VisionPulse | str | int | None = None,
        videos: Sequence[VideoInput] = (),
        cache_prompt: bool = False,
    ) -> GenerationResult:
        """Generate text from images, videos and a prompt; returns the text, token ids, counts and timings.

        Images, then videos, go where the prompt holds the marker ``<__media__>`` (a ``Video`` may
        also sit among the images, in its place); a prompt without markers gets one per image and
        video in front of it (as llama-mtmd-cli does). A video is a path, bytes, or a ``Video``
        with its frame rate and frame cap; ffmpeg reads it.
        ``visionpulse``: None/"off" (dense), 5 or 10 (the presets), or a VisionPulse with
        any mode and knob; the per-step selection is reported in ``result.visionpulse``.
        ``cache_prompt``: keep what the KV cache holds of this prompt from the previous request
        (a conversation's earlier turns, their images included) and prefill only the rest, as
        llama.cpp's server does; ``result.n_cached_tokens`` says how much was kept.
        """
        for _ in self.stream(
            prompt, images, max_tokens, sampling, chat_template, visionpulse, videos=videos, cache_prompt=cache_prompt
        ):
            pass
        assert self.last_result is not None
        return self.last_result

    def stream(
        self,
        prompt: str,
        images: Sequence[MediaInput] = (),
        max_tokens: int = 128,
        sampling: SamplingParams | None = None,
        chat_template: bool = False,
        visionpulse: VisionPulse | str | int | None = None,
        videos: Sequence[VideoInput] = (),
        cache_prompt: bool = False,
    ) -> Iterator[str]:
        """Like generate(), yielding text pieces as they are produced; the full result is
        in ``last_result`` afterwards."""
        media = media_list(images, videos)
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        sampling = sampling or SamplingParams()
        sampling.check()
        vp = VisionPulse.parse(visionpulse)  # checked by C when applied, before any work
        if self._ctx is None:
            raise RuntimeError("this VisionModel was closed")
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this VisionModel is already generating (one generation at a time)")
        try:
            yield from self._run(prompt, media, max_tokens, sampling, chat_template, vp, cache_prompt)
        finally:
            self._lock.release()

    def teacher_forced(
        self,
        prompt: str,
        images: Sequence[MediaInput],
        tokens: Sequence[int],
        visionpulse: VisionPulse | str | int | None = None,
        after_prefill=None,
        before_step=None,
        videos: Sequence[VideoInput] = (),
        cache_prompt: bool = False,
    ):
        """Logits at every step when ``tokens`` are fed as the answer (no sampling).

        Returns ``(logits, report)``: logits is a float32 array [len(tokens), n_vocab] whose
        row i predicts tokens[i] (row 0 comes from the dense prefill); report holds the
        per-step VisionPulse selection (or None). ``after_prefill(model, image_spans)``, if
        given, runs between the prompt and the first forced token (tests use it to edit the cache);
        ``before_step(model, i)`` runs before decode step i (i = 1 for the first decoded token;
        the replay oracle forces each step's set there). ``videos`` and ``cache_prompt`` as in generate()."""
        import numpy as np

        vp = VisionPulse.parse(visionpulse)  # checked by C when applied, before any work
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this VisionModel is already generating (one generation at a time)")
        n_vocab = self.n_vocab
        out = np.zeros((len(tokens), n_vocab), dtype=np.float32)
        prep = None
        try:
            self._vp.apply(vp)
            prep = prepare(self, prompt, media_list(images, videos), False)
            n_past, _ = eval_prompt(self, prep, Timings(), self._vp, reuse=cache_prompt)
            self.image_spans = image_spans(prep)
            if after_prefill is not None:
                self._kv_units = []  # its edits make the cache no prompt's to keep
                after_prefill(self, list(self.image_spans))
            report = self._start_vp()
            tok_arr = (L.llama_token * 1)()
            for i, tok in enumerate(tokens):
                ptr = L.llama_get_logits_ith(self._ctx, -1)
                out[i] = np.ctypeslib.as_array(ptr, shape=(n_vocab,))
                if i == len(tokens) - 1:
                    break
                tok_arr[0] = tok
                self._vp.before_step(i + 1)
                if before_step is not None:
                    before_step(self, i + 1)
                check_decode(self, L.llama_decode(self._ctx, L.llama_batch_get_one(tok_arr, 1)), "a forced token")
                if self._kv_units:
                    self._kv_units.append((tok, n_past, 1))
                n_past += 1
                if report is not None:
                    report.record(self._ctx)
            return out, report
        finally:
            if prep is not None:
                free_prepared(prep)
            self._lock.release()

    def _start_vp(self) -> VisionPulseReport | None:
        """The prompt is in: from the next decode on, each one is a VisionPulse step."""
        self._vp.begin_generation()
        return self._vp.report()

    def _run(
        self,
        prompt: str,
        images: list,
        max_tokens: int,
        sampling: SamplingParams,
        chat_template: bool,
        vp: VisionPulse | None,
        cache_prompt: bool,
    ) -> Iterator[str]:
        self.last_result = None
        _log.clear()
        self._vp.apply(vp)  # refuses bad settings (e.g. an anchor out of range) before any work
        prep = prepare(self, prompt, images, chat_template)
        t = Timings()
        sampler = make_sampler(sampling)
        tokens: list[int] = []
        text_parts: list[str] = []
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stop = "length"
        tok_arr = (L.llama_token * 1)()
        try:
            n_past, n_cached = eval_prompt(self, prep, t, self._vp, reuse=cache_prompt)
            t._n_prefill = prep.n_tokens - n_cached
            self.image_spans = image_spans(prep)
            report = self._start_vp()
            t_dec = None
            while len(tokens) < max_tokens:
                tok = L.llama_sampler_sample(sampler, self._ctx, -1)
                if L.llama_vocab_is_eog(self._vocab, tok):
                    stop = "eos"
                    break
                tokens.append(tok)
                piece = utf8.decode(self.token_to_bytes(tok, special=True))
                if piece:
                    text_parts.append(piece)
                    yield piece
                if len(tokens) >= max_tokens:
                    break
                if n_past >= self.n_ctx:
                    stop = "context"
                    break
                if t_dec is None:
                    t_dec = time.perf_counter()
                tok_arr[0] = tok
                self._vp.before_step(t.n_decode + 1)
                rc = L.llama_decode(self._ctx, L.llama_batch_get_one(tok_arr, 1))
                check_decode(self, rc, "a generated token")
                self._kv_units.append((tok, n_past, 1))
                n_past += 1
                t.n_decode += 1
                if report is not None:
                    report.record(self._ctx)
            if t_dec is not None:
                t.decode_ms = (time.perf_counter() - t_dec) * 1e3
            tail = utf8.decode(b"", final=True)
            if tail:
                text_parts.append(tail)
                yield tail
            self.last_result = GenerationResult(
                text="".join(text_parts),
                tokens=tokens,
                n_prompt_tokens=prep.n_tokens,
                n_image_tokens=prep.n_image_tokens,
                n_generated=len(tokens),
                stop_reason=stop,
                timings=t,
                visionpulse=report,
                images=list(self.image_spans),
                n_cached_tokens=n_cached,
            )
        finally:
            L.llama_sampler_free(sampler)
            free_prepared(prep)
