"""VisionModel: a GGUF language model plus its mmproj, generating text from images.

The pipeline is libmtmd's own: the prompt holds one media marker per image,
``mtmd_tokenize`` splits it into text and image chunks, image chunks are
encoded by the projector and decoded into the KV cache by the mtmd helper,
and generation then runs token by token through ``llama_decode``.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typing_extensions import Self

from . import _log
from ._libs import llama_cpp as L
from ._libs import mtmd_cpp as M
from .errors import ContextOverflowError, DecodeError, ImageError, ModelFileError, ProjectorMismatchError, PromptError
from .gguf_file import read_gguf_info
from .images import ImageInput, load_bitmap
from .result import GenerationResult, ImageSpan, Timings
from .sampling import SamplingParams
from .visionpulse import VisionPulse, VisionPulseControl, VisionPulseReport

DEFAULT_MARKER = "<__media__>"
_FLASH_ATTN = {
    "auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
_KV_TYPES = {"f16": 1, "q8_0": 8}  # ggml_type ids
_NO_POST_DECODE = M.mtmd_helper_post_decode_callback()  # a NULL function pointer
_NON_CAUSAL_IMAGE_PROJECTORS = {"gemma3", "gemma4v", "gemma4uv", "deepseek4v"}


@dataclass
class ModelParams:
    """Load-time settings; names follow llama-cpp-python's ``Llama`` arguments."""

    n_ctx: int = 4096
    n_batch: int = 2048  # logical batch; image chunks are decoded in pieces of this size
    n_ubatch: int = 512  # physical batch (llama.cpp's default); raised for non-causal images
    n_threads: int | None = None  # None: all cores
    n_gpu_layers: int = 0  # -1 offloads every layer
    flash_attn: str = "auto"  # "on" | "off" | "auto"
    mmproj_use_gpu: bool = True  # the projector follows n_gpu_layers != 0 unless this is False
    warmup: bool = True  # run the projector once at load, as llama.cpp's tools do
    verbose: bool = False  # llama.cpp's logs on stderr
    n_seq_max: int = 1  # sequences one context can hold (for multi-sequence use)
    kv_unified: bool = True  # one KV stream for all sequences (False: one per sequence)
    type_k: str = "f16"  # KV cache types: "f16" or "q8_0" (quantized V needs flash attention)
    type_v: str = "f16"
    # llama.cpp's cb_eval: a ggml_backend_sched_eval_callback called for graph nodes (tests read tensors
    # with it: tests/support/capture.py; profilers time nodes); the model keeps it alive
    cb_eval: Any = None

    def check(self) -> None:
        if self.n_ctx < 16:
            raise ValueError(f"n_ctx must be at least 16, got {self.n_ctx}")
        if self.n_batch < 1 or self.n_ubatch < 1:
            raise ValueError("n_batch and n_ubatch must be positive")
        if self.n_threads is not None and self.n_threads < 1:
            raise ValueError(f"n_threads must be positive, got {self.n_threads}")
        if self.type_k not in _KV_TYPES or self.type_v not in _KV_TYPES:
            raise ValueError(f"type_k/type_v must be one of {sorted(_KV_TYPES)}")
        if self.n_seq_max < 1:
            raise ValueError("n_seq_max must be >= 1")
        if self.flash_attn not in _FLASH_ATTN:
            raise ValueError(f"flash_attn must be one of {sorted(_FLASH_ATTN)}, got {self.flash_attn!r}")


@dataclass
class _Prepared:
    chunks: int  # mtmd_input_chunks pointer
    n_pos: int
    n_tokens: int
    n_image_tokens: int
    bitmaps: list = field(default_factory=list)


class VisionModel:
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
        self.params = params or ModelParams()
        for k, v in overrides.items():
            if not hasattr(self.params, k):
                raise TypeError(f"unknown model parameter {k!r}")
            setattr(self.params, k, v)
        self.params.check()
        self._model = self._ctx = self._mctx = None
        self._lock = threading.Lock()
        self.last_result: GenerationResult | None = None
        self.model_path, self.mmproj_path = Path(model_path), Path(mmproj_path)
        _log.install(self.params.verbose)
        self._check_files()
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # -- loading -------------------------------------------------------------------------
    def _check_files(self) -> None:
        """Catch wrong, truncated or mismatched files before the C loaders see them."""
        info = read_gguf_info(self.model_path)
        if info.architecture == "clip":
            raise ModelFileError(
                f"{self.model_path} is a multimodal projector (mmproj), not a "
                "language model: pass it as mmproj_path / --mmproj"
            )
        proj = read_gguf_info(self.mmproj_path)
        if proj.architecture != "clip":
            raise ModelFileError(
                f"{self.mmproj_path} is not a multimodal projector (mmproj) "
                f"but a '{proj.architecture}' model; pass the mmproj GGUF that "
                "belongs to the language model"
            )
        if not proj.get("clip.has_vision_encoder", True):
            raise ModelFileError(f"{self.mmproj_path} has no vision encoder (audio-only projector)")
        self.architecture = info.architecture
        self.projector_type = proj.get("clip.projector_type") or proj.get("clip.vision.projector_type")
        n_embd = info.get(f"{info.architecture}.embedding_length")
        n_proj = proj.get("clip.vision.projection_dim")
        if n_embd and n_proj and int(n_embd) != int(n_proj):
            raise ProjectorMismatchError(
                f"{self.mmproj_path.name} projects images to {n_proj}-dim embeddings but "
                f"{self.model_path.name} has embedding size {n_embd}: this mmproj belongs to "
                "another model; use the mmproj published with this model"
            )

    def _load(self) -> None:
        p = self.params
        _log.clear()
        n_threads = p.n_threads or os.cpu_count() or 1
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = p.n_gpu_layers if p.n_gpu_layers >= 0 else 999
        self._model = L.llama_model_load_from_file(str(self.model_path).encode(), mp)
        if not self._model:
            raise ModelFileError(f"llama.cpp could not load {self.model_path}: {_log.last_error() or 'unknown error'}")
        self._vocab: Any = L.llama_model_get_vocab(self._model)

        cp = L.llama_context_default_params()
        cp.n_ctx = p.n_ctx
        cp.n_batch = p.n_batch
        cp.n_ubatch = p.n_ubatch
        if self.projector_type in _NON_CAUSAL_IMAGE_PROJECTORS:
            cp.n_ubatch = p.n_batch  # an image is attended non-causally: it must fit one ubatch
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.flash_attn_type = _FLASH_ATTN[p.flash_attn]
        cp.no_perf = True
        cp.n_seq_max = p.n_seq_max
        cp.kv_unified = p.kv_unified
        cp.type_k, cp.type_v = _KV_TYPES[p.type_k], _KV_TYPES[p.type_v]
        self._cb_eval = p.cb_eval
        if p.cb_eval is not None:
            cp.cb_eval = p.cb_eval
        self._ctx = L.llama_init_from_model(self._model, cp)
        if not self._ctx:
            raise ModelFileError(
                f"llama.cpp could not create a context for {self.model_path} "
                f"(n_ctx={p.n_ctx}): {_log.last_error() or 'unknown error'}"
            )
        self.n_ctx: int = int(L.llama_n_ctx(self._ctx))
        self.n_batch: int = int(L.llama_n_batch(self._ctx))
        self.n_ubatch: int = int(L.llama_n_ubatch(self._ctx))

        mparams = M.mtmd_context_params_default()
        mparams.use_gpu = bool(p.mmproj_use_gpu and p.n_gpu_layers != 0)
        mparams.n_threads = n_threads
        mparams.print_timings = False
        mparams.flash_attn_type = _FLASH_ATTN[p.flash_attn]
        mparams.warmup = p.warmup
        self._mctx = M.mtmd_init_from_file(str(self.mmproj_path).encode(), self._model, mparams)
        if not self._mctx:
            err = _log.last_error() or "unknown error"
            if "mismatch between text model" in err:
                raise ProjectorMismatchError(
                    f"{self.mmproj_path.name} does not belong to {self.model_path.name}: {err.strip()}"
                )
            raise ModelFileError(f"libmtmd could not load the projector {self.mmproj_path}: {err.strip()}")
        if not M.mtmd_support_vision(self._mctx):
            raise ModelFileError(f"{self.mmproj_path} does not support image input")
        self.uses_mrope = bool(M.mtmd_decode_use_mrope(self._mctx))
        self.marker: str = (M.mtmd_default_marker() or DEFAULT_MARKER.encode()).decode()
        self._vp: VisionPulseControl = VisionPulseControl(self._ctx)

    def close(self) -> None:
        """Free the native model, context and projector (also done on garbage collection)."""
        if getattr(self, "_mctx", None):
            M.mtmd_free(self._mctx)
            self._mctx = None
        if getattr(self, "_ctx", None):
            L.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            L.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # at interpreter exit the ctypes layer may already be gone: nothing left to free then
        with contextlib.suppress(Exception):
            self.close()

    @property
    def context(self):
        """The llama_context (a llama-cpp-python ctypes pointer): for llama.cpp calls of one's own."""
        return self._ctx

    @property
    def mtmd_context(self):
        """The libmtmd context of the projector."""
        return self._mctx

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
        tmpl = L.llama_model_chat_template(self._model, None)
        if not tmpl:
            raise PromptError(
                f"{self.model_path.name} has no chat template; pass the prompt raw "
                "(chat_template=False) in the format the model expects"
            )
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        enc = [(m["role"].encode(), m["content"].encode()) for m in msgs]  # kept alive during the call
        arr = (L.llama_chat_message * len(enc))(*[L.llama_chat_message(role=r, content=c) for r, c in enc])
        size = max(4096, 2 * sum(len(c) for _, c in enc) + 1024)
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = L.llama_chat_apply_template(tmpl, arr, len(enc), True, buf, size)
            if n < 0:
                raise PromptError(
                    "llama.cpp does not support this model's chat template; pass the prompt raw (chat_template=False)"
                )
            if n <= size:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n + 1
        raise PromptError("chat template output too long")

    # -- generation ----------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        images: Sequence[ImageInput] = (),
        max_tokens: int = 128,
        sampling: SamplingParams | None = None,
        chat_template: bool = False,
        visionpulse: VisionPulse | str | int | None = None,
    ) -> GenerationResult:
        """Generate text from images and a prompt; returns the text, token ids, counts and timings.

        Images go where the prompt holds the marker ``<__media__>``; a prompt without
        markers gets one per image in front of it (as llama-mtmd-cli does).
        ``visionpulse``: None/"off" (dense), 5 or 10 (the presets), or a VisionPulse with
        any mode and knob; the per-step selection is reported in ``result.visionpulse``.
        """
        for _ in self.stream(prompt, images, max_tokens, sampling, chat_template, visionpulse):
            pass
        assert self.last_result is not None
        return self.last_result

    def stream(
        self,
        prompt: str,
        images: Sequence[ImageInput] = (),
        max_tokens: int = 128,
        sampling: SamplingParams | None = None,
        chat_template: bool = False,
        visionpulse: VisionPulse | str | int | None = None,
    ) -> Iterator[str]:
        """Like generate(), yielding text pieces as they are produced; the full result is
        in ``last_result`` afterwards."""
        if isinstance(images, (str, Path, bytes)):
            images = [images]
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
            yield from self._run(prompt, list(images), max_tokens, sampling, chat_template, vp)
        finally:
            self._lock.release()

    def teacher_forced(
        self,
        prompt: str,
        images: Sequence[ImageInput],
        tokens: Sequence[int],
        visionpulse: VisionPulse | str | int | None = None,
        after_prefill=None,
        before_step=None,
    ):
        """Logits at every step when ``tokens`` are fed as the answer (no sampling).

        Returns ``(logits, report)``: logits is a float32 array [len(tokens), n_vocab] whose
        row i predicts tokens[i] (row 0 comes from the dense prefill); report holds the
        per-step VisionPulse selection (or None). ``after_prefill(model, image_spans)``, if
        given, runs between the prompt and the first forced token (tests use it to edit the cache);
        ``before_step(model, i)`` runs before decode step i (i = 1 for the first decoded token;
        the replay oracle forces each step's set there)."""
        import numpy as np

        vp = VisionPulse.parse(visionpulse)  # checked by C when applied, before any work
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this VisionModel is already generating (one generation at a time)")
        n_vocab = L.llama_vocab_n_tokens(self._vocab)
        out = np.zeros((len(tokens), n_vocab), dtype=np.float32)
        prep = None
        try:
            self._vp.apply(vp)
            prep = self._prepare(prompt, list(images), False)
            n_past = self._eval_prompt(prep, Timings())
            if after_prefill is not None:
                after_prefill(self, list(self._image_spans))
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
                self._check_decode(L.llama_decode(self._ctx, L.llama_batch_get_one(tok_arr, 1)), "a forced token")
                n_past += 1
                if report is not None:
                    report.record(self._ctx)
            return out, report
        finally:
            if prep is not None:
                self._free_prepared(prep)
            self._lock.release()

    def _prompt_text(self, prompt: str, n_images: int, chat_template: bool) -> str:
        n_markers = prompt.count(self.marker)
        if n_markers == 0 and n_images:
            prompt = self.marker * n_images + prompt
        elif n_markers != n_images:
            raise PromptError(
                f"the prompt has {n_markers} image marker(s) {self.marker!r} but "
                f"{n_images} image(s) were given: use one marker per image, or none "
                "to put all images before the prompt"
            )
        return self.apply_chat_template(prompt) if chat_template else prompt

    def _prepare(self, prompt: str, images: list, chat_template: bool) -> _Prepared:
        text = self._prompt_text(prompt, len(images), chat_template)
        prep = _Prepared(chunks=M.mtmd_input_chunks_init(), n_pos=0, n_tokens=0, n_image_tokens=0)
        try:
            for img in images:
                prep.bitmaps.append(load_bitmap(M, self._mctx, img))
            raw = text.encode("utf-8")
            itext = M.mtmd_input_text(text=raw, text_len=len(raw), add_special=True, parse_special=True)
            arr = (ctypes.c_void_p * max(1, len(prep.bitmaps)))(*prep.bitmaps)
            rc = M.mtmd_tokenize(self._mctx, prep.chunks, ctypes.byref(itext), arr, len(prep.bitmaps))
            if rc != 0:
                raise ImageError(
                    f"libmtmd could not preprocess the prompt's images (code {rc}): "
                    f"{_log.last_error() or 'see logs with verbose=True'}"
                )
            self._check_prepared(prep)
        except BaseException:
            self._free_prepared(prep)
            raise
        return prep

    def _check_prepared(self, prep: _Prepared) -> None:
        """Count the tokens and refuse what llama.cpp would abort on."""
        last_type = None
        for i in range(M.mtmd_input_chunks_size(prep.chunks)):
            ch = M.mtmd_input_chunks_get(prep.chunks, i)
            last_type = M.mtmd_input_chunk_get_type(ch)
            if last_type != M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                nt = M.mtmd_input_chunk_get_n_tokens(ch)
                prep.n_image_tokens += nt
                if self.projector_type in _NON_CAUSAL_IMAGE_PROJECTORS and nt > self.n_ubatch:
                    raise ContextOverflowError(
                        f"an image takes {nt} tokens but n_batch is {self.n_ubatch}; this model "
                        f"attends to an image as a whole, so raise n_batch to at least {nt}"
                    )
        prep.n_tokens = M.mtmd_helper_get_n_tokens(prep.chunks)
        prep.n_pos = M.mtmd_helper_get_n_pos(prep.chunks)
        if last_type is not None and last_type != M.MTMD_INPUT_CHUNK_TYPE_TEXT:
            raise PromptError("the prompt ends with an image: put the question (some text) after the last image marker")
        if prep.n_tokens == 0:
            raise PromptError("the prompt is empty")
        if prep.n_pos + 1 > self.n_ctx or prep.n_tokens + 1 > self.n_ctx:
            raise ContextOverflowError(
                f"the prompt needs {prep.n_tokens} tokens ({prep.n_image_tokens} for images) but the "
                f"context holds {self.n_ctx}: raise n_ctx (-c) or use fewer/smaller images"
            )

    @staticmethod
    def _free_prepared(prep: _Prepared) -> None:
        for b in prep.bitmaps:
            M.mtmd_bitmap_free(b)
        prep.bitmaps.clear()
        if prep.chunks:
            M.mtmd_input_chunks_free(prep.chunks)
            prep.chunks = 0

    def _make_sampler(self, s: SamplingParams):
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if s.temperature <= 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        else:
            if s.top_k > 0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(s.top_k))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(s.top_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(s.min_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(s.temperature))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(s.seed & 0xFFFFFFFF))
        return chain

    def _check_decode(self, rc: int, what: str) -> None:
        if rc == 0:
            return
        if rc == 1:
            raise ContextOverflowError(f"the context ({self.n_ctx} tokens) is full while decoding {what}: raise n_ctx")
        raise DecodeError(f"llama.cpp failed to decode {what} (code {rc}): {_log.last_error() or ''}".strip())

    def _decode_tokens(self, tokens: Sequence[int], pos0: int, what: str) -> None:
        """Decode text tokens at explicit positions (logits for the last one)."""
        batch = L.llama_batch_init(len(tokens), 0, 1)
        try:
            for j, tok in enumerate(tokens):
                batch.token[j] = tok
                batch.pos[j] = pos0 + j
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = j == len(tokens) - 1
            batch.n_tokens = len(tokens)
            self._check_decode(L.llama_decode(self._ctx, batch), what)
        finally:
            L.llama_batch_free(batch)

    def _eval_prompt(self, prep: _Prepared, t: Timings) -> int:
        """Encode images and prefill every chunk (dense, no VisionPulse step); returns the next position.

        With VisionPulse "static", the last prompt token is decoded on its own as the first
        step, so that its query ranks the visual tokens once (FastV-style)."""
        L.llama_memory_clear(L.llama_get_memory(self._ctx), True)
        self._vp.new_prompt()
        vp = self._vp.settings
        self._image_spans: list[ImageSpan] = []
        n_past = 0
        n = M.mtmd_input_chunks_size(prep.chunks)
        for i in range(n):
            ch = M.mtmd_input_chunks_get(prep.chunks, i)
            new_n_past = L.llama_pos(n_past)
            if M.mtmd_input_chunk_get_type(ch) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                t0 = time.perf_counter()
                if i == n - 1 and vp is not None and vp.mode == "static":
                    n_tok = ctypes.c_size_t(0)
                    ptr = M.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n_tok))
                    toks = [ptr[j] for j in range(n_tok.value)]
                    if len(toks) > 1:
                        self._decode_tokens(toks[:-1], n_past, "the prompt text")
                    self._vp.begin_generation()
                    self._decode_tokens(toks[-1:], n_past + len(toks) - 1, "the last prompt token")
                    new_n_past.value = n_past + len(toks)
                else:
                    rc = M.mtmd_helper_eval_chunk_single(
                        self._mctx, self._ctx, ch, n_past, 0, self.n_batch, i == n - 1, ctypes.byref(new_n_past)
                    )
                    self._check_decode(rc, "the prompt text")
                t.prefill_ms += (time.perf_counter() - t0) * 1e3
            else:
                img = M.mtmd_input_chunk_get_tokens_image(ch)
                self._image_spans.append(
                    ImageSpan(
                        pos=n_past,
                        n_tokens=M.mtmd_input_chunk_get_n_tokens(ch),
                        n_pos=M.mtmd_input_chunk_get_n_pos(ch),
                        nx=M.mtmd_image_tokens_get_nx(img),
                        ny=M.mtmd_image_tokens_get_ny(img),
                    )
                )
                t0 = time.perf_counter()
                if M.mtmd_encode_chunk(self._mctx, ch) != 0:
                    raise ImageError(
                        f"the projector failed to encode image chunk {i}: {_log.last_error() or ''}".strip()
                    )
                embd = M.mtmd_get_output_embd(self._mctx)
                t1 = time.perf_counter()
                t.image_encode_ms += (t1 - t0) * 1e3
                rc = M.mtmd_helper_decode_image_chunk(
                    self._mctx,
                    self._ctx,
                    ch,
                    embd,
                    n_past,
                    0,
                    self.n_batch,
                    ctypes.byref(new_n_past),
                    _NO_POST_DECODE,
                    None,
                )
                self._check_decode(rc, "an image")
                t.prefill_ms += (time.perf_counter() - t1) * 1e3
            n_past = new_n_past.value
        return n_past

    def _start_vp(self) -> VisionPulseReport | None:
        """The prompt is in: from the next decode on, each one is a VisionPulse step."""
        vp = self._vp.settings
        if vp is not None and vp.mode != "static":  # static began at its last prompt token
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
    ) -> Iterator[str]:
        self.last_result = None
        _log.clear()
        self._vp.apply(vp)  # refuses bad settings (e.g. an anchor out of range) before any work
        prep = self._prepare(prompt, images, chat_template)
        t = Timings()
        t._n_prefill = prep.n_tokens
        sampler = self._make_sampler(sampling)
        tokens: list[int] = []
        text_parts: list[str] = []
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stop = "length"
        tok_arr = (L.llama_token * 1)()
        try:
            n_past = self._eval_prompt(prep, t)
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
                self._check_decode(rc, "a generated token")
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
                images=list(self._image_spans),
            )
        finally:
            L.llama_sampler_free(sampler)
            self._free_prepared(prep)
