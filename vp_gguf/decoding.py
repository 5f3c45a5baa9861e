"""Decoding: the prompt's chunks prefilled (images encoded by the projector), text tokens decoded,
the sampler chain, and llama_decode's failures as Python errors."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence

from . import _log
from ._libs import llama_cpp as L
from ._libs import mtmd_cpp as M
from .errors import ContextOverflowError, DecodeError, ImageError
from .loading import LoadedModel
from .prompt import Prepared
from .result import ImageSpan, Timings
from .sampling import SamplingParams
from .visionpulse import VisionPulseControl

_NO_POST_DECODE = M.mtmd_helper_post_decode_callback()  # a NULL function pointer


def make_sampler(s: SamplingParams):
    """llama.cpp's sampler chain for these settings (greedy at temperature 0); free it with llama_sampler_free."""
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


def check_decode(lm: LoadedModel, rc: int, what: str) -> None:
    if rc == 0:
        return
    if rc == 1:
        raise ContextOverflowError(f"the context ({lm.n_ctx} tokens) is full while decoding {what}: raise n_ctx")
    raise DecodeError(f"llama.cpp failed to decode {what} (code {rc}): {_log.last_error() or ''}".strip())


def decode_tokens(lm: LoadedModel, tokens: Sequence[int], pos0: int, what: str) -> None:
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
        check_decode(lm, L.llama_decode(lm._ctx, batch), what)
    finally:
        L.llama_batch_free(batch)


def eval_prompt(lm: LoadedModel, prep: Prepared, t: Timings, vp: VisionPulseControl) -> tuple[int, list[ImageSpan]]:
    """Encode images and prefill every chunk (dense, no VisionPulse step); returns the next
    position and where the images went.

    With VisionPulse "static", the last prompt token is decoded on its own as the first
    step, so that its query ranks the visual tokens once (FastV-style)."""
    L.llama_memory_clear(L.llama_get_memory(lm._ctx), True)
    vp.new_prompt()
    spans: list[ImageSpan] = []
    n_past = 0
    n = M.mtmd_input_chunks_size(prep.chunks)
    for i in range(n):
        ch = M.mtmd_input_chunks_get(prep.chunks, i)
        new_n_past = L.llama_pos(n_past)
        if M.mtmd_input_chunk_get_type(ch) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
            t0 = time.perf_counter()
            if i == n - 1 and vp.settings is not None and vp.settings.mode == "static":
                n_tok = ctypes.c_size_t(0)
                ptr = M.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n_tok))
                toks = [ptr[j] for j in range(n_tok.value)]
                if len(toks) > 1:
                    decode_tokens(lm, toks[:-1], n_past, "the prompt text")
                vp.begin_generation()
                decode_tokens(lm, toks[-1:], n_past + len(toks) - 1, "the last prompt token")
                new_n_past.value = n_past + len(toks)
            else:
                rc = M.mtmd_helper_eval_chunk_single(
                    lm._mctx, lm._ctx, ch, n_past, 0, lm.n_batch, i == n - 1, ctypes.byref(new_n_past)
                )
                check_decode(lm, rc, "the prompt text")
            t.prefill_ms += (time.perf_counter() - t0) * 1e3
        else:
            img = M.mtmd_input_chunk_get_tokens_image(ch)
            spans.append(
                ImageSpan(
                    pos=n_past,
                    n_tokens=M.mtmd_input_chunk_get_n_tokens(ch),
                    n_pos=M.mtmd_input_chunk_get_n_pos(ch),
                    nx=M.mtmd_image_tokens_get_nx(img),
                    ny=M.mtmd_image_tokens_get_ny(img),
                )
            )
            t0 = time.perf_counter()
            if M.mtmd_encode_chunk(lm._mctx, ch) != 0:
                raise ImageError(f"the projector failed to encode image chunk {i}: {_log.last_error() or ''}".strip())
            embd = M.mtmd_get_output_embd(lm._mctx)
            t1 = time.perf_counter()
            t.image_encode_ms += (t1 - t0) * 1e3
            rc = M.mtmd_helper_decode_image_chunk(
                lm._mctx,
                lm._ctx,
                ch,
                embd,
                n_past,
                0,
                lm.n_batch,
                ctypes.byref(new_n_past),
                _NO_POST_DECODE,
                None,
            )
            check_decode(lm, rc, "an image")
            t.prefill_ms += (time.perf_counter() - t1) * 1e3
        n_past = new_n_past.value
    return n_past, spans
