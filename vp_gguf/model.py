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
from . import _vp_ctypes as V
from ._libs import llama_cpp as L
from .decoding import check_decode, eval_prompt
from .errors import ModelBusyError, ModelClosedError
from .loading import DEFAULT_MARKER, LoadedModel, ModelParams
from .prompt import ChatTemplateChoice, MediaInput, Prepared, free_prepared, image_spans, media_list, prepare
from .prompt import apply_chat_template as _apply_chat_template
from .result import GenerationResult, ImageSpan, Timings
from .sampler import Sampler, grammar_text, parse_grammar
from .sampling import INT32_MAX, SamplingParams, int_arg
from .stops import StopScanner
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
        # Who uses the native handles, so that close() never frees them under a call (guarded by _state):
        # _users counts the calls under way (a generation is one until it ends, a suspended stream too),
        # _generating says one of them is a generation (one at a time: one context, one KV cache).
        self._state = threading.Lock()
        self._closed = False
        self._generating = False
        self._users = 0
        self.last_result: GenerationResult | None = None
        self.image_spans: list[ImageSpan] = []  # where the last prompt's images went in the KV cache
        super().__init__(model_path, mmproj_path, params)
        self._vp = VisionPulseControl(self._ctx)
        # read once: token ids are checked against it on every call, and it must answer after close()
        self._n_vocab = int(L.llama_vocab_n_tokens(self._vocab))
        self._n_embd = int(L.llama_model_n_embd(self._model))
        self.n_layer: int = int(L.llama_model_n_layer(self._model))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # at interpreter exit the ctypes layer may already be gone: nothing left to free then
        with contextlib.suppress(Exception):
            self.close()

    # -- the native handles' life ----------------------------------------------------------
    def close(self) -> None:
        """Free the native model, context and projector; safe from any thread, at any time.

        A call using them meanwhile (a generation in another thread, a stream not run to its end) keeps
        them until it ends, and the last one out frees them; a generation stops at its next step with
        ModelClosedError. Why not wait for it instead: a stream is a generator that its consumer may
        resume late or never (or only after close() returns, in the same thread): waiting would hang."""
        state = getattr(self, "_state", None)
        if state is None:  # __init__ failed before the guard existed (nothing was loaded then)
            super().close()
            return
        with state:
            self._closed = True
            if self._users == 0:
                super().close()

    @contextlib.contextmanager
    def _native(self, generation: bool = False) -> Iterator[None]:
        """Hold the native handles for one call: refused once closed, never freed under it. A
        generation (anything that decodes into the context or encodes with the projector) is
        exclusive; reading the model or its vocabulary can run beside one."""
        with self._state:
            self._check_open()
            if generation:
                self.check_rpc()  # a model that lost an RPC server has lost its layers there
                if self._generating:
                    raise ModelBusyError("this VisionModel is already generating (one generation at a time)")
                self._generating = True
            self._users += 1
        try:
            yield
        finally:
            with self._state:
                self._users -= 1
                if generation:
                    self._generating = False
                if self._closed and self._users == 0:
                    super().close()  # close() came meanwhile: the last user frees

    def _check_open(self, doing: str = "") -> None:
        if self._closed:
            raise ModelClosedError(f"this VisionModel was closed{doing}: load the model again to use it")

    # -- tokens --------------------------------------------------------------------------
    @property
    def n_embd(self) -> int:
        self._check_open()
        return self._n_embd

    @property
    def n_vocab(self) -> int:
        self._check_open()
        return self._n_vocab

    def token_id(self, token: object) -> int:
        """``token`` as a token id of this model; an id outside its vocabulary is refused here
        (llama.cpp would abort the process on it)."""
        return int_arg("token id", token, 0, self._n_vocab - 1, "the ids of this model's vocabulary")

    def token_to_bytes(self, token: int, special: bool = True) -> bytes:
        tok = self.token_id(token)
        with self._native():
            return self._piece(tok, special)

    def _piece(self, tok: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)]

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        toks = [self.token_id(t) for t in tokens]
        with self._native():
            return b"".join(self._piece(t, special) for t in toks).decode("utf-8", errors="replace")

    def apply_chat_template(self, prompt: str | Sequence[dict[str, str]], template: str | None = None) -> str:
        """A prompt as one user turn, or a list of {"role", "content"} messages, in the chat template,
        ending with the assistant's turn to speak. ``template``: one of llama.cpp's names (``chatml``,
        ``gemma``, ...) or a Jinja file; default ``ModelParams.chat_template``, else the model's own
        (a model without one gets chatml, with a warning)."""
        with self._native():
            return _apply_chat_template(self, prompt, template)

    def prepare(
        self,
        prompt: str,
        images: Sequence[MediaInput] = (),
        chat_template: ChatTemplateChoice = False,
        videos: Sequence[VideoInput] = (),
    ) -> Prepared:
        """The prompt and media as libmtmd chunks (a context manager that frees them), for tools of one's own."""
        media = media_list(images, videos)
        with self._native(generation=True):  # the projector's context: the one a generation encodes with
            return prepare(self, prompt, media, chat_template)

    # -- generation ----------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        images: Sequence[MediaInput] = (),
        max_tokens: int = 128,
        sampling: SamplingParams | None = None,
        chat_template: ChatTemplateChoice = False,
        visionpulse: VisionPulse | str | int | None = None,
        videos: Sequence[VideoInput] = (),
        cache_prompt: bool = False,
        stop: Sequence[str] = (),
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
        ``stop``: strings that end the generation where they appear (not shown; stop_reason "stop").
        ``chat_template``: False sends the prompt raw; True wraps it as one user turn in the chat
        template (``ModelParams.chat_template``, else the model's own); a llama.cpp name or a Jinja
        file names the template for this call (see ``apply_chat_template``).
        """
        for _ in self.stream(
            prompt,
            images,
            max_tokens,
            sampling,
            chat_template,
            visionpulse,
            videos=videos,
            cache_prompt=cache_prompt,
            stop=stop,
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
        chat_template: ChatTemplateChoice = False,
        visionpulse: VisionPulse | str | int | None = None,
        videos: Sequence[VideoInput] = (),
        cache_prompt: bool = False,
        stop: Sequence[str] = (),
    ) -> Iterator[str]:
        """Like generate(), yielding text pieces as they are produced; the full result is
        in ``last_result`` afterwards."""
        media = media_list(images, videos)
        max_tokens = int_arg("max_tokens", max_tokens, 0, INT32_MAX)
        sampling = sampling or SamplingParams()
        sampling.check()  # the grammar's syntax is checked when _run builds the sampler, before any work
        vp = self._parse_vp(visionpulse)
        with self._native(generation=True):
            yield from self._run(prompt, media, max_tokens, sampling, chat_template, vp, cache_prompt, stop)

    def check_sampling(self, sampling: SamplingParams) -> None:
        """Refuse (InvalidArgumentError) sampling settings this model cannot generate with: the ranges,
        and the grammar or JSON schema, parsed against this model's vocabulary; generate() checks the
        same, this is for checking them before a generation is queued (the server does)."""
        sampling.check()
        text = grammar_text(sampling)
        if text is not None:  # only the grammar needs the vocabulary: parsed, then freed
            with self._native():
                L.llama_sampler_free(parse_grammar(self._vocab, text))

    def _parse_vp(self, spec: VisionPulse | str | int | None) -> VisionPulse | None:
        """The settings, checked against this model's layers (C checks the rest when they are applied)."""
        vp = VisionPulse.parse(spec)
        if vp is not None:
            vp.check(self.n_layer)
        return vp

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
        vp = self._parse_vp(visionpulse)
        forced = [self.token_id(t) for t in tokens]  # each one reaches llama_decode
        media = media_list(images, videos)
        with self._native(generation=True):
            return self._forced(prompt, media, forced, vp, after_prefill, before_step, cache_prompt)

    def _forced(self, prompt, media, tokens, vp, after_prefill, before_step, cache_prompt):
        import numpy as np

        n_vocab = self._n_vocab
        out = np.zeros((len(tokens), n_vocab), dtype=np.float32)
        prep = None
        try:
            self._vp.apply(vp)
            prep = prepare(self, prompt, media, False)
            n_past, _ = eval_prompt(self, prep, Timings(), self._vp, reuse=cache_prompt)
            self.image_spans = image_spans(prep)
            if after_prefill is not None:
                self._kv_units = []  # its edits make the cache no prompt's to keep
                after_prefill(self, list(self.image_spans))
            report = self._start_vp()
            tok_arr = (L.llama_token * 1)()
            for i, tok in enumerate(tokens):
                ptr = L.llama_get_logits_ith(self._ctx, -1)
                if self.rpc_servers:
                    self.check_rpc()
                out[i] = np.ctypeslib.as_array(ptr, shape=(n_vocab,))
                if i == len(tokens) - 1:
                    break
                tok_arr[0] = tok
                self._vp.before_step(i + 1)
                if before_step is not None:
                    before_step(self, i + 1)
                self._check_open(" while generating")  # perhaps by before_step: its handles live until we return
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

    def trace_backends(self, on: bool = True) -> None:
        """From the next step on, record which backend (CPU, a GPU, an RPC server) ran each op that
        VisionPulse built; ``op_backends`` reads the last step's record."""
        with self._native():
            V.llama_vp_trace_backends(self._ctx, on)

    def op_backends(self) -> dict[str, dict[str, int]]:
        """The last traced step with a selection: op name -> backend name -> how many such ops it ran."""
        with self._native():
            return V.op_backends(self._ctx)

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
        chat_template: ChatTemplateChoice,
        vp: VisionPulse | None,
        cache_prompt: bool,
        stop_strings: Sequence[str] = (),
    ) -> Iterator[str]:
        self.last_result = None
        _log.clear()
        self._vp.apply(vp)  # refuses bad settings (e.g. an anchor out of range) before any work
        sampler = Sampler(self._vocab, self._n_vocab, sampling, self.n_ctx)  # and a grammar that does not parse
        try:
            prep = prepare(self, prompt, images, chat_template)
        except BaseException:
            sampler.close()
            raise
        t = Timings()
        tokens: list[int] = []
        text_parts: list[str] = []
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopScanner(stop_strings)
        stop = "length"
        tok_arr = (L.llama_token * 1)()
        try:
            n_past, n_cached = eval_prompt(self, prep, t, self._vp, reuse=cache_prompt)
            t._n_prefill = prep.n_tokens - n_cached
            if sampling.penalized:  # the prompt's text goes into the penalties' history
                sampler.remember([u[0] for u in self._kv_units if isinstance(u[0], int)])
            self.image_spans = image_spans(prep)
            report = self._start_vp()
            t_dec = None
            # KV cells in use: with M-RoPE (Qwen2-VL) an image takes fewer positions than cells, so the
            # next position (n_past) says nothing of the room left; the cells do, on every family
            n_cells = prep.n_tokens
            while len(tokens) < max_tokens:
                self._check_open(" while generating")  # close() came (from another thread, or while we yielded)
                tok = sampler.sample(self._ctx)
                if self.rpc_servers:
                    self.check_rpc()  # a server lost during this step left zeros for its logits
                if L.llama_vocab_is_eog(self._vocab, tok):
                    stop = "eos"
                    break
                tokens.append(tok)
                piece = stops.feed(utf8.decode(self._piece(tok, True)))
                if piece:
                    text_parts.append(piece)
                    yield piece
                if stops.stopped:
                    stop = "stop"
                    break
                if len(tokens) >= max_tokens:
                    break
                if n_cells >= self.n_ctx:
                    stop = "context"  # the text so far is the answer, as llama.cpp's server ends it
                    break
                if t_dec is None:
                    t_dec = time.perf_counter()
                tok_arr[0] = tok
                self._vp.before_step(t.n_decode + 1)
                rc = L.llama_decode(self._ctx, L.llama_batch_get_one(tok_arr, 1))
                if rc == 1:  # no KV slot for it (the cache's own count of room): a full context all the same
                    stop = "context"
                    break
                check_decode(self, rc, "a generated token")
                self._kv_units.append((tok, n_past, 1))
                n_past += 1
                n_cells += 1
                t.n_decode += 1
                if report is not None:
                    report.record(self._ctx)
            if t_dec is not None:
                t.decode_ms = (time.perf_counter() - t_dec) * 1e3
            tail = "" if stops.stopped else stops.feed(utf8.decode(b"", final=True))
            if stops.stopped:
                stop = "stop"
            else:
                tail += stops.flush()
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
            sampler.close()
            free_prepared(prep)
